"""The math of PPO for RLHF, as pure functions on tensors (stages/ppo.py runs the loop).

Names follow CleanRL and the original lm-human-preferences code (Ziegler et al. 2019):
`ratio`, `pg_loss1/2`, `clipfrac`, `approxkl`, GAE's `delta`/`lastgaelam`. Item numbers refer to
docs/ppo.md, which lists them all with their sources.

Shapes: B = sequences, Q = query tokens (left-padded), R = response tokens (right-padded after the
first EOS), V = vocabulary. A response `mask` (B, R) is 1 on real response tokens, the EOS included,
and 0 after it (item 14: rewards and values after EOS are masked).

Gradient accumulation: the losses take `denom`, the number of valid tokens of the whole minibatch,
so that the sum of micro-batch losses equals the loss of the minibatch in one piece (item 17).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf.batching import position_ids
from rlhf.errors import StageError
from rlhf.rm import last_token_index


# ----------------------------------------------------------------------------------------------
# Masked statistics and whitening (item 15)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance (divide by N, not N-1), as lm-human-preferences' `whiten` (item 15)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; positions outside `mask` become 0.

    Item 15 (lm-human-preferences `whiten`, Huang et al. 2022 detail "reward/advantage whitening"):
    advantages are whitened with the mean shifted to 0 (`shift_mean=True`); rewards, when whitened,
    keep their mean (`shift_mean=False`), so the sign of the reward signal survives. Biased variance.

    `all_sum` sums a tensor over data-parallel ranks (`rlhf.dist.Dist.all_sum`): mean and variance are
    then those of every rank's entries together, so N processes whiten their shards exactly as one
    process whitens the whole batch (a per-rank mean would shift each shard by its own mean).
    """
    mask = mask.to(x.dtype)
    total = all_sum or (lambda t: t)  # one process: the sums are this process's own
    count = total(mask.sum()).clamp(min=1)
    mean = total(masked_sum(x, mask)) / count
    var = total(masked_sum((x - mean) ** 2, mask)) / count  # = masked_var with all ranks' entries
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------------------------
# Rewards, KL and GAE (items 10-14)


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real tokens in sampled responses (B, R), and whether each one ended with EOS (B,).

    Item 10: a response is truncated at its first EOS; the EOS itself is kept (it is an action the
    policy took, and the RM reads its score there, item 1). The mask is built from the EOS position,
    not from PAD ids, so a sampled PAD inside a response is never mistaken for padding (item 7).
    """
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    # Position of the first EOS, or R - 1 when the response never stopped.
    first = torch.where(ended, is_eos.long().argmax(-1), torch.full_like(ended, responses.shape[1] - 1, dtype=torch.long))
    steps = torch.arange(responses.shape[1], device=responses.device)
    return (steps.unsqueeze(0) <= first.unsqueeze(1)).long(), ended


def penalize_missing_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Item 10 (lm-human-preferences `penalty_reward_value`, Huang et al. 2022): responses that never
    emitted EOS get a fixed score instead of the RM's, so rambling past the length cap never pays."""
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): `-β (log π − log π_ref)` at every token, plus the RM score at the last one.

    Item 11 (Ziegler et al. 2019; InstructGPT eq. 2). Returns (rewards, non_score_reward, kl), all
    (B, R) and zero after EOS; `kl.sum(1)` is the per-sequence KL that item 12 reports.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores  # the EOS, or the last token if none
    return rewards, non_score_reward, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2016), item 14.

    rewards, values, mask: (B, R). γ = 1 and λ = 0.95 by default (lm-human-preferences). Values and
    rewards after EOS are zeroed first, so the value after the last real token bootstraps 0 (the
    episode ends there: a bandit with one response). Returns (advantages, returns), zero after EOS.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = advantages + values
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# Clipped losses (items 16-18)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_range: float, denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), item 17; all inputs (B, R).

    loss = Σ_masked max(−A·ratio, −A·clip(ratio, 1 ± ε)) / denom. Stats are masked sums over `denom`
    too, so micro-batch stats add up to minibatch means: clipfrac (share of tokens where the clipped
    term is active), approxkl = ½ E[(log ratio)²] (lm-human-preferences), ratio and ratio² (for the
    spread). On the first minibatch of the first epoch ratio ≡ 1 and all of these are trivial (item 18).
    """
    mask = mask.to(logprobs.dtype)
    denom = mask.sum().clamp(min=1) if denom is None else denom
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_sum(torch.max(pg_loss1, pg_loss2), mask) / denom
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((pg_loss2 > pg_loss1).to(mask.dtype), mask) / denom,
            "approxkl": 0.5 * masked_sum(logratio**2, mask) / denom,
            "ratio": masked_sum(ratio, mask) / denom,
            "ratio_sq": masked_sum(ratio**2, mask) / denom,
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
    clip_range: float, denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Item 16: 0.5 · max((V − R)², (clip(V, V_old ± ε_v) − R)²), masked mean (lm-human-preferences)."""
    mask = mask.to(values.dtype)
    denom = mask.sum().clamp(min=1) if denom is None else denom
    vpredclipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_sum(torch.max(vf_losses1, vf_losses2), mask) / denom
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_sum((vf_losses2 > vf_losses1).to(mask.dtype), mask) / denom}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# KL coefficient (item 13)


class FixedKLController:
    """A constant β: InstructGPT used β = 0.02 (item 13)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: β ← β (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon) (item 13).

    `n_steps` is the number of episodes since the last update (the rollout batch size), as in
    lm-human-preferences' `AdaptiveKLController.update`.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise StageError("adaptive KL needs target_kl > 0 and kl_horizon > 0")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult


def make_kl_controller(kl_coef: float, target_kl: float, horizon: int) -> FixedKLController:
    """target_kl = 0 means a fixed β (InstructGPT); > 0 the adaptive controller (Ziegler et al.)."""
    if target_kl > 0:
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)


# ----------------------------------------------------------------------------------------------
# Log-probs, entropy and values of responses (items 6, 8, 19)


def response_logits(model, query_responses: torch.Tensor, mask: torch.Tensor, context_len: int,
                    temperature: float) -> torch.Tensor:
    """Logits that predicted each response token, divided by the sampling temperature: (B, R, V).

    Item 6: position ids count real tokens only, so left-padded queries score exactly as unpadded.
    Item 8: the same temperature T as the rollout, for policy and reference alike (Huang et al. 2022,
    "scale the logits by sampling temperature"); without it the ratio at the first step is not 1.
    """
    # logits[:, t] predicts token t + 1: the response starts at `context_len`, so only the positions
    # context_len - 1 .. T - 2 are needed. `logits_to_keep` runs the LM head on the last R + 1 positions
    # alone (not on the query's); the last one, which predicts past the response, is dropped.
    n_response = query_responses.shape[1] - context_len
    if torch.is_autocast_enabled(query_responses.device.type) and plain_lm_head(model) and not head_sharded(model):
        # Under bf16 autocast (CUDA) the LM head's output would be bf16: 8 bits of mantissa round logits of
        # magnitude 8-32 by up to 0.06 nats, more than the log-ratios PPO clips at 0.2 and the per-token KL
        # it penalizes. The backbone keeps autocast; the head runs in fp32 on the last R positions.
        body = getattr(model, model.base_model_prefix)
        hidden = body(input_ids=query_responses, attention_mask=mask, position_ids=position_ids(mask),
                      use_cache=False).last_hidden_state[:, context_len - 1: -1]
        logits = fp32_linear(model.get_output_embeddings(), hidden)
    else:  # fp32 already (CPU), or a head with extra steps (softcapping, scaling): the model's own forward
        logits = model(input_ids=query_responses, attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False, logits_to_keep=n_response + 1).logits[:, :-1].float()
    # x / 1 is x exactly: skipping it at T = 1 saves a (B, R, V) copy and its backward, nothing else.
    return logits / temperature if temperature != 1.0 else logits


def plain_lm_head(model) -> bool:
    """Whether the causal LM's logits are just its output embedding applied to the backbone's last hidden
    state (Llama, GPT-2, Qwen, ...), with no softcapping (Gemma 2) or logit scale (Cohere) after it."""
    cfg = model.config
    return (model.get_output_embeddings() is not None and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and hasattr(model, model.base_model_prefix))


def head_sharded(model) -> bool:
    """Whether the output head's weight is FSDP-sharded (rlhf.dist): it is whole only inside the model's own
    forward, so the model must run through it (with `head_in_fp32` for fp32 logits)."""
    return hasattr(model.get_output_embeddings().weight, "device_mesh")


def head_in_fp32(model) -> None:
    """Make the causal LM's own forward compute its output head with `fp32_linear`, whatever autocast is
    active. For a sharded policy (`head_sharded`), which response_logits cannot split into body and head:
    its logits, log-probs and KL stay fp32 under bf16 autocast. On fp32 the result is the same op."""
    import functools

    head = model.get_output_embeddings()
    head.forward = functools.partial(fp32_linear, head)


def fp32_linear(linear: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`linear(hidden)` computed in fp32 whatever autocast is active (log-probs from fp32 logits)."""
    weight = linear.weight.float()
    bias = linear.bias.float() if getattr(linear, "bias", None) is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), weight, bias)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) per position: logits (B, R, V), tokens (B, R) -> (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the (temperature-scaled) next-token distribution per position: (B, R, V) -> (B, R)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ValueModel(torch.nn.Module):
    """Per-token values from a sequence-classification model (InstructGPT: value init from the RM, item 19).

    The reward model reads its `score` head at the last token only; the value function applies the
    same head to the backbone's hidden state at every position, plus the RM's demonstration bias
    (`rlhf.rm.apply_reward_bias`, item 3). Without the bias every initial value would be off by it,
    and since the value after the last token is 0, GAE would credit the last token with a spurious
    advantage of +bias in every episode. At initialization the value at the last real token is thus
    exactly the centered reward PPO is trained on. The bias stays a constant in the config: saving
    the wrapped model keeps a standard `AutoModelForSequenceClassification` folder with it.
    """

    def __init__(self, seq_cls_model):
        super().__init__()
        if not hasattr(seq_cls_model, "score"):
            raise StageError(
                f"{type(seq_cls_model).__name__} has no `score` head; the value/reward model must be a "
                "*ForSequenceClassification model with num_labels=1 (e.g. LlamaForSequenceClassification)"
            )
        self.model = seq_cls_model

    @property
    def backbone(self):
        return getattr(self.model, self.model.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        from rlhf.rm import apply_reward_bias

        # The head in fp32 under autocast too (see response_logits); the same op as score(hidden) in fp32.
        return apply_reward_bias(self.model, fp32_linear(self.model.score, hidden).squeeze(-1))  # (B, T)


def disable_dropout(model: torch.nn.Module) -> None:
    """Item 9: no dropout in policy, reference, value or reward model during PPO (Huang et al. 2022).

    With dropout, the log-probs recomputed in the update would differ from the rollout's even before
    any step, so the ratio would not start at 1 (item 18).
    """
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Llama's attention reads `attention_dropout` from the module, not the config.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def rank_seed(seed: int, rank: int) -> int:
    """Item 21: each data-parallel rank samples with its own seed (else all ranks roll out the same text)."""
    return seed * 1_000_003 + rank


def summarize_ratio(stats: dict[str, Any]) -> tuple[float, float]:
    """Mean and variance of the ratio from accumulated means of ratio and ratio²."""
    mean = float(stats["ratio"])
    return mean, max(0.0, float(stats["ratio_sq"]) - mean**2)
