"""Sampling responses with the KV cache: nucleus filtering, exact categorical draws, the decoding loop.

Rollouts sample with no top-k / top-p (docs/ppo.md, item 8); a prompt too long for the model's positions
with the response cap is cut on the left and counted (rlhf.lengths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf.batching import left_pad, position_ids
from rlhf.decode import LlamaDecoder
from rlhf.decode import supports as decode_supports
from rlhf.devices import autocast, autocast_dtype
from rlhf.lengths import fit_queries
from rlhf.tokenization import decode_response, encode_prompt


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (Holtzman et al. 2020); (B, V).

    A token is kept when the mass of the tokens ranked above it is < top_p, so the most likely token is
    always kept and the set is the smallest one with mass >= top_p.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of better-ranked tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index whose slice of [0, total) holds u·total, per row: probs (B, V), u (B, 1) in [0, 1) -> (B,).

    The cumulative sum is taken in float64. In float32 its spacing near 1 is 6e-8, so a token of
    probability below ~3e-8 that comes after most of the mass adds nothing to the running sum: its
    slice is empty and it is never drawn, however many such tokens a large vocabulary holds. float64
    resolves 1e-16. A token of probability 0 has an empty slice and is never returned, also when
    u·total rounds up to the total itself: the index is capped at the last token of positive probability.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    index = torch.searchsorted(cdf, u.double() * total, right=True)
    last_positive = torch.searchsorted(cdf, total, right=False)  # first index where the sum reaches the total
    return torch.minimum(index, last_positive).squeeze(-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` (B, V), drawn with probability probs[b, i] (rows need not sum to 1).

    Inverse-CDF sampling (`inverse_cdf`): one float64 uniform draw per row, located in the row's float64
    cumulative sum. Exact like `torch.multinomial(probs, 1)`, whose CPU kernel draws an exponential variate
    for every vocabulary entry (B·V draws instead of B: ~15% of a rollout step on the default model).
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, u)


def sample_tokens(
    model,
    queries: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    device: torch.device,
    top_p: float = 1.0,
    stop_together: Callable[[bool], bool] | None = None,
) -> torch.Tensor:
    """Sample responses for a batch of queries with the KV cache; returns (B, max_new_tokens) ids.

    Temperature 0 means greedy. Rollouts use no top-k / top-p (docs/ppo.md item 8); `top_p` < 1 is for
    protocols that ask for nucleus sampling (RealToxicityPrompts: 0.9). Positions after
    a sequence's first EOS are filled with PAD. The loop stops early once every sequence has ended.
    A query too long for the model's positions with `max_new_tokens` is cut on the left (`fit_queries`).
    `stop_together(all_ended)`: for an FSDP-sharded model (rlhf.dist), whose every forward is a collective,
    whether every rank's batch has ended (Dist.all_true), so that all ranks stop at the same step.
    """
    from rlhf.dist import is_sharded

    sharded = is_sharded(model)
    ids, mask = left_pad(fit_queries(model, queries, max_new_tokens), pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch, width = ids.shape
    # The whole attention mask up front (queries' padding, then 1 for every new token), sliced each step.
    full_mask = torch.cat([mask, mask.new_ones((batch, max_new_tokens))], dim=1)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pos = position_ids(mask)
    past = None
    step_ids = ids
    # inference_mode rather than no_grad: a step is ~100 small ops on (B, 1) tokens, and leaving out
    # autograd's view and version tracking makes a rollout ~8% faster here (bench/README.md). Not for a
    # sharded model: FSDP would gather its weights into inference tensors that training cannot use after.
    with torch.no_grad() if sharded else torch.inference_mode():
        # Llama models take the lean incremental forward of rlhf.decode (same logits, less overhead); it reads
        # the weights directly, which a sharded model holds in pieces.
        decoder = (LlamaDecoder(model, full_mask, weight_dtype=autocast_dtype(device))
                   if decode_supports(model) and not sharded else None)
        for t in range(max_new_tokens):
            with autocast(device):
                if decoder is not None:
                    logits = decoder.forward(step_ids, pos).float()
                else:
                    # logits_to_keep=1: only the last position's logits are needed to pick the next token.
                    res = model(input_ids=step_ids, attention_mask=full_mask[:, : width + t], position_ids=pos,
                                cache=past, use_cache=True, logits_to_keep=1)
                    past = res.cache
                    logits = res.logits[:, -1, :].float()
            if temperature > 0:
                if temperature != 1.0:  # x / 1 is x: the division would only copy
                    logits = logits / temperature
                nxt = sample_categorical(torch.softmax(top_p_filter(logits, top_p), dim=-1), generator)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            done |= nxt == eos_id
            if stop_together(bool(done.all())) if stop_together is not None else bool(done.all()):
                break
            step_ids = nxt.unsqueeze(-1)
            pos = pos[:, -1:] + 1
    # `out` was created before inference_mode, so it stays an ordinary tensor that autograd can index with.
    return out.cpu()


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    keep_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Responses (text cut at EOS, and whether it ended) for `prompts`, in order, reproducible from `seed`.

    `keep_tokens`: each result also holds the sampled ids under "tokens" (max_new_tokens of them, PAD after EOS).
    """
    model.eval()
    gen = torch.Generator(device=device.type if device.type != "cuda" else device)
    gen.manual_seed(seed)
    results: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        queries = [encode_prompt(tokenizer, p) for p in chunk]
        toks = sample_tokens(
            model, queries, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens, temperature=temperature, generator=gen, device=device,
        )
        for row in toks.tolist():
            text, ended = decode_response(tokenizer, row)
            results.append({"response": text, "ended": ended, **({"tokens": row} if keep_tokens else {})})
        if on_batch:
            on_batch(len(chunk))
    return results
