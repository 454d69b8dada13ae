"""ppo: PPO-ptx against the reward model (InstructGPT step 3), resumable and watched for reward hacking.

Reads  models/sft (policy init and frozen reference), models/reward (frozen RM; value init),
       data/prepared/{ppo,test,corpus}.jsonl, data/raw/world.json (gold judge, optional)
Writes models/policy (HF causal-LM folder + tokenizer), models/value (HF sequence-classification
       folder: the trained value function), metrics/ppo.json, plots/ppo (dvclive curves of the
       docs/ppo.md item-22 metrics, overoptimization.png and overoptimization.csv)
Run    rlhf ppo          (the controls: rlhf ppo --set rl_coef=0 = SFT + ptx, --set ptx_coef=0 = PPO without
                         ptx; dvc.yaml stages sft_ptx and ppo_noptx, docs/ppo.md "Controls")

The environment is a bandit (Ziegler et al. 2019; InstructGPT sec. 3.5): a random ppo prompt, one
sampled response, reward = RM score at its EOS minus a per-token KL penalty to the SFT model, and
the episode ends. Each step is one rollout of `batch_size` prompts followed by `ppo_epochs` passes
over reshuffled minibatches. Numbered blocks mirror lm-human-preferences' train_policy.py; item
numbers refer to the table in docs/ppo.md, which says how each one is handled and where it comes from.

Resume: every `checkpoint_every` steps the policy, the value model, both optimizers, the KL
controller, the sampling and shuffling generators and the per-step history are saved atomically.
The prompt and pretraining batches are derived from the step number, so a rerun after a kill
continues exactly where the uninterrupted run would be and ends with the same weights (on CPU).

Data parallel: under `accelerate launch` / `torchrun` (rlhf/dist.py) every rank rolls out, scores
and trains on an equal share of the same global batch, with its own sampling seed (item 21);
advantage whitening, the adaptive KL and the logged metrics use all ranks' statistics, gradients are
averaged before clipping, so every rank holds the same weights. Only rank 0 writes. With one process
nothing is communicated and the results are those of a plain `rlhf ppo`.
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
from rlhf.io import timing, write_json
from rlhf.params import require
from rlhf.rollout import PolicyState, Rollout, chunks, linear_anneal
from rlhf.training import IGNORE_INDEX


@dataclass(frozen=True)
class Params:
    steps: int
    """PPO iterations: one rollout of batch_size prompts, then ppo_epochs of updates on it."""
    batch_size: int
    """Prompts (episodes) per rollout."""
    minibatch_size: int
    """Episodes per optimizer step; batch_size / minibatch_size steps per PPO epoch."""
    micro_batch_size: int
    """Episodes per forward/backward; gradients accumulate to the minibatch exactly (item 17)."""
    ppo_epochs: int
    """Passes over each rollout, minibatches reshuffled every pass (lm-human-preferences: 4)."""
    lr: float
    """Policy Adam learning rate, annealed linearly to 0 over the run (lm-human-preferences)."""
    value_lr: float
    """Value-model Adam learning rate (separate network and optimizer, InstructGPT), same annealing."""
    adam_eps: float
    """Adam ε of both optimizers (lm-human-preferences: 1e-5, not PyTorch's 1e-8; docs/ppo.md item 24)."""
    adam_beta1: float
    """Adam β1 of both optimizers (0.9 everywhere)."""
    adam_beta2: float
    """Adam β2 of both optimizers (0.95 here, as pretraining; lm-human-preferences: 0.999; item 24)."""
    max_grad_norm: float
    """Gradient-norm clip for each network (0 disables)."""
    temperature: float
    """Sampling temperature; logits of policy and reference are divided by it when rescored (item 8)."""
    max_new_tokens: int
    """Response length cap; a response that reaches it without EOS gets missing_eos_penalty (item 10)."""
    kl_coef: float
    """β of the per-token KL penalty (InstructGPT: 0.02 fixed); the initial β when target_kl > 0."""
    target_kl: float
    """Target summed KL per response for the adaptive controller (Ziegler et al.: 6); 0 = fixed β (item 13)."""
    kl_horizon: int
    """Adaptive controller horizon in episodes (Ziegler et al.: 10000)."""
    gamma: float
    """GAE discount (1: the episode is one response, item 14)."""
    lam: float
    """GAE λ (0.95, item 14)."""
    clip_range: float
    """PPO ratio clip ε (0.2, item 17)."""
    clip_range_value: float
    """Value clip ε_v around the rollout's values (0.2, item 16)."""
    whiten_rewards: bool
    """Whiten per-token rewards (without mean shift) before GAE (item 15; TRL's whiten_rewards)."""
    missing_eos_penalty: float
    """Score given instead of the RM's to responses that never emit EOS (item 10; lm-human-preferences: -1)."""
    rl_coef: float
    """Weight of the PPO policy loss (1). 0 is the "SFT + ptx" control: no rollouts and no value model; the
    policy takes PPO-ptx's optimizer steps on the same ptx corpus batches, with the RL loss off."""
    ptx_coef: float
    """γ of PPO-ptx: weight of the pretraining LM loss on the corpus (InstructGPT 27.8; 0 disables, item 20)."""
    ptx_batch_size: int
    """Corpus documents per optimizer step for the ptx term."""
    ptx_max_len: int
    """Tokens per corpus document for the ptx term (longer documents are cut)."""
    heldout_corpus: int
    """Corpus documents kept out of ptx to measure the alignment tax (corpus log-likelihood vs SFT)."""
    eval_prompts: int
    """Held-out test prompts answered greedily by policy and SFT for the gold comparison (0 = all)."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Seed of the prompt order, sampling, minibatch shuffling and ptx batches."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""
    fsdp: bool
    """Under a multi-process launch, shard the policy, the value model and their gradients and Adam state across
    the processes (FSDP, rlhf/dist.py) instead of a whole copy on each; the frozen reference and reward model
    stay whole. Checkpoints are sharded; the outputs are ordinary folders. Ignored with one process."""
    lora_r: int
    """LoRA rank (rlhf/lora.py, docs/models.md); 0 trains every weight (the default). > 0: the policy and the value model get adapters (the value's score head trains fully), the reference is the policy with its adapters off; both merged into models/policy and models/value."""
    lora_alpha: float
    """LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_r."""
    lora_dropout: float
    """Dropout on the adapters' input while training (0 = none)."""
    lora_targets: list[str]
    """Names of the linear layers that get adapters (e.g. [q_proj, v_proj]); [all-linear]: every linear layer
    of the transformer body (never the LM head or the score head)."""

    def validate(self) -> None:
        from rlhf.lora import validate_params

        validate_params(self, "ppo")
        for key in ("steps", "batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens",
                    "ptx_batch_size", "ptx_max_len", "kl_horizon"):
            require(getattr(self, key) > 0, f"ppo.{key}", "must be > 0")
        require(self.batch_size % self.minibatch_size == 0, "ppo.minibatch_size", "must divide ppo.batch_size")
        require(self.minibatch_size % self.micro_batch_size == 0, "ppo.micro_batch_size", "must divide ppo.minibatch_size")
        require(self.lr > 0 and self.value_lr > 0, "ppo.lr", "lr and value_lr must be > 0")
        require(self.adam_eps > 0, "ppo.adam_eps", "must be > 0")
        for key in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, key) < 1, f"ppo.{key}", "must be in [0, 1)")
        require(self.temperature > 0, "ppo.temperature", "must be > 0 (PPO needs a stochastic policy)")
        require(self.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
        require(self.target_kl >= 0, "ppo.target_kl", "must be >= 0 (0 = fixed kl_coef)")
        require(0 < self.gamma <= 1, "ppo.gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, "ppo.lam", "must be in [0, 1]")
        require(self.clip_range > 0 and self.clip_range_value > 0, "ppo.clip_range", "clip ranges must be > 0")
        require(self.ptx_coef >= 0, "ppo.ptx_coef", "must be >= 0 (0 disables PPO-ptx)")
        require(self.rl_coef >= 0, "ppo.rl_coef", "must be >= 0 (0 is the SFT + ptx control)")
        require(self.rl_coef > 0 or self.ptx_coef > 0, "ppo.rl_coef", "and ppo.ptx_coef are both 0: nothing would train")
        require(self.heldout_corpus >= 0 and self.eval_prompts >= 0, "ppo.heldout_corpus", "must be >= 0")
        require(self.checkpoint_every >= 0, "ppo.checkpoint_every", "must be >= 0")


# ----------------------------------------------------------------------------------------------
# Helpers


def check_processes(params: Params, processes: int) -> None:
    """Each rank rolls out and updates on an equal share of every batch: the batch sizes must split evenly.

    Equal shares keep every rank in step (the same number of minibatches and collectives) and make
    the mean of the ranks' batch means the global batch mean.
    """
    keys = ("batch_size", "minibatch_size") + (("ptx_batch_size",) if params.ptx_coef > 0 else ())
    for key in keys:
        value = getattr(params, key)
        require(value % processes == 0, f"ppo.{key}",
                f"{value} does not split evenly over {processes} processes; make it a multiple of {processes} "
                "or launch a number of processes that divides it")


def reuses_first_forward(local_batch: int, local_minibatch: int, micro_batch_size: int) -> bool:
    """Whether epoch 0's first update forward can also score the rollout (the policy's and the value's part).

    With one minibatch per PPO epoch (this rank's share) in one micro-batch, that forward comes before any
    optimizer step: the same weights on the same tokens as the no_grad scoring pass, so its detached
    log-probs and values are the rollout's old ones and the scoring pass skips policy and value model
    (one forward of each per step). With several micro-batches their forwards would all have to be held
    with their graphs until GAE has every value, so the general path runs then.
    """
    return local_minibatch == local_batch and len(chunks(local_minibatch, micro_batch_size)) == 1


# ----------------------------------------------------------------------------------------------
# The state of a run: what every step reads and changes


@dataclass(kw_only=True)
class PPOState(PolicyState):
    """Everything a PPO step reads and changes: rlhf.rollout.PolicyState's models, optimizer, generators and
    data, plus the value model, its optimizer and the KL controller.

    A step (`ppo_step`) reads the params and data and changes the weights, the optimizers, `kl_ctl` and
    the two generators; `step` and `history` are where the loop stands. A checkpoint holds exactly the
    changing part (`stateful`, the generators, `step` and `history`).
    """

    value: P.ValueModel
    """Trained: per-token values, initialized from the RM (item 19)."""
    value_opt: torch.optim.Optimizer
    kl_ctl: P.FixedKLController
    reuse: bool
    """Whether epoch 0's first update forward also scores the rollout (`reuses_first_forward`)."""

    def stateful(self) -> dict[str, Any]:
        return {"policy": self.policy, "value": self.value, "policy_opt": self.policy_opt,
                "value_opt": self.value_opt, "kl_ctl": self.kl_ctl}

    def sharded(self) -> dict[str, tuple[Any, Any]]:
        pairs = super().sharded()
        return {**pairs, "value": (self.value, self.value_opt)} if pairs else {}

    @property
    def local_batch(self) -> int:
        """This rank's share of every rollout; the global sizes do not depend on the number of processes."""
        return self.params.batch_size // self.dist.world_size

    @property
    def local_minibatch(self) -> int:
        return self.params.minibatch_size // self.dist.world_size

    @property
    def updates_per_step(self) -> int:
        return self.params.ppo_epochs * (self.params.batch_size // self.params.minibatch_size)

    @property
    def all_sum(self):
        """Whitening statistics over every rank's tokens (item 15); None keeps the one-process arithmetic."""
        return self.dist.all_sum if self.dist.enabled else None


def setup(params: Params, *, sft: Path, reward: Path, data: Path, world: Path | None, checkpoints: Path | None,
          reuse_first_forward: bool = True) -> PPOState:
    """The run's state at step 0, or at the step of this run's last checkpoint when there is one."""
    from rlhf.devices import make_optimizer
    from rlhf.dist import launched_processes
    from rlhf.lora import LoraSettings, trainable_parameters

    check_processes(params, launched_processes())  # before joining: a bad split fails at once on every rank
    # 1-2. Models, data, the policy's optimizer, generators, checkpoint (rlhf.rollout); the value model's
    #      optimizer and the KL controller (item 13).
    fields = RO.base_state(params, sft=sft, reward=reward, files=RO.DataFiles.under(data), world=world,
                           checkpoints=checkpoints,
                           need=("ppo.batch_size", params.batch_size), doc_len=params.ptx_max_len,
                           with_value=True, shuffle=True,
                           ptx_batch_size=params.ptx_batch_size if params.ptx_coef > 0 else 0,
                           lora=LoraSettings.of(params, "ppo"))
    state = PPOState(
        **fields,
        value_opt=make_optimizer(trainable_parameters(fields["value"]), params.value_lr, 0.0, fields["device"],
                                 betas=(params.adam_beta1, params.adam_beta2), eps=params.adam_eps,
                                 fused_on_cpu=not fields["dist"].fsdp),
        kl_ctl=P.make_kl_controller(params.kl_coef, params.target_kl, params.kl_horizon), reuse=False,
    )
    # One minibatch per PPO epoch, in one micro-batch: epoch 0's update forward comes before any optimizer
    # step, so it is the rollout's policy and value model on the rollout's tokens (what item 18 checks).
    state.reuse = reuse_first_forward and reuses_first_forward(state.local_batch, state.local_minibatch,
                                                               params.micro_batch_size)
    # 3. Resume from this run's last checkpoint, if any.
    RO.restore_checkpoint(state)
    return state


# ----------------------------------------------------------------------------------------------
# The steps of one PPO iteration: rollout -> score -> rewards and advantages -> update -> log


def rollout(state: PPOState, step: int) -> Rollout:
    """Steps 1-2: one sampled response to each prompt of the step's batch (position derived from the step;
    this rank's share of it), truncated at its first EOS (rlhf.rollout.sample_rollout)."""
    from rlhf.training import epoch_batches

    params = state.params
    return RO.sample_rollout(state, state.dist.shard(epoch_batches(len(state.data.queries), params.batch_size, step,
                                                                   params.seed)))


def policy_value_forward(state: PPOState, ids: torch.Tensor, mask: torch.Tensor, responses: torch.Tensor,
                         context_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's response logits (b, R, V) at temperature T and log-probs (b, R), and the values (b, R)
    at the positions that predict each response token (lm-human-preferences)."""
    logits, logprobs = RO.policy_forward(state, ids, mask, responses, context_len)
    return logits, logprobs, state.value(ids, mask)[:, context_len - 1: -1]


def score(state: PPOState, ro: Rollout, *, with_policy: bool) -> dict[str, torch.Tensor]:
    """Step 3: reference log-probs and RM scores (rlhf.rollout.score), and (`with_policy`) the old log-probs,
    entropy and values, computed once per rollout under no_grad, in micro-batches. All (B, R), scores (B,)."""
    def forward(x, m, r, context_len):
        logits, logprobs, values = policy_value_forward(state, x, m, r, context_len)
        return {"logprobs": logprobs, "entropy": P.entropy_from_logits(logits), "values": values}

    return RO.score(state, ro, forward if with_policy else None)


def score_with_first_update_forward(state: PPOState, ro: Rollout, roll: dict[str, torch.Tensor],
                                    perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The speed shortcut of `reuses_first_forward`: epoch 0's update forward, with grad, over its one
    minibatch (the rollout in `perm`'s order), run now. Detached, it gives the rollout's old log-probs,
    entropy and values (added to `roll`); the update reuses it, so ratio ≡ 1 and approx KL = clipfrac = 0
    exactly on the first minibatch (item 18). Returns the forward's (logits, logprobs, values)."""
    from rlhf.devices import autocast

    with autocast(state.device):
        held = policy_value_forward(state, ro.ids[perm], ro.mask[perm], ro.responses[perm], ro.context_len)
    with torch.no_grad():
        logits, logprobs, values = (t.detach() for t in held)
        back = torch.argsort(perm)  # rows back in rollout order: x[perm][argsort(perm)] = x
        roll.update(logprobs=logprobs[back], values=values[back], entropy=P.entropy_from_logits(logits)[back])
    return held


@dataclass
class Advantages:
    """Step 4's outputs, all (B, R) but `scores` and `rm_scores` (B,)."""

    rm_scores: torch.Tensor
    scores: torch.Tensor
    """RM scores with missing_eos_penalty for responses without EOS (item 10)."""
    non_score_reward: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def rewards_and_advantages(state: PPOState, ro: Rollout, roll: dict[str, torch.Tensor]) -> Advantages:
    """Step 4: per-token rewards, -β·KL at every token and the score at the last (item 11); GAE (item 14)."""
    params = state.params
    scores = P.penalize_missing_eos(roll["scores"], ro.ended, params.missing_eos_penalty)  # item 10
    rewards, non_score_reward, kl = P.kl_penalized_rewards(scores, roll["logprobs"], roll["ref_logprobs"],
                                                          ro.r_mask, state.kl_ctl.value)
    if params.whiten_rewards:
        rewards = P.whiten(rewards, ro.r_mask, shift_mean=False, all_sum=state.all_sum)  # item 15: keep the mean
    advantages, returns = P.compute_gae(rewards, roll["values"], ro.r_mask, gamma=params.gamma, lam=params.lam)
    return Advantages(rm_scores=roll["scores"], scores=scores, non_score_reward=non_score_reward, kl=kl,
                      advantages=advantages, returns=returns)


def ptx_backward(state: PPOState, update_index: int) -> float:
    """Item 20 (PPO-ptx): backward of γ·(LM loss) on a corpus batch derived from the global update index.

    Returns the rank's weighted LM loss (see below) for the logs.
    """
    from rlhf.devices import autocast
    from rlhf.training import epoch_batches, masked_lm_loss

    params, dist, docs = state.params, state.dist, state.data.ptx_docs
    ptx_idx = dist.shard(epoch_batches(len(docs), params.ptx_batch_size, update_index, params.seed + 2))
    p_ids, p_mask, p_labels = (t.to(state.device) for t in RO.lm_batch([docs[i] for i in ptx_idx],
                                                                       state.tokenizer.pad_token_id))
    with autocast(state.device):
        ptx_loss = masked_lm_loss(state.policy(input_ids=p_ids, attention_mask=p_mask, use_cache=False).logits, p_labels)
    # A rank's token mean, weighted by its share of the global batch's tokens (as the PPO losses' `denom`):
    # the averaged gradient is that of the global batch's token mean. 1 with one process.
    n_tokens = (p_labels[:, 1:] != IGNORE_INDEX).sum()
    ptx_loss = ptx_loss * (n_tokens / dist.all_mean(n_tokens))
    (params.ptx_coef * ptx_loss).backward()
    return float(ptx_loss.detach())


def minibatch_update(state: PPOState, step: int, update_index: int, ro: Rollout, roll: dict[str, torch.Tensor],
                     adv: Advantages, mb: torch.Tensor, held: tuple | None) -> dict[str, float]:
    """Step 5, one optimizer step of each network on minibatch `mb` (episode indices), gradients accumulated
    over micro-batches (item 17), plus the ptx term (item 20). `held`: the shortcut's forward of this
    minibatch, if it was run in step 3. Returns the minibatch's loss statistics (sums over `denom`)."""
    from rlhf.devices import autocast
    from rlhf.training import check_finite

    params, dist = state.params, state.dist
    # Item 15: advantages whitened (mean shifted) per minibatch, as lm-human-preferences does; done before
    # splitting into micro-batches so accumulation keeps minibatch semantics, and over all ranks' shares of
    # the minibatch so N processes whiten like one.
    mb_adv = P.whiten(adv.advantages[mb], ro.r_mask[mb], all_sum=state.all_sum)
    # Item 17: losses are token sums over the minibatch's token count. Under N processes the ranks' mean
    # count: the averaged gradient is then the one-process minibatch gradient.
    denom = dist.all_mean(ro.r_mask[mb].sum()).clamp(min=1)
    state.policy_opt.zero_grad(set_to_none=True)
    state.value_opt.zero_grad(set_to_none=True)
    stats: dict[str, float] = {}
    for sl in chunks(len(mb), params.micro_batch_size):
        mi = mb[sl]
        with autocast(state.device):
            if held is not None:  # epoch 0's forward, already run in step 3
                (_, new_logprobs, new_values), held = held, None
            else:
                _, new_logprobs, new_values = policy_value_forward(state, ro.ids[mi], ro.mask[mi], ro.responses[mi],
                                                                   ro.context_len)
            pg_loss, pg_stats = P.clipped_policy_loss(new_logprobs, roll["logprobs"][mi], mb_adv[sl], ro.r_mask[mi],
                                                      clip_range=params.clip_range, denom=denom)
            vf_loss, vf_stats = P.clipped_value_loss(new_values, roll["values"][mi], adv.returns[mi], ro.r_mask[mi],
                                                     clip_range=params.clip_range_value, denom=denom)
        # Separate networks: each loss reaches only its own parameters.
        (params.rl_coef * pg_loss + vf_loss).backward()
        for k, v in {**pg_stats, **vf_stats, "loss/policy": pg_loss, "loss/value": vf_loss}.items():
            stats[k] = stats.get(k, 0.0) + float(v.detach())
    if params.ptx_coef > 0:
        stats["loss/ptx"] = ptx_backward(state, update_index)
    # The mean over ranks: a NaN on any rank stops every rank (none is left waiting in a collective).
    check_finite(dist.mean(stats["loss/policy"] + stats["loss/value"] + stats.get("loss/ptx", 0.0)),
                 "ppo loss", step, state.checkpointer.directory)
    # Every rank steps with the same averaged gradients, so the weights stay identical (rlhf.dist).
    dist.average_gradients(state.policy)
    dist.average_gradients(state.value)
    if params.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(state.policy.parameters(), params.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(state.value.parameters(), params.max_grad_norm)
    state.policy_opt.step()
    state.value_opt.step()
    return stats


def update(state: PPOState, step: int, ro: Rollout, roll: dict[str, torch.Tensor], adv: Advantages,
           perms: list[torch.Tensor], held: tuple | None) -> tuple[dict[str, float], dict[str, float]]:
    """Step 5: `ppo_epochs` passes over minibatches, reshuffled each epoch by `perms` (item 17).

    Returns the loss statistics averaged over the step's updates and over ranks, and those of the first
    minibatch of epoch 0, where ratio ≡ 1 (item 18).
    """
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    n_updates = 0
    for epoch, perm in enumerate(perms):
        for mb_i, mb_start in enumerate(range(0, state.local_batch, state.local_minibatch)):
            mb = perm[mb_start: mb_start + state.local_minibatch]
            stats = minibatch_update(state, step, step * state.updates_per_step + n_updates, ro, roll, adv, mb,
                                     held if epoch == 0 and mb_i == 0 else None)
            if epoch == 0 and mb_i == 0:
                first = {k: stats[k] for k in ("ratio", "approxkl", "clipfrac")}  # item 18
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    # Loss statistics are sums over `denom` like the losses, so their mean over ranks is the global one.
    return state.dist.means({k: v / n_updates for k, v in sums.items()}), state.dist.means(first)


def rollout_means(state: PPOState, ro: Rollout, roll: dict[str, torch.Tensor], adv: Advantages) -> dict[str, float]:
    """Step 6: rollout statistics (rlhf.rollout.rollout_means) and PPO's per-token KL reward."""
    return RO.rollout_means(state, ro, roll, adv.kl, adv.scores, extra={
        "non_score_reward": float(adv.non_score_reward.sum(1).mean()),
        "rlhf_reward": float((adv.scores + adv.non_score_reward.sum(1)).mean()),
    })


def step_metrics(step: int, g: dict[str, float], means: dict[str, float], first: dict[str, float],
                 beta_used: float) -> dict[str, float]:
    """Step 8: the metrics of item 22 from the rollout means `g` and the update's loss statistics."""
    ratio_mean, ratio_var = P.summarize_ratio(means)
    m = {
        "step": float(step),
        "objective/kl": g["kl"],
        "objective/sqrt_kl": math.sqrt(max(g["kl"], 0.0)),
        "objective/entropy": g["entropy"],
        "objective/non_score_reward": g["non_score_reward"],
        "objective/scores": g["scores"],
        "objective/rm_score": g["rm_score"],
        "objective/rlhf_reward": g["rlhf_reward"],
        "policy/approxkl": means["approxkl"],
        "policy/clipfrac": means["clipfrac"],
        "loss/policy": means["loss/policy"],
        "loss/value": means["loss/value"],
        "val/clipfrac": means["vf_clipfrac"],
        "val/ratio": ratio_mean,
        "val/ratio_var": ratio_var,
        "val/response_length": g["response_length"],
        "val/eos_share": g["eos_share"],
        "kl_coef": beta_used,
        "sanity/first_ratio": first["ratio"],
        "sanity/first_approxkl": first["approxkl"],
        "sanity/first_clipfrac": first["clipfrac"],
    }
    if "loss/ptx" in means:
        m["loss/ptx"] = means["loss/ptx"]
    if "gold" in g:
        m["gold/score"] = g["gold"]
    return m


def ptx_only_step(state: PPOState, step: int) -> dict[str, float]:
    """The "SFT + ptx" control (rl_coef = 0): a PPO step's optimizer steps, each on its own ptx batch alone.

    The same schedule, the same corpus batches (derived from the same update index) and the same number
    of policy updates as PPO-ptx, without rollouts: with the RL loss off they would change nothing.
    """
    from rlhf.training import check_finite, set_lr

    params, dist = state.params, state.dist
    set_lr(state.policy_opt, linear_anneal(step, params.steps, params.lr))
    losses = []
    for n in range(state.updates_per_step):
        state.policy_opt.zero_grad(set_to_none=True)
        losses.append(ptx_backward(state, step * state.updates_per_step + n))
        check_finite(dist.mean(losses[-1]), "ptx loss", step, state.checkpointer.directory)
        dist.average_gradients(state.policy)
        if params.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(state.policy.parameters(), params.max_grad_norm)
        state.policy_opt.step()
    return {"step": float(step), **dist.means({"loss/ptx": sum(losses) / len(losses)})}


def ppo_step(state: PPOState, step: int) -> dict[str, float]:
    """One PPO iteration, the numbered steps of lm-human-preferences' train_policy.py; returns its metrics."""
    from rlhf.training import set_lr

    params = state.params
    if params.rl_coef == 0:
        return ptx_only_step(state, step)
    set_lr(state.policy_opt, linear_anneal(step, params.steps, params.lr))
    set_lr(state.value_opt, linear_anneal(step, params.steps, params.value_lr))
    ro = rollout(state, step)  # 1-2
    # 3. Score once: reference and RM under no_grad; policy and value there too, or, with the shortcut, in
    #    epoch 0's update forward. The minibatch order of every epoch is drawn here (shuffle_gen gives the
    #    same permutations as when each was drawn at the start of its epoch).
    roll = score(state, ro, with_policy=not state.reuse)
    perms = [torch.randperm(state.local_batch, generator=state.shuffle_gen).to(state.device)
             for _ in range(params.ppo_epochs)]
    held = score_with_first_update_forward(state, ro, roll, perms[0]) if state.reuse else None
    adv = rewards_and_advantages(state, ro, roll)  # 4
    means, first = update(state, step, ro, roll, adv, perms, held)  # 5
    g = rollout_means(state, ro, roll, adv)  # 6
    # 7. Adaptive KL (item 13): update β from the global batch's mean KL, n = episodes seen; every rank
    #    updates from the same numbers, so β stays the same on all of them.
    beta_used = state.kl_ctl.value
    state.kl_ctl.update(g["kl"], params.batch_size)
    return step_metrics(step, g, means, first, beta_used)  # 8


# ----------------------------------------------------------------------------------------------
# Training loop, final evaluation, the stage


def progress_info(m: dict[str, float]) -> str:
    if "objective/rm_score" not in m:  # the SFT + ptx control: no rollouts
        return f"ptx {m['loss/ptx']:.3f}"
    return RO.rollout_info(m)


def final_metrics(state: PPOState) -> dict[str, Any]:
    """The last rollout's numbers (training prompts, sampled) and the sanity checks of items 12 and 18."""
    params, history, last = state.params, state.history, state.history[-1]
    if params.rl_coef == 0:  # the SFT + ptx control: no rollouts to report
        return {"steps": params.steps, "control": "sft+ptx (rl_coef 0: no rollouts, no value model)",
                "final_ptx_loss": round(last["loss/ptx"], 4)}
    return {
        "steps": params.steps,
        "episodes": params.steps * params.batch_size,
        "prompts": len(state.data.prompts),
        "prompts_too_long": state.data.prompts_too_long,
        "final_rollout": RO.final_rollout(last),
        # Items 12 and 18, checked on every step of this run.
        "sanity": {
            **RO.kl_sanity(history),
            "first_minibatch_max_abs_ratio_minus_1": round(max(abs(h["sanity/first_ratio"] - 1) for h in history), 8),
            "first_minibatch_max_approxkl": round(max(h["sanity/first_approxkl"] for h in history), 10),
            "first_minibatch_max_clipfrac": round(max(h["sanity/first_clipfrac"] for h in history), 6),
        },
    }


def lora_metrics(state: PPOState) -> dict[str, Any]:
    """{"lora": rank and parameter counts of policy and value model} under LoRA, else {} (a full fine-tuning's
    metrics stay as they were)."""
    from rlhf.lora import parameter_counts

    if state.params.lora_r == 0:
        return {}
    return {"lora": {"r": state.params.lora_r, "reference": "policy with adapters off",
                     "policy": parameter_counts(state.policy), "value": parameter_counts(state.value)}}


def run(params: Params, *, sft: Path, reward: Path, data: Path, world: Path | None, out: Path, value_out: Path,
        metrics: Path, plots: Path, checkpoints: Path | None, reuse_first_forward: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the policy with PPO-ptx, save policy and value model, evaluate on held-out data, write metrics.

    `reuse_first_forward=False` turns off the shortcut of `reuses_first_forward` (tests compare both
    paths); `on_step(step, metrics)` is called at the end of every step (bench/ppo_vs_trl.py times it).
    """
    from rlhf.lengths import open_length_tally, warn_rarely_ended
    from rlhf.models import save_model
    from rlhf.lora import merged

    t0 = time.time()
    # 1. State: models, optimizers, KL controller, generators, data; resumed from a checkpoint if any.
    state = setup(params, sft=sft, reward=reward, data=data, world=world, checkpoints=checkpoints,
                  reuse_first_forward=reuse_first_forward)
    start, dist = state.step, state.dist
    # 2. Train. The dvclive folder is rebuilt from the checkpoint's history, so a resumed run never logs a
    #    step twice.
    live = RO.start_live(state, Path(plots))
    t_train = time.time()
    RO.train(state, ppo_step, live, "ppo", progress_info, on_step)
    t_train = time.time() - t_train
    RO.check_same_weights(state, "ppo", state.policy, state.value)
    sharded = bool(state.sharded())
    RO.gather_trained(state)  # under FSDP: the whole policy and value model on rank 0
    if not dist.is_main:  # rank 0 saves the models, runs the held-out evaluation and writes the metrics
        return {"rank": dist.rank, "sharded": sharded, "timing": timing(t0, train_s=t_train, resumed_from=start)}
    live.end()
    RO.write_overoptimization(state.history, Path(plots))
    t_eval = time.time()
    # 3. Metrics: the last rollouts (training prompts, sampled), then held-out evaluation only; before saving,
    #    which under LoRA folds the adapters into the policy that is also the reference (rlhf.lora).
    result = {**final_metrics(state), **RO.evaluate_heldout(state), "lengths": open_length_tally().report("ppo"),
              **lora_metrics(state)}
    # 4. Outputs: the policy (HF causal LM + tokenizer) and the value model (HF sequence classifier).
    save_model(merged(state.policy), state.tokenizer, out)
    if params.rl_coef > 0:  # the SFT + ptx control trains no value model
        save_model(merged(state.value.model), state.tokenizer, value_out)
    if state.history and "val/eos_share" in state.history[0]:  # the first rollout is SFT's own
        warn_rarely_ended("ppo", state.history[0]["val/eos_share"], params.max_new_tokens, "ppo.max_new_tokens")
    if dist.enabled:  # absent with one process, whose metrics file stays as it always was
        result["processes"] = dist.world_size
        if sharded:
            result["fsdp"] = True
    # Episodes (sampled responses) per second of the training loop; the SFT + ptx control samples none: steps/s.
    rl = params.rl_coef > 0
    result["timing"] = {**timing(t0, train_s=t_train, done=(params.steps - start) * (params.batch_size if rl else 1),
                                 unit="episodes" if rl else "steps", resumed_from=start),
                        "eval_s": round(time.time() - t_eval, 1)}
    write_json(metrics, result)
    state.checkpointer.clear()
    return result


def summary(m: dict[str, Any]) -> str:
    if "rank" in m:  # a data-parallel rank other than 0: it trained, rank 0 reports
        held = "its shards gathered on rank 0" if m.get("sharded") else "weights identical to rank 0's"
        return f"rank {m['rank']} done, {held} ({m['timing']['wall_s']} s)"
    r = m.get("final_rollout", {})
    if "control" in m:
        text = f"{m['steps']} steps of ptx alone (SFT + ptx control); ptx loss {m['final_ptx_loss']}"
    else:
        text = f"{m['steps']} steps; last rollout rm {r['rm_score']}, kl {r['kl']}"
    if "processes" in m:
        text += f" ({m['processes']} processes)"
    if "gold" in r:
        text = f"{text}, gold {r['gold']}"
    t = m.get("test", {})
    if "gold" in t.get("policy", {}):
        text += f"; test gold sft {t['sft']['gold']['total']:.3f} -> policy {t['policy']['gold']['total']:.3f}"
    if "corpus_logprob" in m:
        text += f"; alignment tax {m['corpus_logprob']['tax']} nats/token"
    if m["timing"]["resumed_from"]:
        text += f" (resumed from step {m['timing']['resumed_from']})"
    return text + f" ({m['timing']['wall_s']} s)"
