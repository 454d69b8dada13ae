"""grpo: group-relative policy optimization against the reward model (Shao et al. 2024, DeepSeekMath), no critic.

Reads  models/sft (policy init and frozen reference), models/reward (frozen RM),
       data/prepared/{ppo,test,corpus}.jsonl, data/raw/world.json (gold judge, optional)
Writes models/grpo (HF causal-LM folder + tokenizer), metrics/grpo.json (last rollout, held-out test gold,
       alignment tax, and a `timing` block: wall time, episodes/s), plots/grpo (dvclive curves,
       overoptimization.png and overoptimization.csv as ppo's)
Run    rlhf grpo

Each step samples `samples_per_prompt` (G) responses to each of `prompts_per_step` ppo prompts with PPO's
sampler and scores them with PPO's scoring path (rlhf/rollout.py). The advantage of every token of
response i is its RM score (missing-EOS penalty included) normalized within its group,
(r_i − mean r) / (std r + ε); the policy then takes `epochs` optimizer steps on the rollout with PPO's
clipped ratio objective, averaged over each response's tokens, and the KL to SFT as a loss term β·k3
(Shao et al. eq. 3-4), not as a reward penalty. No value model, no pretraining term: compare with ppo_noptx.

Resume, data parallel: as ppo (rlhf/rollout.py checkpoints; each rank samples whole groups with its own
seed, gradients are averaged), see rlhf/critic_free.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import critic_free as CF
from rlhf.params import require


@dataclass(frozen=True)
class Params:
    steps: int
    """Iterations: one rollout of prompts_per_step × samples_per_prompt episodes, then `epochs` optimizer steps."""
    prompts_per_step: int
    """Prompts per rollout."""
    samples_per_prompt: int
    """G: sampled responses per prompt, normalized against each other (>= 2)."""
    epochs: int
    """μ: optimizer steps per rollout, each on the whole rollout (the ratio to the rollout's policy is clipped)."""
    micro_batch_size: int
    """Episodes per forward/backward; gradients accumulate to the whole rollout exactly."""
    lr: float
    """Adam learning rate, annealed linearly to 0 over the run (as ppo)."""
    adam_eps: float
    """Adam ε (as ppo: 1e-5)."""
    adam_beta1: float
    """Adam β1."""
    adam_beta2: float
    """Adam β2."""
    max_grad_norm: float
    """Gradient-norm clip (0 disables)."""
    temperature: float
    """Sampling temperature; logits of policy and reference are divided by it when rescored."""
    max_new_tokens: int
    """Response length cap; a response that reaches it without EOS gets missing_eos_penalty."""
    kl_coef: float
    """β of the loss term β·k3 (per token, averaged over the response as the objective is)."""
    clip_range: float
    """ε of the clipped ratio (0.2 as ppo)."""
    missing_eos_penalty: float
    """Score given instead of the RM's to responses that never emit EOS (as ppo)."""
    heldout_corpus: int
    """Corpus documents for the alignment tax (the same held-out slice as ppo's with the same seed)."""
    corpus_max_len: int
    """Tokens per corpus document for the alignment tax (ppo's ptx_max_len)."""
    eval_prompts: int
    """Held-out test prompts answered greedily by policy and SFT for the gold comparison (0 = all)."""
    checkpoint_every: int
    """Steps between resumable checkpoints (0 disables)."""
    seed: int
    """Seed of the prompt order and sampling."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""

    def validate(self) -> None:
        CF.validate("grpo", self)
        require(self.epochs > 0, "grpo.epochs", "must be > 0")
        require(self.clip_range > 0, "grpo.clip_range", "must be > 0")


def advantages(params: Params, scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """(r_i − mean r) / (std r + ε) within each prompt's G samples, r = the RM score (the KL is in the loss)."""
    return CF.group_normalized(CF.grouped(scores, params.samples_per_prompt)).flatten()


def loss(params: Params, logprobs, old_logprobs, ref_logprobs, adv, mask, denom):
    return CF.grpo_loss(logprobs, old_logprobs, ref_logprobs, adv, mask, clip_range=params.clip_range,
                        kl_coef=params.kl_coef, denom=denom)


ALGORITHM = CF.Algorithm(name="grpo", advantages=advantages, loss=loss, epochs=lambda params: params.epochs)


def run(params: Params, *, sft: Path, reward: Path, data: Path, world: Path | None, out: Path, metrics: Path,
        plots: Path, checkpoints: Path | None) -> dict[str, Any]:
    """Train the policy with GRPO, save it, evaluate on held-out data, write metrics."""
    return CF.run(ALGORITHM, params, sft=sft, reward=reward, data=data, world=world, out=out, metrics=metrics,
                  plots=plots, checkpoints=checkpoints)


def summary(m: dict[str, Any]) -> str:
    return CF.summary(m)
