"""PPO math (rlhf/ppo.py) against plain-loop references, numpy and hand-computed values.

Item numbers refer to docs/ppo.md. Models here are ~10k-parameter Llamas built from a config.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf import ppo

VOCAB, EOS, PAD = 24, 2, 1


def tiny_llama(seed: int = 0, *, seq_cls: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if seq_cls else LlamaForCausalLM
    return cls(config).eval()


def random_batch(seed: int = 0, batch: int = 5, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=gen)
    values = torch.randn(batch, length, generator=gen)
    lengths = torch.tensor([length, 1, 3, length - 1, 4][:batch])
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return rewards, values, mask, lengths


# ---------------------------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, lengths, gamma, lam):
    """One sequence at a time, over its real tokens only, bootstrapping 0 after the last (item 14)."""
    adv = np.zeros(rewards.shape)
    for i, n in enumerate(lengths.tolist()):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1] if t + 1 < n else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_plain_loop(gamma, lam):
    rewards, values, mask, lengths = random_batch()
    # Garbage after EOS must not leak into the estimate (item 14).
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref = gae_reference(rewards.numpy(), values.numpy(), lengths, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret.numpy(), ref + values.numpy() * mask.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_gamma1_lam1_is_return_minus_value():
    rewards, values, mask, _ = random_batch(seed=3)
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # With γ = λ = 1 the return at t is the sum of the rewards still to come.
    togo = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(ret, togo)


# ---------------------------------------------------------------------------------------------- whitening


def test_whiten_matches_numpy():
    rewards, _, mask, _ = random_batch(seed=1)
    x = rewards * 3 + 2
    picked = x[mask.bool()].numpy().astype(np.float64)
    mean, var = picked.mean(), picked.var()  # numpy's var is the biased one (ddof=0): item 15
    out = ppo.whiten(x, mask)
    np.testing.assert_allclose(out[mask.bool()].numpy(), (picked - mean) / np.sqrt(var + 1e-8), rtol=1e-5, atol=1e-5)
    kept = ppo.whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(kept[mask.bool()].numpy(), (picked - mean) / np.sqrt(var + 1e-8) + mean, rtol=1e-5, atol=1e-5)
    assert torch.all(out[mask == 0] == 0) and torch.all(kept[mask == 0] == 0)
    assert abs(float(ppo.masked_mean(out, mask))) < 1e-5
    assert abs(float(ppo.masked_var(out, mask)) - 1) < 1e-4


# ---------------------------------------------------------------------------------------------- clipped losses


def test_clipped_policy_loss_hand_computed():
    # Three tokens, ε = 0.2: ratios e^0 = 1, e^0.5 ≈ 1.6487 (clipped to 1.2 for A > 0), e^-0.5 ≈ 0.6065.
    logp = torch.tensor([[0.0, 0.5, -0.5, 9.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo.clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    r1, r2 = math.exp(0.5), math.exp(-0.5)
    # token 1: max(-1·1, -1·1) = -1
    # token 2: max(-2·1.6487, -2·1.2) = -2.4 (clipped)
    # token 3: max(+1·0.6065, +1·0.8) = 0.8 (clipped: for A < 0 the ratio is clipped from below)
    expected = (-1.0 - 2.4 + 0.8) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * (0 + 0.25 + 0.25) / 3)
    assert float(stats["ratio"]) == pytest.approx((1 + r1 + r2) / 3, abs=1e-6)


def test_clipped_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0, 2.0, 7.0]])
    old = torch.tensor([[0.0, 0.0, 1.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo.clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 1: V moved 1.0 from 0 -> clipped 0.2; max((1-0)², (0.2-0)²) = 1
    # token 2: unclipped (V = V_old); max(1, 1) = 1
    # token 3: V 2.0 clipped to 1.7; max((2-3)², (1.7-3)²) = 1.69 (clipped is worse: used)
    expected = 0.5 * (1.0 + 1.0 + 1.69) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(stats["vf_clipfrac"]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- rewards and KL


def test_response_mask_and_missing_eos():
    responses = torch.tensor([[5, 6, EOS, PAD], [5, EOS, PAD, PAD], [5, 6, 7, 8], [PAD, 6, EOS, PAD]])
    mask, ended = ppo.response_mask(responses, EOS)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]  # a sampled PAD is a token
    assert ended.tolist() == [True, True, False, True]
    scores = ppo.penalize_missing_eos(torch.tensor([0.5, 0.1, 3.0, -0.2]), ended, -1.0)
    assert scores.tolist() == pytest.approx([0.5, 0.1, -1.0, -0.2])


def test_kl_penalized_rewards_score_at_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, non_score, kl = ppo.kl_penalized_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(non_score, -0.1 * kl)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1 + 3.0, 0.0, 0.0]]))


def test_adaptive_kl_controller():
    ctl = ppo.make_kl_controller(0.1, target_kl=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=100)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01))
    restored = ppo.make_kl_controller(0.1, target_kl=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = ppo.make_kl_controller(0.02, target_kl=0.0, horizon=10_000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.02 and isinstance(fixed, ppo.FixedKLController)


# ---------------------------------------------------------------------------------------------- models


def queries_and_responses(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 6, 1, 4]
    queries = [[0] + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    responses = torch.randint(3, VOCAB, (len(lengths), 5), generator=gen)
    responses[0, 2] = EOS
    responses[0, 3:] = PAD
    return queries, responses


def test_padded_and_unpadded_scoring_agree():
    """Item 6: left-padded batches with position_ids = cumsum(mask) - mask score like single sequences."""
    from rlhf.batching import left_pad
    from rlhf.rm import rewards_from_ids

    policy, rm = tiny_llama(0), tiny_llama(1, seq_cls=True)
    queries, responses = queries_and_responses()
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    ids, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        batched = ppo.logprobs_from_logits(ppo.response_logits(policy, ids, mask, q_ids.shape[1], 0.7), responses)
        batched_values = ppo.ValueModel(rm)(ids, mask)[:, q_ids.shape[1] - 1: -1]
        batched_scores = rewards_from_ids(rm, ids, mask, centered=False)  # what PPO reads (rlhf/rm.py)
        for i, q in enumerate(queries):
            n = int(r_mask[i].sum())
            one = torch.tensor([q + responses[i, :n].tolist()])
            one_mask = torch.ones_like(one)
            single = ppo.logprobs_from_logits(ppo.response_logits(policy, one, one_mask, len(q), 0.7), responses[i:i + 1, :n])
            torch.testing.assert_close(batched[i, :n], single[0], rtol=1e-5, atol=1e-5)
            values = ppo.ValueModel(rm)(one, one_mask)[0, len(q) - 1: -1]
            torch.testing.assert_close(batched_values[i, :n], values, rtol=1e-5, atol=1e-5)
            # The HF classifier reads its score at the last non-pad token: the same number (item 1).
            hf = rm(input_ids=one, attention_mask=one_mask).logits[0, 0]
            torch.testing.assert_close(batched_scores[i], hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logits_equal_the_full_forward(temperature):
    """`logits_to_keep` runs the LM head on the response positions only: the same logits as slicing the full
    forward's (item 8: divided by T), and the same gradients."""
    from rlhf.batching import left_pad, position_ids

    policy = tiny_llama(0)
    queries, responses = queries_and_responses()
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    ids, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1)
    context_len = q_ids.shape[1]
    full = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    reference = full[:, context_len - 1: -1] / temperature
    kept = ppo.response_logits(policy, ids, mask, context_len, temperature)
    assert kept.shape == (len(queries), responses.shape[1], VOCAB)
    torch.testing.assert_close(kept, reference, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(ppo.logprobs_from_logits(x, responses).sum(), list(policy.parameters()))
             for x in (kept, reference)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def large_logit_llama():
    """A tiny Llama whose logits have the magnitude (~10-30) of a trained LM's, where bf16 rounding shows."""
    policy = tiny_llama(0)
    with torch.no_grad():
        policy.lm_head.weight.mul_(300.0)
    return policy


def padded_episodes():
    """The left-padded queries and responses of `queries_and_responses` as one batch:
    (ids, mask, context length, responses, response mask)."""
    from rlhf.batching import left_pad

    queries, responses = queries_and_responses()
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    return torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1], responses, r_mask


def test_logprobs_under_autocast_come_from_fp32_logits():
    """Under bf16 autocast the backbone runs in bf16 but the LM head in fp32: the logits equal a float64
    head on the same hidden states to fp32 rounding, where a bf16 head is off by more than 0.01 nats
    (logits of magnitude ~10-30, as trained LMs produce). The value head likewise."""
    from rlhf.batching import position_ids

    policy = large_logit_llama()
    ids, mask, ctx, responses, r_mask = padded_episodes()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ppo.response_logits(policy, ids, mask, ctx, 1.0)
        hidden = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        bf16_head = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, ctx - 1: -1]
    reference = hidden[:, ctx - 1: -1].double() @ policy.lm_head.weight.detach().double().T
    assert logits.dtype == torch.float32 and bf16_head.dtype == torch.bfloat16
    assert float(reference.abs().amax()) > 10
    valid = r_mask.bool()
    ours = ppo.logprobs_from_logits(logits.double(), responses)[valid]
    exact = ppo.logprobs_from_logits(reference, responses)[valid]
    rounded = ppo.logprobs_from_logits(bf16_head.double(), responses)[valid]
    assert float((ours - exact).abs().max()) < 1e-4
    assert float((rounded - exact).abs().max()) > 1e-2

    rm = tiny_llama(1, seq_cls=True)
    with torch.no_grad():
        rm.score.weight.mul_(300.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = ppo.ValueModel(rm)(ids, mask)
            hidden = rm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), (hidden.double() @ rm.score.weight.detach().double().T).squeeze(-1),
                               rtol=1e-5, atol=1e-4)


def test_head_in_fp32_gives_a_models_own_forward_fp32_logits():
    """A sharded policy runs through its own forward (FSDP gathers the head's weight only there): with
    `head_in_fp32` that forward's logits match response_logits' fp32 head under bf16 autocast, and without
    autocast they are the unpatched model's exactly."""
    from rlhf.batching import position_ids

    policy, plain = large_logit_llama(), large_logit_llama()
    ids, mask, ctx, _, _ = padded_episodes()
    ppo.head_in_fp32(policy)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            split = ppo.response_logits(plain, ids, mask, ctx, 1.0)  # body, then the fp32 head
            own = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, ctx - 1: -1]
        assert own.dtype == torch.float32
        torch.testing.assert_close(own, split, rtol=0, atol=0)
        assert torch.equal(policy(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)
    assert not ppo.head_sharded(policy)


def test_first_minibatch_ratio_is_one():
    """Item 18: before any update the recomputed log-probs equal the rollout's: ratio ≡ 1, approxkl = clipfrac = 0."""
    from rlhf.batching import left_pad
    from rlhf.sampling import sample_tokens

    policy = tiny_llama(0)
    ppo.disable_dropout(policy)
    queries, _ = queries_and_responses()
    responses = sample_tokens(policy, queries, pad_id=PAD, eos_id=EOS, max_new_tokens=6, temperature=0.7,
                              generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    ids, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        old = ppo.logprobs_from_logits(ppo.response_logits(policy, ids, mask, q_ids.shape[1], 0.7), responses)
    new = ppo.logprobs_from_logits(ppo.response_logits(policy, ids[:2], mask[:2], q_ids.shape[1], 0.7), responses[:2])
    adv = torch.randn(2, responses.shape[1])
    _, stats = ppo.clipped_policy_loss(new, old[:2], adv, r_mask[:2], clip_range=0.2)
    assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["approxkl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(stats["clipfrac"]) == 0.0


def test_kl_nonnegative_in_expectation():
    """Item 12: the summed log-ratio of samples from the policy estimates KL(π‖π_ref) >= 0."""
    from rlhf.batching import left_pad
    from rlhf.sampling import sample_tokens

    policy, ref = tiny_llama(0), tiny_llama(5)
    with torch.no_grad():  # sharper distributions than a random init's near-uniform ones
        policy.lm_head.weight.mul_(8)
        ref.lm_head.weight.mul_(8)
    queries = [[0, 3, 4]] * 256
    temperature = 0.8
    responses = sample_tokens(policy, queries, pad_id=PAD, eos_id=EOS, max_new_tokens=4, temperature=temperature,
                              generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    ids, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        lp = ppo.logprobs_from_logits(ppo.response_logits(policy, ids, mask, 3, temperature), responses)
        ref_lp = ppo.logprobs_from_logits(ppo.response_logits(ref, ids, mask, 3, temperature), responses)
        same = ppo.logprobs_from_logits(ppo.response_logits(policy, ids, mask, 3, temperature), responses)
    _, _, kl = ppo.kl_penalized_rewards(torch.zeros(256), lp, ref_lp, r_mask, 0.1)
    per_seq = kl.sum(1)
    stderr = float(per_seq.std()) / math.sqrt(len(per_seq))
    assert float(per_seq.mean()) > -2 * stderr
    assert float(per_seq.mean()) > 4 * stderr  # two different random models: clearly positive
    _, _, zero = ppo.kl_penalized_rewards(torch.zeros(256), lp, same, r_mask, 0.1)
    assert float(zero.abs().max()) == 0.0


def test_gradient_accumulation_reproduces_minibatch():
    """Item 17: micro-batches with the minibatch's token count as denominator give the minibatch gradient."""
    policy = tiny_llama(0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 9), generator=gen)
    mask = torch.ones_like(ids)
    r_mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] * 4 + [0], [1, 0, 0, 0, 0]])
    responses = ids[:, 4:]
    with torch.no_grad():
        old = ppo.logprobs_from_logits(ppo.response_logits(policy, ids, mask, 4, 1.0), responses) + 0.1 * torch.randn(4, 5, generator=gen)
    adv = ppo.whiten(torch.randn(4, 5, generator=gen), r_mask)

    def grads(chunks):
        policy.zero_grad()
        denom = r_mask.sum()
        for sl in chunks:
            lp = ppo.logprobs_from_logits(ppo.response_logits(policy, ids[sl], mask[sl], 4, 1.0), responses[sl])
            loss, _ = ppo.clipped_policy_loss(lp, old[sl], adv[sl], r_mask[sl], clip_range=0.2, denom=denom)
            loss.backward()
        return [p.grad.clone() for p in policy.parameters()]

    whole = grads([slice(0, 4)])
    accumulated = grads([slice(0, 1), slice(1, 3), slice(3, 4)])
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_disable_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    ppo.disable_dropout(model)
    assert model[1].p == 0.0
    llama = tiny_llama(0)
    llama.config.attention_dropout = 0.3
    ppo.disable_dropout(llama)
    assert llama.config.attention_dropout == 0.0


def test_initial_values_include_the_reward_models_demonstration_bias():
    """Item 19 with item 3: at initialization the value at the last real token is the centered reward PPO
    optimizes (the raw head plus config.reward_bias), read as `rewards_from_ids` reads it."""
    from rlhf.batching import left_pad
    from rlhf.rm import REWARD_BIAS_KEY, last_token_index, rewards_from_ids

    rm = tiny_llama(1, seq_cls=True)
    setattr(rm.config, REWARD_BIAS_KEY, 2.5)
    queries, responses = queries_and_responses()
    q_ids, q_mask = left_pad(queries, PAD)
    r_mask, _ = ppo.response_mask(responses, EOS)
    ids, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        values = ppo.ValueModel(rm)(ids, mask)  # (B, T)
        last = last_token_index(mask)
        rows = torch.arange(len(queries))
        torch.testing.assert_close(values[rows, last], rewards_from_ids(rm, ids, mask), rtol=1e-6, atol=1e-6)
        raw = rewards_from_ids(rm, ids, mask, centered=False)
        torch.testing.assert_close(values[rows, last] - raw, torch.full_like(raw, 2.5), rtol=0, atol=1e-6)


def test_value_model_needs_score_head():
    from rlhf.errors import StageError

    with pytest.raises(StageError, match="score"):
        ppo.ValueModel(tiny_llama(0))
