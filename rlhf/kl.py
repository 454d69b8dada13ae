"""KL(π ‖ π_ref) of a finished policy, measured the same way for every algorithm.

Each training stage reports a KL of its own (PPO and RLOO their last rollout on training prompts, DPO
its sampled test answers, best-of-n the analytic log n − (n−1)/n), so their numbers are not on one
footing. `sampled_kl` measures any causal LM against a reference on the same prompts: `samples`
responses per prompt drawn from π at temperature 1 (the rollouts' sampler, `rlhf.sampling.sample_tokens`,
seeded), each scored by π and π_ref with the rollouts' log-prob code (`rlhf.ppo.response_logits`), and
the estimate per response is Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) over its tokens up to
and including EOS. Its mean over responses is an unbiased estimate of KL(π ‖ π_ref) in nats per response,
the x axis of Gao et al. (2022); a single response's value can be negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SampledKL:
    kl: list[float]
    """Per response: Σ_t log π − log π_ref (nats), prompt-major (the samples of prompt 0 first)."""
    tokens: list[list[int]]
    """Per response: its token ids up to and including the first EOS (all of them when none)."""
    responses: list[str]
    """Per response: its text, cut at EOS (for the gold judge)."""
    samples: int
    """Responses per prompt."""

    def per_prompt(self) -> list[float]:
        """Mean KL over each prompt's samples: the items a bootstrap interval resamples."""
        k = self.samples
        return [sum(self.kl[i: i + k]) / k for i in range(0, len(self.kl), k)]


@torch.no_grad()
def sampled_kl(policy, ref, tokenizer, prompts: Sequence[str], *, samples: int, max_new_tokens: int, seed: int,
               batch_size: int, device: torch.device) -> SampledKL:
    """`samples` responses per prompt from `policy` at temperature 1, and each one's log-ratio to `ref`.

    Both models must share `tokenizer` (a policy and the SFT model it was trained from do). The draws
    depend only on `seed`, the prompts and `batch_size`, so every policy is measured on its own samples
    from the same generator state.
    """
    from rlhf.batching import left_pad
    from rlhf.devices import autocast
    from rlhf.lengths import fit_queries
    from rlhf.sampling import sample_tokens
    from rlhf.tokenization import decode_response, encode_prompt
    from rlhf.ppo import logprobs_from_logits, response_logits, response_mask

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen = torch.Generator(device=device.type if device.type != "cuda" else device).manual_seed(seed)
    queries = [q for p in prompts for q in [encode_prompt(tokenizer, p)] * samples]
    out = SampledKL([], [], [], samples)
    for start in range(0, len(queries), batch_size):
        batch = fit_queries(policy, queries[start: start + batch_size], max_new_tokens)
        responses = sample_tokens(policy, batch, pad_id=pad, eos_id=eos, max_new_tokens=max_new_tokens,
                                  temperature=1.0, generator=gen, device=device).to(device)  # (B, R)
        q_ids, q_mask = left_pad(batch, pad)
        r_mask, _ = response_mask(responses, eos)
        ids = torch.cat([q_ids.to(device), responses], 1)
        mask = torch.cat([q_mask.to(device), r_mask], 1)
        width = q_ids.shape[1]
        with autocast(device):
            lp = logprobs_from_logits(response_logits(policy, ids, mask, width, 1.0), responses)
            lr = lp if ref is policy else logprobs_from_logits(response_logits(ref, ids, mask, width, 1.0), responses)
        out.kl += ((lp.float() - lr.float()) * r_mask).sum(1).tolist()
        for row, n in zip(responses.tolist(), r_mask.sum(1).tolist()):
            out.tokens.append(row[:n])
            out.responses.append(decode_response(tokenizer, row)[0])
    return out


@torch.no_grad()
def tempering_log_ratio(model, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[int]], *,
                        temperature: float, max_new_tokens: int, batch_size: int, device: torch.device) -> list[float]:
    """Per response: Σ_t log π_T(y_t | x, y_<t) − log π(y_t | x, y_<t) over its tokens up to and including EOS,
    where π_T samples from softmax(logits / T) as `rlhf.sampling.sample_tokens` does.

    For responses drawn from π_T its mean estimates KL(π_T ‖ π). `responses` are the sampled rows (B, R) as
    `sample_tokens` returns them (PAD after EOS); prompts are cut on the left exactly as the sampler cut them.
    At T = 1 every value is 0 exactly and nothing is computed.
    """
    from rlhf.batching import left_pad
    from rlhf.devices import autocast
    from rlhf.lengths import fit_queries
    from rlhf.ppo import response_logits, response_mask
    from rlhf.tokenization import encode_prompt

    if len(prompts) != len(responses):
        raise ValueError("one response per prompt")
    if temperature == 1.0:
        return [0.0] * len(prompts)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        queries = fit_queries(model, [encode_prompt(tokenizer, p) for p in prompts[start: start + batch_size]],
                              max_new_tokens, count=False)  # the sampler counted these cuts
        q_ids, q_mask = left_pad(queries, tokenizer.pad_token_id)
        rows = torch.tensor([list(r) for r in responses[start: start + batch_size]], dtype=torch.long, device=device)
        r_mask, _ = response_mask(rows, tokenizer.eos_token_id)
        ids = torch.cat([q_ids.to(device), rows], 1)
        mask = torch.cat([q_mask.to(device), r_mask], 1)
        with autocast(device):
            logits = response_logits(model, ids, mask, q_ids.shape[1], 1.0).float()
        token = rows.unsqueeze(-1)
        lp_t = torch.log_softmax(logits / temperature, dim=-1).gather(-1, token).squeeze(-1)
        lp_1 = torch.log_softmax(logits, dim=-1).gather(-1, token).squeeze(-1)
        out += ((lp_t - lp_1) * r_mask).sum(1).tolist()
    return out
