"""Batches for a forward pass: padding, positions, logits and log-probabilities.

Conventions (docs/ppo.md, item 6): batches for generation and scoring are left-padded, and forward
passes take `position_ids = cumsum(mask) - mask`, so a padded sequence gets the same logits as the same
sequence unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.devices import autocast
from rlhf.lengths import fit_pair, note_lengths, position_limit


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, *,
                  side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask of `seqs`, padded with `pad_value` on the left (generation, scoring) or the
    right (teacher-forced losses); T is the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the left."""
    return pad_sequences(seqs, pad_id, side="left")


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the right."""
    return pad_sequences(seqs, pad_id, side="right")


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """docs/ppo.md item 6: positions count real tokens only, so left padding does not shift them."""
    return (mask.cumsum(-1) - mask).clamp(min=0)


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under logits / temperature; logits (B, T, V), targets (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def continuation_loglik(
    model, tokenizer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
    device: torch.device,
) -> list[float]:
    """Summed log-likelihood of each continuation given its context (lm-evaluation-harness style).

    The model reads every token but the last (whose next-token logits nothing needs), so a pair fits in
    limit + 1 tokens, as in lm-evaluation-harness; a longer one loses the start of its context (counted),
    and a continuation longer than that its first tokens.
    """
    limit = position_limit(model)
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(list(c), list(x)) for c, x in pairs[start: start + batch_size]]
        if limit is not None:
            cut = sum(len(c) + len(x) > limit + 1 for c, x in chunk)
            if cut:
                note_lengths(limit, truncated=cut)
                chunk = [fit_pair(c, x, limit + 1) for c, x in chunk]
        ids, mask = left_pad([c + x for c, x in chunk], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device):
            logits = forward_logits(model, ids[:, :-1], mask[:, :-1])  # left-padded: column -1 is each last token
        lp = token_logprobs(logits, ids[:, 1:])  # (B, T-1): log p(token t+1 | ..t)
        width = ids.shape[1]
        for i, (_, x) in enumerate(chunk):
            n = len(x)
            out.append(float(lp[i, width - 1 - n: width - 1].sum()) if n else 0.0)
    return out
