"""DPO: the losses against plain loops, a learning test on a separable toy preference, and the stage on the
tiny profile (end to end, other input formats, kill-and-resume, two processes)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rlhf.dpo import dpo_loss, flat_orders, plackett_luce_loss, sequence_logprobs
from rlhf.errors import StageError
from rlhf.rm import distinct_ranking
from rlhf.training import IGNORE_INDEX
from tests.conftest import TINY, tiny_params, without_timing

BETA = 0.3


def random_batch(seed: int, sizes=(2, 4, 3, 5)):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    policy, ref = 3 * torch.randn(n, generator=gen, dtype=torch.float64), 3 * torch.randn(n, generator=gen, dtype=torch.float64)
    rng = random.Random(seed)
    rankings = [rng.sample(range(k), k) for k in sizes]
    return policy, ref, rankings


def flat_views(policy, ref, rankings):
    """Per group, the (policy, ref) log-probs of its responses (the flat layout, cut per group)."""
    out, offset = [], 0
    for r in rankings:
        out.append((policy[offset: offset + len(r)].tolist(), ref[offset: offset + len(r)].tolist()))
        offset += len(r)
    return out


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def pairs_reference(policy, ref, rankings, beta) -> float:
    """Mean over prompts of the mean over its C(K,2) pairs of -log σ(β[(π_w - ref_w) - (π_l - ref_l)])."""
    total = 0.0
    for (pi, rf), ranking in zip(flat_views(policy, ref, rankings), rankings):
        losses = []
        for a in range(len(ranking)):
            for b in range(a + 1, len(ranking)):
                w, l = ranking[a], ranking[b]
                losses.append(-log_sigmoid(beta * ((pi[w] - rf[w]) - (pi[l] - rf[l]))))
        total += sum(losses) / len(losses)
    return total / len(rankings)


def plackett_luce_reference(policy, ref, rankings, beta) -> float:
    """Mean over prompts of -Σ_k log( exp r_τ(k) / Σ_{j ≥ k} exp r_τ(j) ), r = β(π - ref)."""
    total = 0.0
    for (pi, rf), ranking in zip(flat_views(policy, ref, rankings), rankings):
        r = [beta * (pi[i] - rf[i]) for i in ranking]
        for k in range(len(r)):
            total -= r[k] - math.log(sum(math.exp(x) for x in r[k:]))
    return total / len(rankings)


# ----------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairs_loss_matches_plain_loop(seed):
    policy, ref, rankings = random_batch(seed)
    loss, rewards = dpo_loss(policy, ref, rankings, beta=BETA, loss="pairs")
    assert math.isclose(float(loss), pairs_reference(policy, ref, rankings, BETA), rel_tol=1e-10)
    torch.testing.assert_close(rewards, BETA * (policy - ref))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plackett_luce_loss_matches_plain_loop(seed):
    policy, ref, rankings = random_batch(seed)
    loss, _ = dpo_loss(policy, ref, rankings, beta=BETA, loss="plackett_luce")
    assert math.isclose(float(loss), plackett_luce_reference(policy, ref, rankings, BETA), rel_tol=1e-10)


def test_the_two_forms_agree_for_two_answers_and_differ_beyond():
    policy, ref, rankings = random_batch(3, sizes=(2, 2, 2))
    pairs, _ = dpo_loss(policy, ref, rankings, beta=BETA, loss="pairs")
    pl, _ = dpo_loss(policy, ref, rankings, beta=BETA, loss="plackett_luce")
    assert math.isclose(float(pairs), float(pl), rel_tol=1e-12)
    policy, ref, rankings = random_batch(3, sizes=(4, 3))
    pairs, _ = dpo_loss(policy, ref, rankings, beta=BETA, loss="pairs")
    pl, _ = dpo_loss(policy, ref, rankings, beta=BETA, loss="plackett_luce")
    assert abs(float(pairs) - float(pl)) > 1e-3


def test_plackett_luce_gradient_is_finite_and_ignores_padding():
    """Rankings of different K share one padded matrix: the padding must not leak NaN or gradient."""
    policy, ref, rankings = random_batch(4, sizes=(2, 6))
    policy = policy.float().requires_grad_()
    order, valid = flat_orders(rankings)
    assert order.shape == (2, 6) and valid.sum() == 8
    plackett_luce_loss(BETA * (policy - ref.float()), order, valid).backward()
    assert torch.isfinite(policy.grad).all()
    # Each group's gradient sums to zero (softmax terms): a shift of all of a prompt's rewards changes nothing.
    assert abs(float(policy.grad[:2].sum())) < 1e-6 and abs(float(policy.grad[2:].sum())) < 1e-6


def test_loss_pulls_the_winner_up_and_the_loser_down():
    policy = torch.zeros(3, requires_grad=True)
    for form in ("pairs", "plackett_luce"):
        policy.grad = None
        loss, _ = dpo_loss(policy, torch.zeros(3), [[2, 0, 1]], beta=BETA, loss=form)
        loss.backward()
        g = policy.grad
        assert g[2] < 0 < g[1], (form, g)  # descent raises log π of the best, lowers it for the worst


def test_sequence_logprobs_sums_response_tokens_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    got = sequence_logprobs(logits, labels)
    for b in range(2):
        want = 0.0
        for t in range(1, 5):
            if labels[b, t] != IGNORE_INDEX:
                want += float(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
        assert math.isclose(float(got[b]), want, rel_tol=1e-5)


def test_distinct_ranking_keeps_each_text_at_its_best_place():
    assert distinct_ranking(["a", "b", "a", "c"], [2, 1, 0, 3]) == [2, 1, 3]
    assert distinct_ranking(["x", "y"], [1, 0]) == [1, 0]


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(torch.zeros(2), torch.zeros(2), [[0, 1]], beta=0.1, loss="ipo")


# ----------------------------------------------------------------------------------------------
# Learning: a toy policy learns a separable preference from rankings alone


class Bigram(torch.nn.Module):
    """logits of the next token from the current one: a policy small enough to train in a second."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(0.1 * torch.randn(vocab, vocab, generator=gen))

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.table[ids]


def toy_groups(rng: random.Random, n: int, k: int, vocab: int, good: set[int]):
    """Prompt token 0, responses of 3 tokens; a labeler ranks by the number of `good` tokens (ties broken
    by a random draw, so the preference is separable but not every pair is informative)."""
    groups = []
    for _ in range(n):
        resp = [[rng.randrange(1, vocab) for _ in range(3)] for _ in range(k)]
        ranking = sorted(range(k), key=lambda i: (-sum(t in good for t in resp[i]), rng.random()))
        groups.append((resp, ranking))
    return groups


def toy_batch(groups):
    ids = torch.tensor([[0, *r] for resp, _ in groups for r in resp])
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return ids, labels, [ranking for _, ranking in groups]


def accuracy(model, ref_lp, ids, labels, groups) -> float:
    """Share of strictly ordered pairs (by the good-token count) that the implicit reward orders the same way."""
    with torch.no_grad():
        r = (sequence_logprobs(model(ids), labels) - ref_lp).tolist()
    hits = total = pos = 0
    for resp, _ in groups:
        score = [sum(t in GOOD for t in x) for x in resp]
        for a in range(len(resp)):
            for b in range(len(resp)):
                if score[a] > score[b]:
                    total += 1
                    hits += r[pos + a] > r[pos + b]
        pos += len(resp)
    return hits / total


GOOD = {1, 2, 3}


@pytest.mark.parametrize("form", ["plackett_luce", "pairs"])
def test_dpo_learns_a_separable_preference(form):
    vocab, rng = 12, random.Random(0)
    train, heldout = toy_groups(rng, 64, 4, vocab, GOOD), toy_groups(rng, 64, 4, vocab, GOOD)
    model = Bigram(vocab, seed=0)
    ref = Bigram(vocab, seed=0).requires_grad_(False)
    ids, labels, rankings = toy_batch(train)
    h_ids, h_labels, _ = toy_batch(heldout)
    ref_lp, h_ref_lp = sequence_logprobs(ref(ids), labels), sequence_logprobs(ref(h_ids), h_labels)
    before = accuracy(model, h_ref_lp, h_ids, h_labels, heldout)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        loss, _ = dpo_loss(sequence_logprobs(model(ids), labels), ref_lp, rankings, beta=0.5, loss=form)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy(model, h_ref_lp, h_ids, h_labels, heldout)
    assert before == 0.0  # policy = reference: every implicit reward is 0, no pair is ordered
    assert after > 0.9, after
    # The probability mass moved toward good tokens: the policy prefers them after the prompt.
    p = torch.softmax(model.table[0].detach(), -1)
    assert float(p[list(GOOD)].sum()) > 2 * len(GOOD) / (vocab - 1)


# ----------------------------------------------------------------------------------------------
# The stage on the tiny profile


def dpo_paths(tiny_rm, root: Path, data: Path | None = None) -> dict[str, Path]:
    return {"sft": tiny_rm.sft, "data": data or tiny_rm.rankings, "test": tiny_rm.prepared / "test.jsonl",
            "world": tiny_rm.world, "out": root / "models/dpo", "metrics": root / "metrics/dpo.json",
            "plots": root / "plots/dpo", "checkpoints": root / "checkpoints/dpo"}


@pytest.fixture(scope="module")
def tiny_dpo(tiny_rm, tmp_path_factory):
    from stages import dpo

    paths = dpo_paths(tiny_rm, tmp_path_factory.mktemp("dpo"))
    result = dpo.run(tiny_params("dpo"), **paths)
    return paths, result


def test_stage_end_to_end(tiny_rm, tiny_dpo):
    from rlhf.models import load_causal_lm

    paths, result = tiny_dpo
    m = json.loads(paths["metrics"].read_text())
    assert m == result
    p = tiny_params("dpo")
    assert "loss" not in m and m["train"]["steps"] == p.epochs * (m["train"]["comparisons"] // p.batch_size)
    for part in (m["heldout"], m["train"]["subset"]):
        assert 0 <= part["accuracy_labels"] <= 1
        assert math.isclose(part["margin"], part["chosen_reward"] - part["rejected_reward"], abs_tol=2e-4)
    assert 0 <= m["heldout"]["accuracy_gold"] <= 1  # a world file was given
    assert set(m["test"]) >= {"sft", "dpo", "prompts", "kl", "max_new_tokens"} and m["test"]["prompts"] == p.eval_prompts
    assert set(m["test"]["dpo"]) == {"gold", "ended_with_eos"} and "total" in m["test"]["dpo"]["gold"]
    assert math.isfinite(m["test"]["kl"]) and m["test"]["prompts"] == p.eval_prompts
    assert m["timing"]["pairs_per_s"] > 0 and m["timing"]["resumed_from"] == 0
    # Training moved the policy away from the reference, and the output is a plain HF causal LM.
    assert m["heldout"]["logratio_mean"] != 0
    model = load_causal_lm(paths["out"])
    assert model.config.architectures == ["LlamaForCausalLM"] and (paths["out"] / "tokenizer.json").is_file()
    assert (paths["plots"] / "plots/metrics/train/loss.tsv").is_file()
    assert (paths["plots"] / "plots/metrics/eval/val_accuracy.tsv").is_file()
    assert not paths["checkpoints"].exists()


def test_pairs_loss_runs_and_pairwise_and_hh_inputs(tiny_rm, tmp_path):
    """Pairwise {prompt, chosen, rejected} and HH-RLHF transcripts, read by the reward stage's readers."""
    from stages import dpo

    records = [json.loads(line) for line in tiny_rm.rankings.read_text().splitlines()]
    pairwise = [{"prompt": r["prompt"], "chosen": r["responses"][r["ranking"][0]],
                 "rejected": r["responses"][r["ranking"][-1]]} for r in records]
    pairwise = [p for p in pairwise if p["chosen"].strip() and p["rejected"].strip()]  # the formats refuse empty fields
    hh = [{"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen']}",
           "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['rejected']}"} for p in pairwise]
    for fmt, rows, loss in (("pairwise", pairwise, "pairs"), ("hh", hh, "plackett_luce")):
        data = tmp_path / f"{fmt}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths = dpo_paths(tiny_rm, tmp_path / fmt, data)
        m = dpo.run(tiny_params("dpo", data_format=fmt, loss=loss, eval_prompts=2), **{**paths, "world": tmp_path / "none"})
        assert m["train"]["pairs"] == m["train"]["comparisons"]  # one pair per record
        assert "sft" not in m["test"] and "accuracy_gold" not in m["heldout"]  # no world file
        assert (paths["out"] / "config.json").is_file()


def test_bad_setups_fail_with_one_line(tiny_rm, tmp_path):
    from stages import dpo

    paths = dpo_paths(tiny_rm, tmp_path)
    with pytest.raises(StageError, match=r"fewer than dpo.batch_size=1000"):
        dpo.run(tiny_params("dpo", batch_size=1000), **paths)
    with pytest.raises(StageError, match=r"dpo.val_fraction=1e-09 held out no prompt"):
        dpo.run(tiny_params("dpo", val_fraction=1e-9), **paths)
    with pytest.raises(StageError, match="models/sft: SFT model|sft folder not found|not found"):
        dpo.run(tiny_params("dpo"), **{**paths, "sft": tmp_path / "models/sft"})


def test_resumes_after_sigkill_to_the_same_weights(tiny_rm, tiny_dpo, tmp_path):
    from tests.test_resume import assert_same_curves, assert_same_weights, kill_then_resume

    ref_paths, ref = tiny_dpo
    paths = dpo_paths(tiny_rm, tmp_path)
    step, _ = kill_then_resume("dpo", paths, tmp_path)
    assert 0 < step < ref["train"]["steps"]
    m = json.loads(paths["metrics"].read_text())
    assert m["timing"]["resumed_from"] == step
    assert without_timing(m) == without_timing(ref)
    assert_same_weights(paths["out"], ref_paths["out"])
    assert_same_curves(paths["plots"], ref_paths["plots"])


def test_two_processes_match_one(tiny_rm, tiny_dpo, tmp_path):
    """Whole prompts per rank, equal shares, gradients averaged: the one-process run up to float rounding."""
    from safetensors.torch import load_file

    from tests.test_multiprocess import launcher, run_cli

    ref_paths, one = tiny_dpo
    paths = dpo_paths(tiny_rm, tmp_path)
    cmd = [*launcher(2), "dpo", *[a for k, v in paths.items() for a in (f"--{k}", str(v))], "--params", str(TINY)]
    res, wall = run_cli(cmd)
    two = json.loads(paths["metrics"].read_text())
    print(f"\ndpo on the tiny profile, 2 processes: {wall:.1f} s (train loss {one['train']['train_loss']} vs "
          f"{two['train']['train_loss']})")
    assert two["processes"] == 2 and "processes" not in one
    assert two["train"]["steps"] == one["train"]["steps"]
    assert abs(two["train"]["train_loss"] - one["train"]["train_loss"]) < 1e-3 * max(1.0, one["train"]["train_loss"])
    w1, w2 = load_file(ref_paths["out"] / "model.safetensors"), load_file(paths["out"] / "model.safetensors")
    w0 = load_file(tiny_rm.sft / "model.safetensors")
    for name in w1:
        moved = (w1[name] - w0[name]).norm()
        assert (w1[name] - w2[name]).norm() <= 1e-3 * moved + 1e-6, name  # float rounding only (all-reduce order)
    assert not paths["checkpoints"].exists()
