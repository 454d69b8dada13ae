"""rloo and grpo (rlhf/critic_free.py): the advantage estimators and losses against plain loops, both stages
end to end on the tiny profile, kill-and-resume to the same weights, and 2 processes (torchrun, gloo)
against 1.

The data-parallel comparison samples at T = 0.001 (greedy in effect), as tests/test_multiprocess.py does
for ppo: each rank samples with its own seed (docs/ppo.md item 21), so only then do both runs see the
same episodes. At that temperature the k samples of a prompt are equal and so are their rewards; the
advantages vanish, so the arithmetic of the policy-gradient terms under two processes is checked
separately, in two gloo processes (`test_sharded_losses_reproduce_one_process_gradients`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ENV, ROOT, TINY, kill_after_first_checkpoint, tiny_params, without_timing

STAGES = ("rloo", "grpo")

# ----------------------------------------------------------------------------------------------
# Plain-loop references


def loo_loop(rewards: list[list[float]]) -> list[list[float]]:
    return [[r[i] - sum(r[j] for j in range(len(r)) if j != i) / (len(r) - 1) for i in range(len(r))] for r in rewards]


def group_norm_loop(rewards: list[list[float]], eps: float) -> list[list[float]]:
    out = []
    for r in rewards:
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        out.append([(x - mean) / (std + eps) for x in r])
    return out


def random_batch(seed: int = 0, B: int = 6, R: int = 5):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(R) < torch.randint(1, R + 1, (B,), generator=gen)[:, None]).float()
    old = -torch.rand(B, R, generator=gen) * 3
    new = old + 0.5 * torch.randn(B, R, generator=gen)  # ratios well outside 1 ± 0.2: the clip is active
    ref = old + 0.3 * torch.randn(B, R, generator=gen)
    adv = torch.randn(B, generator=gen)
    return new, old, ref, adv, mask


def test_leave_one_out_and_group_normalization_match_loops():
    from rlhf import critic_free as CF

    rewards = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(CF.leave_one_out(rewards), torch.tensor(loo_loop(rewards.tolist()), dtype=torch.float64))
    torch.testing.assert_close(CF.group_normalized(rewards, 1e-4),
                               torch.tensor(group_norm_loop(rewards.tolist(), 1e-4), dtype=torch.float64))
    # A group of equal rewards has no signal: advantage 0 under both estimators.
    same = torch.full((1, 4), 0.7, dtype=torch.float64)
    assert CF.leave_one_out(same).abs().max() < 1e-12 and CF.group_normalized(same).abs().max() < 1e-9
    # The leave-one-out advantages of a group sum to 0; grouped() keeps each prompt's samples in a row.
    assert CF.leave_one_out(rewards).sum(1).abs().max() < 1e-12
    assert CF.grouped(torch.arange(8), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    from rlhf.errors import StageError

    with pytest.raises(StageError, match="at least 2 samples"):
        CF.leave_one_out(torch.zeros(2, 1))


def test_rloo_loss_matches_loop_and_accumulates_over_micro_batches():
    from rlhf import critic_free as CF

    new, _, _, adv, mask = random_batch()
    B, R = mask.shape
    expected = -sum(adv[i] * sum(new[i, t] * mask[i, t] for t in range(R)) for i in range(B)) / B
    loss, _ = CF.rloo_loss(new, adv, mask, denom=float(B))
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=loss.dtype))
    parts = sum(CF.rloo_loss(new[s], adv[s], mask[s], denom=float(B))[0] for s in (slice(0, 2), slice(2, B)))
    torch.testing.assert_close(parts, loss)


def test_grpo_loss_and_k3_match_loops():
    from rlhf import critic_free as CF

    new, old, ref, adv, mask = random_batch(1)
    B, R = mask.shape
    beta, eps = 0.1, 0.2
    total, clipped, kl_sum = 0.0, 0.0, 0.0
    N, O, F, A, M = new.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist()
    for i in range(B):
        n = sum(M[i])
        seq, seq_clip, seq_kl = 0.0, 0.0, 0.0
        for t in range(R):
            if not M[i][t]:
                continue
            ratio, a = math.exp(N[i][t] - O[i][t]), A[i]
            surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            k3 = math.exp(F[i][t] - N[i][t]) - (F[i][t] - N[i][t]) - 1
            assert k3 >= 0
            seq += -(surr - beta * k3)
            seq_clip += float(min(max(ratio, 1 - eps), 1 + eps) * a < ratio * a)
            seq_kl += k3
        total, clipped, kl_sum = total + seq / n, clipped + seq_clip / n, kl_sum + seq_kl / n
    loss, stats = CF.grpo_loss(new, old, ref, adv, mask, clip_range=eps, kl_coef=beta, denom=float(B))
    assert float(loss) == pytest.approx(total / B, rel=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx(clipped / B, rel=1e-5) and 0 < float(stats["clipfrac"]) < 1
    assert float(stats["kl_k3"]) == pytest.approx(kl_sum / B, rel=1e-5)
    # On the rollout's own policy (ratio 1) the objective's gradient is −A ∇log π per token; k3 is 0 at π = π_ref.
    assert float(CF.k3_kl(old, old).abs().max()) == 0.0
    parts = sum(CF.grpo_loss(new[s], old[s], ref[s], adv[s], mask[s], clip_range=eps, kl_coef=beta, denom=float(B))[0]
                for s in (slice(0, 4), slice(4, B)))
    torch.testing.assert_close(parts, loss)


# ----------------------------------------------------------------------------------------------
# The stages end to end


def stage_paths(root: Path, name: str) -> dict[str, Path]:
    return {"out": root / f"models/{name}", "metrics": root / f"metrics/{name}.json", "plots": root / f"plots/{name}",
            "checkpoints": root / f"checkpoints/{name}"}


@pytest.fixture(scope="module")
def runs(tiny_rm, tmp_path_factory) -> dict[str, tuple[dict[str, Path], dict]]:
    """Each stage once on the tiny profile (the reference of the resume test)."""
    import importlib

    out = {}
    for name in STAGES:
        paths = stage_paths(tmp_path_factory.mktemp(name), name)
        result = importlib.import_module(f"stages.{name}").run(
            tiny_params(name), sft=tiny_rm.sft, reward=tiny_rm.reward, data=tiny_rm.prepared, world=tiny_rm.world,
            **paths)
        out[name] = (paths, result)
    return out


@pytest.mark.parametrize("name", STAGES)
def test_stage_writes_a_policy_metrics_and_curves(name, runs):
    from transformers import AutoModelForCausalLM

    paths, result = runs[name]
    AutoModelForCausalLM.from_pretrained(str(paths["out"]), use_safetensors=True)
    assert (paths["out"] / "tokenizer.json").is_file() and not paths["checkpoints"].exists()
    m = json.loads(paths["metrics"].read_text())
    p = tiny_params(name)
    assert m["steps"] == p.steps and m["episodes"] == p.steps * p.prompts_per_step * p.samples_per_prompt
    assert m["timing"]["wall_s"] > m["timing"]["train_s"] > 0 and m["timing"]["episodes_per_s"] > 0
    for key in ("rm_score", "kl", "gold", "ended_with_eos", "response_length", "kl_coef", "entropy"):
        assert key in m["final_rollout"], key
    for model in ("policy", "sft"):
        assert 0.0 <= m["test"][model]["gold"]["total"] <= 1.0
    assert "tax" in m["corpus_logprob"] and m["sanity"]["negative_kl_steps"] >= 0
    curves = paths["plots"] / "plots" / "metrics"
    names = ["objective/kl", "objective/rm_score", "objective/rlhf_reward", "gold/score", "loss/policy"]
    names += ["policy/clipfrac", "policy/kl_k3"] if name == "grpo" else []
    for curve in names:
        assert len((curves / f"{curve}.tsv").read_text().strip().splitlines()) == 1 + p.steps, curve
    csv = (paths["plots"] / "overoptimization.csv").read_text().splitlines()
    assert len(csv) == 1 + p.steps and float(csv[1].split(",")[1]) == 0.0  # step 0 samples SFT itself: KL 0


@pytest.mark.parametrize("name", STAGES)
def test_stage_resumes_after_sigkill_with_identical_weights(name, runs, tiny_rm, tmp_path):
    from safetensors.torch import load_file

    ref_paths, _ = runs[name]
    paths = stage_paths(tmp_path, name)
    cmd = [sys.executable, "-m", "cli", name, "--params", str(TINY), "--sft", str(tiny_rm.sft), "--reward",
           str(tiny_rm.reward), "--data", str(tiny_rm.prepared), "--world", str(tiny_rm.world)]
    cmd += [x for k, v in paths.items() for x in (f"--{k}", str(v))]
    ckpt = paths["checkpoints"] / "checkpoint.pt"
    step = kill_after_first_checkpoint(cmd[3:], ckpt, tmp_path / "killed.log", cwd=tmp_path)
    assert 0 < step < tiny_params(name).steps and not paths["metrics"].exists()

    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step" in " ".join(done.stdout.split())
    assert not ckpt.exists()
    ours = load_file(str(paths["out"] / "model.safetensors"))
    ref = load_file(str(ref_paths["out"] / "model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert json.loads(paths["metrics"].read_text())["timing"]["resumed_from"] == step
    assert without_timing(paths["metrics"]) == without_timing(ref_paths["metrics"])
    rows = (paths["plots"] / "plots/metrics/objective/kl.tsv").read_text().strip().splitlines()
    assert rows == (ref_paths["plots"] / "plots/metrics/objective/kl.tsv").read_text().strip().splitlines()


def test_bad_settings_say_which_key():
    from rlhf.errors import StageError

    for name in STAGES:
        with pytest.raises(StageError, match=f"{name}.samples_per_prompt"):
            tiny_params(name, samples_per_prompt=1).validate()
    with pytest.raises(StageError, match="grpo.clip_range"):
        tiny_params("grpo", clip_range=0.0).validate()


# ----------------------------------------------------------------------------------------------
# Data parallel


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, tiny_rm, params: Path, root: Path, processes: int) -> tuple[dict, str]:
    prefix = [sys.executable, "-m", "cli"] if processes == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes), "--master_port",
        str(free_port()), "-m", "cli"]
    paths = stage_paths(root, name)
    cmd = [*prefix, name, "--params", str(params), "--sft", str(tiny_rm.sft), "--reward", str(tiny_rm.reward),
           "--data", str(tiny_rm.prepared), "--world", str(tiny_rm.world)]
    cmd += [x for k, v in paths.items() for x in (f"--{k}", str(v))]
    res = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(paths["metrics"].read_text()), " ".join(res.stdout.split())


@pytest.mark.parametrize("name", STAGES)
def test_two_processes_match_one(name, tiny_rm, tmp_path):
    from safetensors.torch import load_file

    params = yaml.safe_load(TINY.read_text())
    params[name].update(temperature=0.001, eval_prompts=2, steps=2)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    one, _ = launch(name, tiny_rm, params_path, tmp_path / "one", 1)
    two, log = launch(name, tiny_rm, params_path, tmp_path / "two", 2)
    assert "processes" not in one and two["processes"] == 2 and one["episodes"] == two["episodes"]
    for key, v in one["final_rollout"].items():  # global means over both ranks' groups
        assert abs(v - two["final_rollout"][key]) <= 2e-4, (key, v, two["final_rollout"][key])
    w1 = load_file(tmp_path / f"one/models/{name}/model.safetensors")
    w2 = load_file(tmp_path / f"two/models/{name}/model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-5) for k in w1)
    assert "rank 1 done, weights identical to rank 0's" in log
    assert not (tmp_path / f"two/checkpoints/{name}").exists()


def _losses_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from rlhf import critic_free as CF
    from rlhf.dist import Dist, init_dist
    from rlhf.ppo import logprobs_from_logits

    dist, _ = init_dist(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    P_, k, R, V, F = 4, 3, 5, 7, 4
    B = P_ * k
    feats, tokens = torch.randn(B, R, F, generator=gen), torch.randint(0, V, (B, R), generator=gen)
    mask = (torch.arange(R) < torch.randint(1, R + 1, (B,), generator=gen)[:, None]).float()
    rewards = torch.randn(B, generator=gen)
    old, ref = -torch.rand(B, R, generator=gen), -torch.rand(B, R, generator=gen)
    # Whole groups per rank, as critic_free.group_indices shards prompts before repeating them k times.
    rows = [p * k + j for p in dist.shard(range(P_)) for j in range(k)]

    def grads(d: Dist, sel: list[int], which: str) -> list[torch.Tensor]:
        torch.manual_seed(1)
        policy = torch.nn.Linear(F, V)
        lp = logprobs_from_logits(policy(feats[sel]), tokens[sel])
        r = rewards[sel].view(-1, k)
        if which == "rloo":
            loss, _ = CF.rloo_loss(lp, CF.leave_one_out(r).flatten(), mask[sel], denom=float(len(sel)))
        else:
            loss, _ = CF.grpo_loss(lp, old[sel], ref[sel], CF.group_normalized(r).flatten(), mask[sel], clip_range=0.2,
                                   kl_coef=0.1, denom=float(len(sel)))
        loss.backward()
        d.average_gradients(policy)
        return [p.grad for p in policy.parameters()]

    for which in STAGES:
        for a, b in zip(grads(dist, rows, which), grads(Dist(), list(range(B)), which), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    tdist.destroy_process_group()


def test_sharded_losses_reproduce_one_process_gradients():
    """Both losses over each rank's whole groups, gradients averaged: the one-process gradient (2 gloo processes)."""
    import torch.multiprocessing as mp

    mp.spawn(_losses_worker, args=(2, free_port()), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# Learning: the stage's step on a bandit with a known optimum


def test_both_raise_reward_on_a_bandit():
    """tests/test_ppo_learning.py's bandit (reward 1 for emitting the target token): RLOO and GRPO learn it."""
    import copy
    from types import SimpleNamespace

    from rlhf import critic_free as CF
    from rlhf.devices import make_optimizer
    from rlhf.dist import Dist
    from rlhf.rollout import Data, PolicyState
    from rlhf.training import Checkpointer
    from stages import grpo, rloo
    from tests.test_ppo_learning import EOS, PAD, TargetReward, tiny_llama

    for module in (rloo, grpo):
        name = module.ALGORITHM.name
        params = tiny_params(name, steps=40, prompts_per_step=16, samples_per_prompt=4, micro_batch_size=64, lr=1e-2,
                             max_new_tokens=3, kl_coef=0.01, missing_eos_penalty=0.0, checkpoint_every=0)
        policy = tiny_llama(0)
        state = PolicyState(
            params=params, dist=Dist(), device=torch.device("cpu"),
            tokenizer=SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS), policy=policy,
            ref=copy.deepcopy(policy).requires_grad_(False), rm=TargetReward(),
            policy_opt=make_optimizer(policy.parameters(), params.lr, 0.0, torch.device("cpu"), eps=params.adam_eps),
            sample_gen=torch.Generator().manual_seed(0), shuffle_gen=None,
            data=Data(prompts=["p"] * 64, queries=[[0, 5]] * 64, prompts_too_long=0, test_prompts=[], ptx_docs=[],
                      heldout_docs=[]),
            judge=None, checkpointer=Checkpointer(None, ""))
        history = [CF.train_step(module.ALGORITHM, state, step) for step in range(params.steps)]
        start = sum(h["objective/scores"] for h in history[:3]) / 3
        end = sum(h["objective/scores"] for h in history[-3:]) / 3
        print(f"{name} bandit reward: {start:.3f} -> {end:.3f}")
        assert start < 0.3 and end > 0.8, (name, start, end)
