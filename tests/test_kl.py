"""rlhf.kl.sampled_kl, the KL from SFT that evaluate measures for every policy, against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

PROMPTS = ["sort: b a c", "what is 2 + 3?", "tell me about the moon", "hi"]


@pytest.fixture(scope="module")
def tiny():
    """A byte-level BPE tokenizer with the chat template and two different tiny Llamas over it."""
    from rlhf.models import build_llama
    from rlhf.tokenization import train_tokenizer

    tok = train_tokenizer(PROMPTS * 20 + ["the moon is a rock", "a b c", "5"] * 20, vocab_size=300)
    size = dict(hidden=16, layers=2, heads=2, intermediate=32, max_len=64)
    return tok, build_llama(tok, seed=0, **size).eval(), build_llama(tok, seed=1, **size).eval()


def plain_logprob(model, context: list[int], response: list[int]) -> float:
    """Σ_t log p(response_t | context, response_<t), one unpadded forward per token."""
    total = 0.0
    for t, token in enumerate(response):
        ids = torch.tensor([context + response[:t]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[token])
    return total


def run(tok, policy, ref, **kw):
    from rlhf.kl import sampled_kl

    args = dict(samples=3, max_new_tokens=6, seed=0, batch_size=5, device=torch.device("cpu")) | kw
    return sampled_kl(policy, ref, tok, PROMPTS, **args)


def test_kl_of_a_model_with_itself_is_zero(tiny):
    tok, a, _ = tiny
    out = run(tok, a, a)
    assert len(out.kl) == len(PROMPTS) * 3 == len(out.tokens) == len(out.responses)
    assert out.kl == [0.0] * len(out.kl)
    # A copy (another object, so both forwards run) gives the same zero.
    import copy

    assert max(abs(x) for x in run(tok, a, copy.deepcopy(a)).kl) < 1e-5


def test_kl_matches_a_plain_loop_over_tokens(tiny):
    from rlhf.tokenization import encode_prompt

    tok, a, b = tiny
    out = run(tok, a, b)
    assert len(out.per_prompt()) == len(PROMPTS)
    eos = tok.eos_token_id
    for i, (kl, response) in enumerate(zip(out.kl, out.tokens)):
        context = encode_prompt(tok, PROMPTS[i // out.samples])
        assert 1 <= len(response) <= 6 and (eos not in response or response.index(eos) == len(response) - 1)
        want = plain_logprob(a, context, response) - plain_logprob(b, context, response)
        assert kl == pytest.approx(want, abs=1e-4), i
    assert any(abs(k) > 1e-2 for k in out.kl)  # two different models: the test can fail


def test_samples_are_seeded_and_follow_the_policy(tiny):
    tok, a, b = tiny
    first, again, other = run(tok, a, b), run(tok, a, b), run(tok, a, b, seed=1)
    assert first.tokens == again.tokens and first.kl == again.kl
    assert first.tokens != other.tokens
    # The mean over many samples estimates the true KL, which is >= 0 (a one-token world: exact check).
    out = run(tok, a, b, samples=400, max_new_tokens=1, batch_size=400)
    from rlhf.tokenization import encode_prompt

    exact = 0.0
    for p in PROMPTS:
        ids = torch.tensor([encode_prompt(tok, p)])
        with torch.no_grad():
            la = torch.log_softmax(a(input_ids=ids).logits[0, -1].double(), -1)
            lb = torch.log_softmax(b(input_ids=ids).logits[0, -1].double(), -1)
        exact += float((la.exp() * (la - lb)).sum()) / len(PROMPTS)
    mean = sum(out.kl) / len(out.kl)
    spread = math.sqrt(sum((k - mean) ** 2 for k in out.kl) / len(out.kl) / len(out.kl))
    assert exact > 0 and abs(mean - exact) < 4 * spread + 1e-6, (mean, exact, spread)


def test_tempering_log_ratio_matches_a_plain_loop_and_estimates_kl_of_the_tempered_sampler(tiny):
    """log π_T − log π per sampled response, against one unpadded forward per token; its mean over draws
    from π_T estimates KL(π_T ‖ π), checked exactly in a one-token world; at T = 1 it is 0 without a forward."""
    from rlhf.kl import tempering_log_ratio
    from rlhf.sampling import generate_responses
    from rlhf.tokenization import encode_prompt

    tok, a, _ = tiny
    cpu = torch.device("cpu")
    prompts = [p for p in PROMPTS for _ in range(3)]
    drawn = generate_responses(a, tok, prompts, max_new_tokens=6, temperature=0.5, batch_size=5, seed=0, device=cpu,
                               keep_tokens=True)
    rows = [d["tokens"] for d in drawn]
    got = tempering_log_ratio(a, tok, prompts, rows, temperature=0.5, max_new_tokens=6, batch_size=4, device=cpu)
    eos = tok.eos_token_id
    for prompt, row, value in zip(prompts, rows, got, strict=True):
        response = row[: row.index(eos) + 1] if eos in row else row
        context = encode_prompt(tok, prompt)
        tempered = 0.0
        for t, token in enumerate(response):
            with torch.no_grad():
                logits = a(input_ids=torch.tensor([context + response[:t]])).logits[0, -1].double()
            tempered += float(torch.log_softmax(logits / 0.5, -1)[token])
        assert value == pytest.approx(tempered - plain_logprob(a, context, response), abs=1e-4)
    assert any(abs(v) > 1e-2 for v in got)
    assert tempering_log_ratio(None, tok, prompts, rows, temperature=1.0, max_new_tokens=6, batch_size=4,
                               device=cpu) == [0.0] * len(prompts)
    # One token per response: the mean over 400 draws per prompt against the exact KL(π_T ‖ π).
    many = [p for p in PROMPTS for _ in range(400)]
    one = generate_responses(a, tok, many, max_new_tokens=1, temperature=0.5, batch_size=400, seed=0, device=cpu,
                             keep_tokens=True)
    vals = tempering_log_ratio(a, tok, many, [d["tokens"] for d in one], temperature=0.5, max_new_tokens=1,
                               batch_size=400, device=cpu)
    exact = 0.0
    for p in PROMPTS:
        with torch.no_grad():
            logits = a(input_ids=torch.tensor([encode_prompt(tok, p)])).logits[0, -1].double()
        lt, l1 = torch.log_softmax(logits / 0.5, -1), torch.log_softmax(logits, -1)
        exact += float((lt.exp() * (lt - l1)).sum()) / len(PROMPTS)
    mean = sum(vals) / len(vals)
    spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) / len(vals))
    assert exact > 0 and abs(mean - exact) < 4 * spread + 1e-6, (mean, exact, spread)
