"""Direct Preference Optimization's math (Rafailov et al. 2023): sequence log-probabilities, the implicit
reward, and the two ways of using a ranking of K answers.

Pure functions, tested against plain loops (tests/test_dpo.py). The stage (stages/dpo.py) lays the
responses of all prompts of a batch out one after another, as the reward model's K-way loss does.

DPO's implicit reward of response y to prompt x is r(x, y) = β (log π(y|x) - log π_ref(y|x)), with
the log-probabilities summed over the response's tokens (and its EOS) only. Two losses over it:

- `pairs`: all C(K,2) (winner, loser) pairs of a prompt in one batch element, each pair weighted
  1/C(K,2) so every prompt counts once: the reward model's K-way loss (rlhf.rm.kway_ranking_loss)
  with DPO's implicit reward in place of the RM's scalar (Rafailov et al. eq. 7, per pair).
- `plackett_luce`: the ranking's likelihood under the Plackett-Luce model (Rafailov et al. appendix
  A.3, eq. 18): -Σ_{k=1}^{K-1} log softmax_{j ≥ k}(r_τ(j))[k], the best answer chosen among all,
  the second among the rest, and so on. For K = 2 both losses are -log σ(r_w - r_l).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside functions, like rlhf.rm
    import torch

LOSSES = ("plackett_luce", "pairs")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t log p(labels[t] | tokens < t) over positions whose label is not IGNORE_INDEX.

    logits (B, T, V) and labels (B, T) as `rlhf.training.masked_lm_loss` takes them (the prompt and
    padding are IGNORE_INDEX, so only the response and its EOS count); a sum, not a mean: DPO compares
    the probabilities of whole responses.
    """
    import torch

    from rlhf.training import IGNORE_INDEX

    targets = labels[:, 1:]  # (B, T-1): logits[:, t] predicts token t + 1
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_lp * keep).sum(-1)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """(N,) r = β (log π(y|x) - log π_ref(y|x)): DPO's reward, defined by the policy itself (eq. 5)."""
    return beta * (policy_logps - ref_logps)


def flat_orders(rankings: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, K_max) flat indices of each group's responses in ranking order (best first), and a validity mask.

    Group g's K_g responses occupy flat positions offset_g .. offset_g + K_g - 1 (as in rlhf.rm.flat_pairs);
    rows of shorter rankings are padded with index 0 and mask False.
    """
    import torch

    width = max(len(r) for r in rankings)
    order = torch.zeros((len(rankings), width), dtype=torch.long)
    valid = torch.zeros((len(rankings), width), dtype=torch.bool)
    offset = 0
    for g, ranking in enumerate(rankings):
        if len(ranking) < 2:
            raise ValueError("a ranking needs at least two responses")
        order[g, : len(ranking)] = torch.tensor(list(ranking)) + offset
        valid[g, : len(ranking)] = True
        offset += len(ranking)
    return order, valid


def plackett_luce_loss(rewards: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over groups of -Σ_{k < K_g - 1} [r_τ(k) - log Σ_{j ≥ k} exp r_τ(j)] (Rafailov et al. eq. 18).

    rewards (N,) flat; order, valid (G, K_max) from `flat_orders`. The last position's term is log 1 = 0
    and is left out. Padding enters the log-sum-exp as a very negative finite number, never -inf, so
    no NaN reaches the gradient of a row that is masked out.
    """
    import torch

    r = rewards[order].masked_fill(~valid, torch.finfo(rewards.dtype).min / 4)  # (G, K_max), best first
    k_max = r.shape[1]
    total = r.new_zeros(r.shape[0])
    for k in range(k_max - 1):
        term = r[:, k] - torch.logsumexp(r[:, k:], dim=-1)  # (G,) log P(τ(k) first among the rest)
        total = total + term * valid[:, k + 1]  # a term only while another response remains after k
    return -total.mean()


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rankings: Sequence[Sequence[int]], *,
             beta: float, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit rewards (N,)) of a batch of groups whose responses are laid out flat, in order.

    rankings[g] lists group g's local response indices best first; every response of a group appears once.
    """
    from rlhf.rm import flat_pairs, kway_ranking_loss, ranking_pairs

    rewards = implicit_rewards(policy_logps, ref_logps, beta)  # (N,)
    if loss == "pairs":
        win, lose, weight = flat_pairs([(len(r), ranking_pairs(r)) for r in rankings])
        dev = rewards.device
        return kway_ranking_loss(rewards, win.to(dev), lose.to(dev), weight.to(dev), len(rankings)), rewards
    if loss == "plackett_luce":
        order, valid = flat_orders(rankings)
        return plackett_luce_loss(rewards, order.to(rewards.device), valid.to(rewards.device)), rewards
    raise ValueError(f"unknown DPO loss {loss!r}; expected one of {LOSSES}")

