"""dpo: Direct Preference Optimization of the SFT model on the rankings, with no reward model and no RL.

Reads  models/sft (policy init and frozen reference), data/rankings/rankings.jsonl (or a pairwise /
       HH-RLHF file, `dpo.data_format`), data/prepared/test.jsonl, data/raw/world.json (gold judge, optional)
Writes models/dpo (HF causal LM + tokenizer), metrics/dpo.json, plots/dpo (dvclive curves)
Run    rlhf dpo

The recipe (Rafailov et al. 2023; the math in rlhf/dpo.py):
1. Comparison groups are read as the reward stage reads them (same formats, same split by prompt hash,
   so with the same seed and share DPO holds out the very prompts the reward model holds out).
   Repeated response texts of a ranking keep their best place (rlhf.rm.distinct_ranking).
2. Every response is encoded as SFT encodes a demonstration (chat prompt + response + EOS, prompt
   masked out), so log π(y|x) sums over the response's tokens and its EOS only.
3. The reference π_ref = SFT is frozen: its log-probabilities of every response are computed once,
   without gradients, before training (and kept beside the checkpoint, so a resumed run skips them).
4. Loss `dpo.loss`: `pairs` (default), all C(K,2) pairs of a prompt in one batch element as the reward
   model trains, or `plackett_luce`, the likelihood of the whole ranking (paper appendix A.3); the
   default and its reason are in docs/algorithms.md. A batch is
   `dpo.batch_size` prompts; each process takes whole prompts of the same global batch (rlhf.dist).
5. Held-out preference accuracy of the implicit reward β log(π/π_ref) against the labels and the gold
   judge, its margins, the log-ratios of chosen and rejected answers; then KL(π ‖ π_ref) on sampled test
   answers, and the gold judge's score of greedy test answers of SFT and DPO (as `sft` reports base vs SFT).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf.errors import StageError
from rlhf.io import PROMPT_SCHEMA, read_jsonl, remove_outputs, timing, write_json
from rlhf.params import require, to_dict


@dataclass(frozen=True)
class Params:
    loss: Literal["plackett_luce", "pairs"]
    """'plackett_luce': the likelihood of each full ranking (Rafailov et al. appendix A.3); 'pairs': all
    C(K,2) pairs of a prompt in one batch element, each prompt weighted once (as the reward model)."""
    beta: float
    """β: strength of the implicit KL leash to SFT; the implicit reward is β log(π/π_ref) (paper: 0.1-0.5)."""
    data_format: Literal["rankings", "pairwise", "hh"]
    """Format of the --data file, as reward.data_format: 'rankings' (K-way, from `rank`), 'pairwise'
    {prompt, chosen, rejected}, or 'hh' (Anthropic HH-RLHF transcripts)."""
    epochs: int
    """Passes over the comparisons: on the default world 1 epoch gains as much gold as 3 at less KL, for a
    third of the reward stage's CPU time (docs/algorithms.md)."""
    batch_size: int
    """Prompts (ranking records) per optimizer step; all their responses go through one forward pass."""
    lr: float
    """Peak AdamW learning rate, cosine-annealed to lr/10."""
    warmup_steps: int
    """Linear warm-up steps."""
    weight_decay: float
    """AdamW weight decay."""
    max_len: int
    """Longest prompt+response in tokens (lowered to the model's position limit); as in sft, a longer example
    loses the start of its prompt, and a comparison with a response that alone does not fit is dropped."""
    val_fraction: float
    """Share of prompts held out (with all of their rankings); equal to reward.val_fraction and the same
    seed hold out the reward model's validation prompts."""
    eval_every: int
    """Steps between held-out evaluations on the curve (0 = only at the end)."""
    eval_max_new_tokens: int
    """Response length cap for the test answers (gold comparison and the KL estimate)."""
    eval_prompts: int
    """How many test prompts the gold judge and the KL estimate use (0 = all)."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Data order, split and test-sampling seed."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "max_len", "eval_max_new_tokens"):
            require(getattr(self, key) > 0, f"dpo.{key}", "must be > 0")
        require(self.beta > 0, "dpo.beta", "must be > 0")
        require(self.lr > 0, "dpo.lr", "must be > 0")
        require(0.0 < self.val_fraction < 1.0, "dpo.val_fraction", "must be in (0, 1)")
        require(self.eval_every >= 0, "dpo.eval_every", "must be >= 0")
        require(self.eval_prompts >= 0, "dpo.eval_prompts", "must be >= 0")


Example = tuple[list[int], list[int]]  # (token ids, labels with the prompt masked out)


# ----------------------------------------------------------------------------------------------
# Data: groups of distinct responses with a ranking, encoded like SFT examples


def load_dpo_groups(path: Path, data_format: str) -> list[dict[str, Any]]:
    """{prompt, responses, ranking, pairs} groups; responses distinct, ranking = 0..K-1 (best first)."""
    from rlhf.preferences import load_groups
    from rlhf.rm import distinct_ranking, ranking_pairs

    out = []
    for g in load_groups(path, data_format):  # pairwise / HH records come as [chosen, rejected]
        keep = distinct_ranking(g["responses"], g.get("ranking", [0, 1]))
        k = list(range(len(keep)))
        out.append({"prompt": g["prompt"], "responses": [g["responses"][i] for i in keep], "ranking": k,
                    "pairs": ranking_pairs(k), **({"labeler": g["labeler"]} if "labeler" in g else {})})
    return out


def encode_groups(tokenizer, groups: list[dict[str, Any]], max_len: int) -> tuple[list[dict[str, Any]], list[list[Example]]]:
    """(groups, their encoded responses), without the groups that lost a response to the length limit."""
    from rlhf.training import build_example, fitting_groups

    return fitting_groups(groups, [[build_example(tokenizer, g["prompt"], r, max_len) for r in g["responses"]]
                                   for g in groups])


def batch_logprobs(model, examples: list[Example], pad_id: int, device) -> torch.Tensor:
    """(N,) log π(response | prompt) of each example, summed over response tokens (with grad if enabled)."""
    from rlhf.devices import autocast
    from rlhf.dpo import sequence_logprobs
    from rlhf.training import collate

    ids, mask, labels = (t.to(device) for t in collate(examples, pad_id))
    with autocast(device):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sequence_logprobs(logits, labels)


@torch.no_grad()
def group_logprobs(model, encoded: list[list[Example]], pad_id: int, device, batch_size: int = 128) -> list[torch.Tensor]:
    """Per group, the (K,) log-probabilities of its responses (float32, CPU)."""
    flat = [e for enc in encoded for e in enc]
    parts = [batch_logprobs(model, flat[i: i + batch_size], pad_id, device).float().cpu()
             for i in range(0, len(flat), batch_size)]
    values = torch.cat(parts) if parts else torch.zeros(0)
    return list(values.split([len(enc) for enc in encoded]))


def reference_logprobs(sft: Path, encoded: list[list[Example]], pad_id: int, device, cache: Path | None,
                       tag: str) -> list[torch.Tensor]:
    """log π_ref of every response, computed once with the frozen SFT model (step 3).

    Kept in `cache` (the checkpoint folder, written atomically) so a resumed run does not recompute it.
    """
    from rlhf.io import atomic_path
    from rlhf.models import load_causal_lm

    if cache is not None and cache.is_file():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        if state.get("tag") == tag:
            return list(state["logps"].split(state["sizes"].tolist()))
    ref = load_causal_lm(sft).to(device).eval()
    logps = group_logprobs(ref, encoded, pad_id, device)
    del ref
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            torch.save({"tag": tag, "logps": torch.cat(logps),
                        "sizes": torch.tensor([len(x) for x in logps])}, tmp)
    return logps


# ----------------------------------------------------------------------------------------------
# Diagnostics of the implicit reward


def preference_stats(groups: list[dict[str, Any]], rewards: list[list[float]], logratios: list[list[float]],
                     gold: list[list[float]] | None = None) -> dict[str, Any]:
    """Accuracy of the implicit reward on the labeled pairs (and vs gold), mean chosen / rejected reward and
    margin per pair, and the mean log π/π_ref of the best- and worst-ranked responses."""
    from rlhf.preferences import heldout_metrics

    out = heldout_metrics(groups, rewards, gold)
    pairs = [(r[w], r[l]) for g, r in zip(groups, rewards) for w, l in g["pairs"]]
    out["chosen_reward"] = round(sum(w for w, _ in pairs) / len(pairs), 4)
    out["rejected_reward"] = round(sum(l for _, l in pairs) / len(pairs), 4)
    out["margin"] = round(sum(w - l for w, l in pairs) / len(pairs), 4)
    out["logratio_best"] = round(sum(lr[g["ranking"][0]] for g, lr in zip(groups, logratios)) / len(groups), 4)
    out["logratio_worst"] = round(sum(lr[g["ranking"][-1]] for g, lr in zip(groups, logratios)) / len(groups), 4)
    out["logratio_mean"] = round(sum(sum(lr) / len(lr) for lr in logratios) / len(logratios), 4)
    return out


def implicit(policy: list[torch.Tensor], ref: list[torch.Tensor], beta: float) -> tuple[list[list[float]], list[list[float]]]:
    """(β log π/π_ref, log π/π_ref) per group, as lists."""
    ratios = [(p - r).tolist() for p, r in zip(policy, ref)]
    return [[beta * x for x in lr] for lr in ratios], ratios


# ----------------------------------------------------------------------------------------------
# The stage: a state shared by its steps, one function per step of the recipe


@dataclass
class DPOState:
    """What the steps share: the processes, the tokenizer, the split and encoded groups, and the frozen
    reference's log-probabilities of every response (steps 1-3)."""

    params: Params
    dist: Any
    device: torch.device
    tokenizer: Any
    tag: str
    """Fingerprint of params, SFT and data: keys the checkpoints and the reference cache."""
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    train_enc: list[list[Example]]
    val_enc: list[list[Example]]
    ref_train: list[torch.Tensor]
    ref_val: list[torch.Tensor]
    reference_s: float

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def total_steps(self) -> int:
        return self.params.epochs * (len(self.train) // self.params.batch_size)


def split_groups(params: Params, data: Path, tokenizer, sft: Path) -> tuple[list, list, list, list]:
    """Steps 1-2: (training, held-out) groups, split by prompt as the reward stage splits them, and their
    encodings, without the comparisons that cannot fit the model (docs/models.md)."""
    from rlhf.preferences import split_heldout
    from rlhf.training import training_max_len

    train, val = split_heldout(load_dpo_groups(data, params.data_format), params.val_fraction, params.seed)
    max_len = training_max_len(params.max_len, sft)
    train, train_enc = encode_groups(tokenizer, train, max_len)
    val, val_enc = encode_groups(tokenizer, val, max_len)
    if not val:
        raise StageError(f"{data}: dpo.val_fraction={params.val_fraction} held out no prompt; raise it or add data")
    if len(train) < params.batch_size:
        raise StageError(f"{data}: {len(train)} training comparisons, fewer than dpo.batch_size={params.batch_size}")
    return train, val, train_enc, val_enc


def prepare(params: Params, *, dist, device, tokenizer, sft: Path, data: Path, checkpoints: Path | None) -> DPOState:
    """Steps 1-3: the groups split by prompt, encoded like SFT examples, and log π_ref of every response."""
    from rlhf.training import file_digest, fingerprint

    train, val, train_enc, val_enc = split_groups(params, data, tokenizer, sft)
    pad = tokenizer.pad_token_id
    tag = fingerprint(to_dict(params), file_digest(sft), file_digest(data))
    cache = Path(checkpoints) / "reference_logprobs.pt" if checkpoints else None
    t_ref = time.time()
    ref_lp = reference_logprobs(sft, train_enc + val_enc, pad, device, cache if dist.is_main else None, tag)
    return DPOState(params=params, dist=dist, device=device, tokenizer=tokenizer, tag=tag, train=train, val=val,
                    train_enc=train_enc, val_enc=val_enc, ref_train=ref_lp[: len(train)], ref_val=ref_lp[len(train):],
                    reference_s=time.time() - t_ref)


def train_policy(state: DPOState, *, sft: Path, plots: Path, checkpoints: Path | None):
    """Step 4: the policy starts as SFT; each step's loss over whole prompts of the global batch.

    Returns (policy, the last logged values, the checkpointer, the step resumed from, training seconds)."""
    from rlhf.devices import make_optimizer
    from rlhf.dpo import dpo_loss
    from rlhf.models import load_causal_lm
    from rlhf.training import Checkpointer, cosine_lr, epoch_batches, open_live, train_loop

    s, p, dist, device = state, state.params, state.dist, state.device
    model = load_causal_lm(sft).to(device)
    optimizer = make_optimizer(model.parameters(), p.lr, p.weight_decay, device)
    checkpointer = Checkpointer(checkpoints, s.tag)

    def loss_fn(step: int) -> torch.Tensor:
        idx = dist.shard(epoch_batches(len(s.train), p.batch_size, step, p.seed))
        policy_lp = batch_logprobs(model, [e for i in idx for e in s.train_enc[i]], s.pad, device)  # (N,)
        ref = torch.cat([s.ref_train[i] for i in idx]).to(device)
        loss, _ = dpo_loss(policy_lp, ref, [s.train[i]["ranking"] for i in idx], beta=p.beta, loss=p.loss)
        return loss

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        rewards, ratios = implicit(group_logprobs(model, s.val_enc, s.pad, device), s.ref_val, p.beta)
        stats = preference_stats(s.val, rewards, ratios)
        return {"val_accuracy": stats["accuracy_labels"], "val_margin": stats["margin"]}

    saved = checkpointer.load()
    resumed_from = saved["step"] if saved is not None else 0
    live = open_live(plots, resume=saved is not None) if dist.is_main else None
    del saved  # train_loop loads it again and restores everything
    t_train = time.time()
    total = s.total_steps
    last = train_loop(
        model=model, optimizer=optimizer, loss_fn=loss_fn, total_steps=total,
        lr_at=lambda step: cosine_lr(step, total, lr=p.lr, warmup=p.warmup_steps),
        checkpointer=checkpointer, checkpoint_every=p.checkpoint_every, live=live, description="dpo",
        evaluate=evaluate, eval_every=p.eval_every or total, dist=dist, device=device,
    )
    train_s = time.time() - t_train
    if not dist.same_weights(model):
        raise StageError("dpo: the ranks' weights drifted apart during data-parallel training (a bug, not your "
                         "input); rerun with one process and report it")
    if dist.is_main:
        live.end()
    return model, last, checkpointer, resumed_from, train_s


def preference_report(state: DPOState, model, judge, last: dict[str, float]) -> dict[str, Any]:
    """Step 5: held-out (and a same-sized train subset) preference statistics of the implicit reward."""
    from rlhf.training import epoch_batches

    s, p = state, state.params
    gold = [[judge.score(g["prompt"], r)["total"] for r in g["responses"]] for g in s.val] if judge else None
    val_rewards, val_ratios = implicit(group_logprobs(model, s.val_enc, s.pad, s.device), s.ref_val, p.beta)
    sub = epoch_batches(len(s.train), min(len(s.train), len(s.val)), 0, p.seed + 1)
    tr_rewards, tr_ratios = implicit(group_logprobs(model, [s.train_enc[i] for i in sub], s.pad, s.device),
                                     [s.ref_train[i] for i in sub], p.beta)
    return {
        "train": {"comparisons": len(s.train), "responses": sum(len(g["responses"]) for g in s.train),
                  "pairs": sum(len(g["pairs"]) for g in s.train), "steps": s.total_steps, "per_step": p.batch_size,
                  "train_loss": round(last["train_loss"], 4),
                  "subset": preference_stats([s.train[i] for i in sub], tr_rewards, tr_ratios)},
        "heldout": {**preference_stats(s.val, val_rewards, val_ratios, gold), "prompts": len({g["prompt"] for g in s.val}),
                    "records": len(s.val)},
    }


def test_report(state: DPOState, model, judge, *, sft: Path, prompts: list[str]) -> dict[str, Any]:
    """Step 6, on test prompts (never trained on): KL from SFT of sampled answers, gold of greedy answers."""
    from rlhf.gold import gold_compare
    from rlhf.kl import sampled_kl
    from rlhf.models import load_causal_lm

    p = state.params
    if p.eval_prompts:
        prompts = prompts[: p.eval_prompts]
    ref = load_causal_lm(sft).to(state.device).eval()
    model.eval()
    # KL(π ‖ SFT): one answer per prompt sampled at temperature 1, Σ_t log π/π_ref over its tokens, measured
    # the way evaluate measures every policy (rlhf.kl; the x axis of Gao et al. 2022).
    kl = sampled_kl(model, ref, state.tokenizer, prompts, samples=1, max_new_tokens=p.eval_max_new_tokens, seed=p.seed,
                    batch_size=64, device=state.device).kl
    out: dict[str, Any] = {"kl": round(sum(kl) / len(kl), 4), "prompts": len(prompts)}
    if judge is not None:
        out.update(gold_compare({"sft": ref, "dpo": model}, state.tokenizer, prompts, judge,
                                max_new_tokens=p.eval_max_new_tokens, device=state.device))
    return out


def run(params: Params, *, sft: Path, data: Path, test: Path, world: Path | None, out: Path, metrics: Path,
        plots: Path, checkpoints: Path | None) -> dict[str, Any]:
    from rlhf.dist import start_stage
    from rlhf.gold import load_judge
    from rlhf.lengths import length_tally
    from rlhf.models import load_tokenizer, save_model

    t0 = time.time()
    dist, device = start_stage(params)
    tokenizer = load_tokenizer(sft)
    test_rows = read_jsonl(test, PROMPT_SCHEMA)
    judge = load_judge(world) if dist.is_main else None  # a broken world file fails now, not after training
    if dist.is_main:
        remove_outputs(out, metrics)  # a failed or killed run leaves no stale result behind

    # 1-3. Groups split by prompt, encoded, and the frozen reference's log-probabilities, once.
    lengths = length_tally()  # prompts cut and comparisons dropped to fit the model (docs/models.md)
    state = prepare(params, dist=dist, device=device, tokenizer=tokenizer, sft=sft, data=data, checkpoints=checkpoints)
    # 4. DPO training from SFT.
    model, last, checkpointer, resumed_from, train_s = train_policy(state, sft=sft, plots=plots, checkpoints=checkpoints)
    if not dist.is_main:  # rank 0 evaluates and writes
        return {"rank": dist.rank, "timing": timing(t0, resumed_from=resumed_from)}
    save_model(model, tokenizer, out)
    # 5-6. The implicit reward on held-out preferences; KL and gold on the test prompts.
    result = preference_report(state, model, judge, last)
    result["test"] = test_report(state, model, judge, sft=sft, prompts=[r["prompt"] for r in test_rows])
    result["lengths"] = lengths.report("dpo")
    if dist.enabled:  # absent with one process
        result["processes"] = dist.world_size
    # Wall time: the whole stage; pairs/s: the C(K,2) comparisons of every epoch over training time alone.
    total = state.total_steps
    result["timing"] = {**timing(t0, train_s=train_s, unit="pairs", resumed_from=resumed_from,
                                 done=result["train"]["pairs"] * params.epochs * (total - resumed_from) / max(1, total)),
                        "reference_s": round(state.reference_s, 1)}
    write_json(metrics, result)  # written last: its presence marks a finished run
    checkpointer.clear()  # only now, so a kill before this point still resumes
    return result


def summary(m: dict[str, Any]) -> str:
    if "heldout" not in m:
        return f"rank {m['rank']} done ({m['timing']['wall_s']} s)"
    from rlhf.preferences import heldout_summary

    text = heldout_summary(m) + f"; test KL {m['test']['kl']}"
    if "sft" in m["test"]:
        g = m["test"]
        text += f"; gold on {g['prompts']} test prompts: sft {g['sft']['gold']['total']:.3f} -> dpo {g['dpo']['gold']['total']:.3f}"
    return text + f" ({m['timing']['wall_s']} s, {m['timing']['pairs_per_s']} pairs/s)"
