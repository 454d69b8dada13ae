"""The lean Llama decoder (rlhf.decode) against the HF forward, and the inverse-CDF sampler."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.batching import left_pad, position_ids
from rlhf.decode import LlamaDecoder, supports
from rlhf.sampling import inverse_cdf, sample_categorical, sample_tokens

PAD, EOS = 0, 2


def llama(kv_heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS)
    return LlamaForCausalLM(cfg).eval()


QUERIES = [[5, 9, 11], [7, 3, 8, 30, 31, 40, 12], [60], [14, 15, 16, 17, 18]]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decoder_logits_equal_the_hf_forward_on_a_left_padded_batch(kv_heads):
    model = llama(kv_heads)
    ids, mask = left_pad(QUERIES, PAD)
    new = torch.tensor([[21, 22, 23], [24, 25, 26], [27, 28, 29], [33, 34, 35]])
    full = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        dec = LlamaDecoder(model, full)
        got = [dec.forward(ids, position_ids(mask))]
        for t in range(new.shape[1]):
            got.append(dec.forward(new[:, t:t + 1], position_ids(mask)[:, -1:] + 1 + t))
        seq = torch.cat([ids, new], 1)
        ref = model(input_ids=seq, attention_mask=full, position_ids=position_ids(full)).logits
    width = ids.shape[1]
    for t, logits in enumerate(got):
        assert torch.allclose(logits, ref[:, width - 1 + t], atol=1e-5), t


def test_sample_tokens_gives_the_same_tokens_with_the_decoder_and_the_hf_forward(monkeypatch):
    import rlhf.sampling as M

    model = llama()
    args = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=10, device=torch.device("cpu"))
    lean = [sample_tokens(model, QUERIES, temperature=t, generator=torch.Generator().manual_seed(1), **args)
            for t in (0.0, 1.0)]
    monkeypatch.setattr(M, "decode_supports", lambda model: False)
    hf = [sample_tokens(model, QUERIES, temperature=t, generator=torch.Generator().manual_seed(1), **args)
          for t in (0.0, 1.0)]
    assert torch.equal(lean[0], hf[0]) and torch.equal(lean[1], hf[1])


def test_only_plain_llama_takes_the_decoder():
    assert supports(llama())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert not supports(gpt2)


def test_a_gpt2_model_still_samples_through_the_hf_forward():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    out = sample_tokens(gpt2, [[5, 6], [7]], pad_id=PAD, eos_id=-1, max_new_tokens=4, temperature=0.0,
                        generator=None, device=torch.device("cpu"))
    ref = gpt2.generate(torch.tensor([[5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert out[0].tolist() == ref[0, 2:].tolist()


def test_sample_categorical_matches_the_distribution_and_never_draws_zero_probability():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    first = draws[0::2]
    freq = torch.bincount(first, minlength=4).double() / first.numel()
    # 20,000 draws: the standard error of a frequency is at most 0.0036; 4 of them is 0.014.
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64), atol=0.015)
    assert int((first == 1).sum()) == 0
    assert bool((draws[1::2] == 3).all())


def test_sample_categorical_takes_unnormalized_rows_and_is_reproducible():
    probs = torch.tensor([[2.0, 6.0]]).repeat(4000, 1)  # 1/4 and 3/4
    a = sample_categorical(probs, torch.Generator().manual_seed(5))
    b = sample_categorical(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(float(a.double().mean()) - 0.75) < 0.03


def test_inverse_cdf_draws_tokens_far_below_float32_resolution():
    """A large-vocabulary row: 0.999 on one token, the rest spread over thousands of tokens of probability
    2e-10 (zeros among them, and at the end). Every tiny token owns its exact slice of [0, 1): the u at the
    middle of its slice, computed in exact arithmetic, draws it. A float32 cumulative sum gives most of
    those slices width 0 (the reason for float64)."""
    from fractions import Fraction

    vocab = 5001
    probs = torch.full((vocab,), 2e-10, dtype=torch.float64)
    probs[7] = 0.999
    probs[100:110] = 0.0
    probs[-3:] = 0.0
    probs = probs / probs.sum()
    # Exact cumulative sums (Fractions of the float64 values) and, for sampled tiny tokens, the u at the
    # middle of their slice.
    exact = [Fraction(0)]
    for p in probs.tolist():
        exact.append(exact[-1] + Fraction(p))
    total = exact[-1]
    tokens = [i for i in range(0, vocab, 37) if probs[i] > 0 and i != 7]
    u = torch.tensor([[float((exact[i] + exact[i + 1]) / 2 / total)] for i in tokens], dtype=torch.float64)
    rows = probs.unsqueeze(0).expand(len(tokens), vocab)
    assert inverse_cdf(rows, u).tolist() == tokens
    # A float32 cumulative sum stores values 6e-8 apart near 1: most tiny tokens' slices are empty there.
    widths = torch.diff(probs.float().cumsum(0))[7:][probs[8:] > 0]
    assert float((widths == 0).double().mean()) > 0.9

    # u·total rounding up to the total lands on the last token of positive probability, never on a zero.
    top = inverse_cdf(probs.unsqueeze(0), torch.tensor([[1.0]], dtype=torch.float64))
    assert top.tolist() == [vocab - 4]
    zeros = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    edges = inverse_cdf(zeros.expand(4, 4), torch.tensor([[0.0], [0.5], [1.0 - 2**-53], [1.0]], dtype=torch.float64))
    assert edges.tolist() == [0, 1, 1, 1]


def test_sample_categorical_never_draws_zero_probability_in_a_large_vocabulary():
    """20,000 draws over 50,000 tokens where the mass is 1/2 on one token and 1/2 spread evenly over the
    tokens after it, every other one of them 0: the spread half is drawn half the time, zeros never."""
    vocab = 50_000
    probs = torch.zeros(vocab)
    probs[0] = 0.5
    probs[1::2] = 0.5 / len(range(1, vocab, 2))
    draws = torch.cat([sample_categorical(probs.expand(500, vocab), torch.Generator().manual_seed(s)) for s in range(40)])
    assert float(probs[draws].min()) > 0
    spread = float((draws > 0).double().mean())
    assert abs(spread - 0.5) < 4 * (0.25 / draws.numel()) ** 0.5  # 4 standard errors


def test_decoder_runs_under_bf16_autocast_like_the_hf_forward():
    """The CUDA path runs under bf16 autocast; CPU autocast exercises the same dtype mixing here."""
    model = llama(kv_heads=2)
    ids, mask = left_pad(QUERIES, PAD)
    nxt = torch.tensor([[21], [22], [23], [24]])
    full = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dec = LlamaDecoder(model, full)
        dec.forward(ids, position_ids(mask))
        got = dec.forward(nxt, position_ids(mask)[:, -1:] + 1)
        ref = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=full, position_ids=position_ids(full)).logits[:, -1]
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), ref.float(), atol=2e-2)


def test_decoder_precast_weights_give_autocasts_logits():
    """weight_dtype casts the projections once per rollout; autocast would cast them at every matmul.

    The cast is the same rounding either way, so the logits are identical, not merely close.
    """
    model = llama(kv_heads=2)
    ids, mask = left_pad(QUERIES, PAD)
    nxt = torch.tensor([[21], [22], [23], [24]])
    full = torch.cat([mask, torch.ones_like(nxt)], 1)
    got = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (None, torch.bfloat16):
            dec = LlamaDecoder(model, full, weight_dtype=dtype)
            first = dec.forward(ids, position_ids(mask))
            got[dtype] = (first, dec.forward(nxt, position_ids(mask)[:, -1:] + 1))
    assert dec.fused[0][0][0].dtype == torch.bfloat16 and dec.head[0].dtype == torch.bfloat16
    for a, b in zip(got[None], got[torch.bfloat16]):
        assert torch.equal(a, b)
