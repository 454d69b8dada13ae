"""rloo: REINFORCE with a leave-one-out baseline against the reward model (Ahmadian et al. 2024), no critic.

Reads  models/sft (policy init and frozen reference), models/reward (frozen RM),
       data/prepared/{ppo,test,corpus}.jsonl, data/raw/world.json (gold judge, optional)
Writes models/rloo (HF causal-LM folder + tokenizer), metrics/rloo.json (last rollout, held-out test gold,
       alignment tax, and a `timing` block: wall time, episodes/s), plots/rloo (dvclive curves,
       overoptimization.png and overoptimization.csv as ppo's)
Run    rlhf rloo

Each step samples `samples_per_prompt` (k) responses to each of `prompts_per_step` ppo prompts with PPO's
sampler and scores them with PPO's scoring path (rlhf/rollout.py). A response's reward is its RM score
(missing-EOS penalty included) minus β times its KL to SFT summed over tokens, the same leash as PPO's
per-token penalty; its advantage is its reward minus the mean reward of the other k − 1 samples of the
same prompt, and the policy takes one REINFORCE step, −Σ_i A_i log π(y_i | x), per rollout (on-policy:
no ratio, no clipping, no value model). No pretraining term: compare with ppo_noptx.

Resume, data parallel: as ppo (rlhf/rollout.py checkpoints; each rank samples whole groups with its own
seed, gradients are averaged), see rlhf/critic_free.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import critic_free as CF


@dataclass(frozen=True)
class Params:
    steps: int
    """Iterations: one rollout of prompts_per_step × samples_per_prompt episodes, then one optimizer step."""
    prompts_per_step: int
    """Prompts per rollout."""
    samples_per_prompt: int
    """k: sampled responses per prompt; each one's baseline is the mean reward of the other k − 1 (>= 2)."""
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
    """β: reward = RM score − β · KL(policy ‖ SFT) summed over the response's tokens (ppo's kl_coef)."""
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
        CF.validate("rloo", self)


def advantages(params: Params, scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """R_i − mean_{j≠i} R_j within each prompt's k samples, R = score − β·KL."""
    return CF.leave_one_out(CF.grouped(rewards, params.samples_per_prompt)).flatten()


def loss(params: Params, logprobs, old_logprobs, ref_logprobs, adv, mask, denom):
    """REINFORCE: the KL is in the reward already; old and reference log-probs are not needed here."""
    return CF.rloo_loss(logprobs, adv, mask, denom=denom)


ALGORITHM = CF.Algorithm(name="rloo", advantages=advantages, loss=loss, epochs=lambda params: 1)


def run(params: Params, *, sft: Path, reward: Path, data: Path, world: Path | None, out: Path, metrics: Path,
        plots: Path, checkpoints: Path | None) -> dict[str, Any]:
    """Train the policy with RLOO, save it, evaluate on held-out data, write metrics."""
    return CF.run(ALGORITHM, params, sft=sft, reward=reward, data=data, world=world, out=out, metrics=metrics,
                  plots=plots, checkpoints=checkpoints)


def summary(m: dict[str, Any]) -> str:
    return CF.summary(m)
