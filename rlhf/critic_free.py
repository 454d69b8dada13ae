"""Critic-free policy gradients from k samples per prompt: RLOO and GRPO (stages/rloo.py, stages/grpo.py).

Both sample k responses to each of `prompts_per_step` prompts with PPO's sampler and score them with
PPO's scoring path (rlhf/rollout.py: the RM score with its demonstration bias, the missing-EOS penalty,
log-probs of policy and SFT at the sampling temperature). What replaces PPO's value model is the other
samples of the same prompt:

- RLOO (Ahmadian et al. 2024, "Back to Basics"): sequence reward R_i = score_i − β·KL_i (KL summed over
  the response's tokens, as PPO's penalty), advantage A_i = R_i − mean_{j≠i} R_j, and the REINFORCE loss
  −A_i · Σ_t log π(y_t), one on-policy optimizer step per rollout.
- GRPO (Shao et al. 2024, DeepSeekMath eq. 3-4): A_i = (r_i − mean(r)) / (std(r) + ε) over the group's RM
  scores, applied to every token; PPO's clipped ratio objective, mean over each response's tokens; the KL
  to SFT is a loss term β·k3 with k3 = exp(ref − logp) − (ref − logp) − 1, not a reward penalty.

Shapes: B = P·k sequences, groups contiguous (rows i·k .. i·k + k − 1 answer prompt i); R response tokens.
Losses take `denom`, the number of sequences of the batch, so micro-batch losses add up to the batch's.

Data parallel: every rank holds whole groups (prompts are sharded, then each is sampled k times), so the
baselines need no communication; each rank's loss is a mean over its equal share of sequences, and the
averaged gradient is the one-process gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import ppo as P
from rlhf import rollout as RO
from rlhf.errors import StageError

GRPO_EPS = 1e-4
"""ε of GRPO's group normalization (TRL's GRPOTrainer): a group whose k scores are equal gets advantage 0."""

# ----------------------------------------------------------------------------------------------
# Advantage estimators and losses


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages (P, k): each sample's reward minus the mean reward of the other k − 1 samples."""
    k = rewards.shape[1]
    if k < 2:
        raise StageError("leave-one-out needs at least 2 samples per prompt")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def group_normalized(rewards: torch.Tensor, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO's advantages (P, k): (r − group mean) / (group std + ε), the std unbiased (over k − 1)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate k3 = π_ref/π − log(π_ref/π) − 1 (Schulman 2020; Shao et al. eq. 4): ≥ 0, unbiased."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def rloo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with the leave-one-out baseline: −Σ_i A_i Σ_t log π(y_i,t) / denom; logprobs, mask (b, R), A (b,)."""
    mask = mask.to(logprobs.dtype)
    seq_logprob = (logprobs * mask).sum(1)
    loss = -(advantages * seq_logprob).sum() / denom
    return loss, {}


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_range: float, kl_coef: float,
              denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shao et al. eq. 3: −Σ_i (1/|o_i|) Σ_t [min(ρ A_i, clip(ρ, 1 ± ε) A_i) − β k3] / denom, ρ = π/π_old.

    logprobs, old_logprobs, ref_logprobs, mask (b, R); advantages (b,). Stats are the same per-response
    token means over `denom`: clipfrac (share of tokens where the clipped term is the smaller), the
    k3 KL, and approxkl = ½ E[(log ρ)²] as PPO reports it.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(1).clamp(min=1)
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    adv = advantages.unsqueeze(1)
    surr1, surr2 = ratio * adv, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -(torch.min(surr1, surr2) - kl_coef * kl)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return ((x * mask).sum(1) / lengths).sum() / denom

    with torch.no_grad():
        stats = {"clipfrac": mean((surr2 < surr1).to(mask.dtype)), "kl_k3": mean(kl),
                 "approxkl": 0.5 * mean(logratio**2)}
    return mean(per_token), stats


# ----------------------------------------------------------------------------------------------
# The stage loop shared by rloo and grpo


@dataclass(frozen=True)
class Algorithm:
    """What distinguishes rloo from grpo: its name, advantages from the scored rollout, its loss and epochs."""

    name: str
    advantages: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
    """(params, scores (B,), rewards = scores − β·KL (B,)) -> advantages (B,)."""
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    """(params, logprobs, old_logprobs, ref_logprobs, advantages, mask, denom) -> (loss, stats)."""
    epochs: Callable[[Any], int]
    """Optimizer steps per rollout, each on the whole rollout."""


def grouped(values: torch.Tensor, k: int) -> torch.Tensor:
    """(P·k,) -> (P, k): the rows of one prompt's samples."""
    return values.view(-1, k)


def validate(name: str, params) -> None:
    """The checks every critic-free stage's Params share (`<name>.<key>` in the errors)."""
    from rlhf.params import require

    for key in ("steps", "prompts_per_step", "micro_batch_size", "max_new_tokens", "corpus_max_len"):
        require(getattr(params, key) > 0, f"{name}.{key}", "must be > 0")
    require(params.samples_per_prompt >= 2, f"{name}.samples_per_prompt",
            "must be >= 2 (the baseline is the other samples)")
    require(params.lr > 0 and params.adam_eps > 0, f"{name}.lr", "lr and adam_eps must be > 0")
    for key in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(params, key) < 1, f"{name}.{key}", "must be in [0, 1)")
    require(params.temperature > 0, f"{name}.temperature", "must be > 0 (a policy gradient needs a stochastic policy)")
    require(params.kl_coef >= 0, f"{name}.kl_coef", "must be >= 0")
    require(params.heldout_corpus >= 0 and params.eval_prompts >= 0, f"{name}.heldout_corpus", "must be >= 0")
    require(params.checkpoint_every >= 0, f"{name}.checkpoint_every", "must be >= 0")


def check_processes(name: str, params, processes: int) -> None:
    """Each rank takes an equal share of the step's prompts, all k samples of each."""
    from rlhf.params import require

    require(params.prompts_per_step % processes == 0, f"{name}.prompts_per_step",
            f"{params.prompts_per_step} does not split evenly over {processes} processes; make it a multiple of "
            f"{processes} or launch a number of processes that divides it")


def setup(algo: Algorithm, params, *, sft: Path, reward: Path, data: Path, world: Path | None,
          checkpoints: Path | None) -> RO.PolicyState:
    """The run's state at step 0, or at the step of this run's last checkpoint when there is one; `data` is
    the prepared data folder (its ppo, test and corpus files, `rlhf.rollout.DataFiles.under`)."""
    from rlhf.dist import launched_processes

    check_processes(algo.name, params, launched_processes())  # before joining: fails at once on every rank
    state = RO.PolicyState(**RO.base_state(
        params, sft=sft, reward=reward, files=RO.DataFiles.under(data), world=world, checkpoints=checkpoints,
        need=(f"{algo.name}.prompts_per_step", params.prompts_per_step), doc_len=params.corpus_max_len,
        with_value=False, shuffle=False))
    RO.restore_checkpoint(state)
    return state


def group_indices(state: RO.PolicyState, step: int) -> list[int]:
    """The step's prompts (derived from the step; this rank's share), each repeated k times in a row."""
    from rlhf.training import epoch_batches

    params = state.params
    prompts = state.dist.shard(epoch_batches(len(state.data.queries), params.prompts_per_step, step, params.seed))
    return [i for i in prompts for _ in range(params.samples_per_prompt)]


def update(algo: Algorithm, state: RO.PolicyState, step: int, ro: RO.Rollout, roll: dict[str, torch.Tensor],
           adv: torch.Tensor) -> dict[str, float]:
    """`algo.epochs` optimizer steps, each on the whole rollout in micro-batches; mean loss statistics."""
    from rlhf.devices import autocast
    from rlhf.training import check_finite

    params, dist = state.params, state.dist
    n, epochs = ro.ids.shape[0], algo.epochs(params)
    sums: dict[str, float] = {}
    for _ in range(epochs):
        state.policy_opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for sl in RO.chunks(n, params.micro_batch_size):
            with autocast(state.device):
                _, logprobs = RO.policy_forward(state, ro.ids[sl], ro.mask[sl], ro.responses[sl], ro.context_len)
                loss, st = algo.loss(params, logprobs, roll["logprobs"][sl], roll["ref_logprobs"][sl], adv[sl],
                                     ro.r_mask[sl], float(n))
            loss.backward()
            for k, v in {"loss/policy": loss, **st}.items():
                stats[k] = stats.get(k, 0.0) + float(v.detach())
        # The mean over ranks: a NaN on any rank stops every rank (none is left waiting in a collective).
        check_finite(dist.mean(stats["loss/policy"]), f"{algo.name} loss", step, state.checkpointer.directory)
        dist.average_gradients(state.policy)  # every rank steps with the same gradients: the same weights
        if params.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(state.policy.parameters(), params.max_grad_norm)
        state.policy_opt.step()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    return dist.means({k: v / epochs for k, v in sums.items()})


def train_step(algo: Algorithm, state: RO.PolicyState, step: int) -> dict[str, float]:
    """One iteration: sample k responses per prompt, score them, advantages from the group, update, metrics."""
    from rlhf.training import set_lr

    params = state.params
    set_lr(state.policy_opt, RO.linear_anneal(step, params.steps, params.lr))
    ro = RO.sample_rollout(state, group_indices(state, step))
    roll = RO.score(state, ro, RO.policy_scores(state))
    scores = P.penalize_missing_eos(roll["scores"], ro.ended, params.missing_eos_penalty)  # item 10
    kl = (roll["logprobs"] - roll["ref_logprobs"]) * ro.r_mask  # (B, R), summed: the sequence KL to SFT
    rewards = scores - params.kl_coef * kl.sum(1)
    adv = algo.advantages(params, scores, rewards)
    losses = update(algo, state, step, ro, roll, adv)
    g = RO.rollout_means(state, ro, roll, kl, scores, extra={"rlhf_reward": float(rewards.mean()),
                                                              "advantage_abs": float(adv.abs().mean())})
    m = {"step": float(step), "objective/kl": g["kl"], "objective/sqrt_kl": math.sqrt(max(g["kl"], 0.0)),
         "objective/entropy": g["entropy"], "objective/scores": g["scores"], "objective/rm_score": g["rm_score"],
         "objective/rlhf_reward": g["rlhf_reward"], "objective/advantage_abs": g["advantage_abs"],
         "val/response_length": g["response_length"], "val/eos_share": g["eos_share"], "kl_coef": params.kl_coef}
    m.update({k if "/" in k else f"policy/{k}": v for k, v in losses.items()})
    if "gold" in g:
        m["gold/score"] = g["gold"]
    return m


def final_metrics(state: RO.PolicyState) -> dict[str, Any]:
    """The last rollout's numbers and the KL check over the run."""
    params = state.params
    episodes = params.prompts_per_step * params.samples_per_prompt
    return {
        "steps": params.steps, "episodes": params.steps * episodes, "prompts": len(state.data.prompts),
        "prompts_too_long": state.data.prompts_too_long, "samples_per_prompt": params.samples_per_prompt,
        "final_rollout": RO.final_rollout(state.history[-1]), "sanity": RO.kl_sanity(state.history),
    }


def run(algo: Algorithm, params, *, sft: Path, reward: Path, data: Path, world: Path | None, out: Path,
        metrics: Path, plots: Path, checkpoints: Path | None,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the policy with `algo`, save it, evaluate on held-out data, write metrics (rank 0)."""
    from rlhf.io import timing, write_json
    from rlhf.lengths import open_length_tally
    from rlhf.models import save_model

    t0 = time.time()
    state = setup(algo, params, sft=sft, reward=reward, data=data, world=world, checkpoints=checkpoints)
    start, dist = state.step, state.dist
    live = RO.start_live(state, Path(plots))
    t_train = time.time()
    RO.train(state, lambda s, step: train_step(algo, s, step), live, algo.name, RO.rollout_info, on_step)
    t_train = time.time() - t_train
    RO.check_same_weights(state, algo.name, state.policy)
    if not dist.is_main:  # rank 0 saves the model, runs the held-out evaluation and writes the metrics
        return {"rank": dist.rank, "timing": timing(t0, train_s=t_train, resumed_from=start)}
    live.end()
    RO.write_overoptimization(state.history, Path(plots))
    save_model(state.policy, state.tokenizer, out)
    result = {**RO.evaluate_heldout(state), "lengths": open_length_tally().report(algo.name)}
    if dist.enabled:
        result["processes"] = dist.world_size
    result.update(final_metrics(state))
    # Episodes (sampled responses) per second of this invocation's training loop.
    result["timing"] = timing(t0, train_s=t_train, unit="episodes", resumed_from=start,
                              done=(params.steps - start) * params.prompts_per_step * params.samples_per_prompt)
    write_json(metrics, result)
    state.checkpointer.clear()
    return result


def summary(m: dict[str, Any]) -> str:
    """The CLI's line for a finished rloo or grpo run."""
    if "rank" in m:  # a data-parallel rank other than 0: it trained, rank 0 reports
        return f"rank {m['rank']} done, weights identical to rank 0's ({m['timing']['wall_s']} s)"
    r = m["final_rollout"]
    text = f"{m['steps']} steps x {m['episodes'] // m['steps']} episodes; last rollout rm {r['rm_score']}, kl {r['kl']}"
    if "processes" in m:
        text += f" ({m['processes']} processes)"
    if "gold" in r:
        text += f", gold {r['gold']}"
    t = m.get("test", {})
    if "gold" in t.get("policy", {}):
        text += f"; test gold sft {t['sft']['gold']['total']:.3f} -> policy {t['policy']['gold']['total']:.3f}"
    if m["timing"]["resumed_from"]:
        text += f" (resumed from step {m['timing']['resumed_from']})"
    return text + f" ({m['timing']['episodes_per_s']} episodes/s, {m['timing']['wall_s']} s)"
