"""Reward-model math against naive references: the K-way loss, last-token reads, HH parsing, rankings."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf.agreement import (
    gold_agreement,
    pair_agreement,
    pairs_gold_agreement,
    ranking_from_scores,
    score_agreement,
    spearman,
)
from rlhf.errors import StageError
from rlhf.rm import (
    flat_pairs,
    gather_last,
    kway_ranking_loss,
    last_token_index,
    parse_hh,
    parse_ranking_text,
    ranking_pairs,
    read_candidates,
    validate_ranking,
)


# ---------------------------------------------------------------------------------------------
# K-way loss


def naive_pair_loss(rewards_per_prompt: list[list[float]], rankings: list[list[int]]) -> float:
    """Plain loops: for each prompt, mean over explicitly enumerated (winner, loser) pairs of
    -log sigmoid(r_w - r_l); then mean over prompts."""
    per_prompt = []
    for r, ranking in zip(rewards_per_prompt, rankings):
        terms = []
        for a in range(len(ranking)):
            for b in range(a + 1, len(ranking)):
                w, l = ranking[a], ranking[b]
                terms.append(-math.log(1 / (1 + math.exp(-(r[w] - r[l])))))
        assert len(terms) == math.comb(len(ranking), 2)
        per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def test_ranking_pairs_enumerates_all_c_k_2():
    pairs = ranking_pairs([2, 0, 3, 1])
    assert pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    for k in range(2, 10):
        assert len(ranking_pairs(list(range(k)))) == math.comb(k, 2)


@pytest.mark.parametrize("ks", [[4, 4, 4], [4, 9, 2], [2], [9, 5]])
def test_kway_loss_equals_mean_over_enumerated_pairs(ks):
    gen = torch.Generator().manual_seed(sum(ks))
    rewards_per_prompt = [torch.randn(k, generator=gen).mul(2).tolist() for k in ks]
    rankings = [torch.randperm(k, generator=gen).tolist() for k in ks]
    flat = torch.tensor([x for r in rewards_per_prompt for x in r], dtype=torch.float64)
    win, lose, weight = flat_pairs([(k, ranking_pairs(rk)) for k, rk in zip(ks, rankings)])
    loss = kway_ranking_loss(flat, win, lose, weight, n_groups=len(ks))
    assert float(loss) == pytest.approx(naive_pair_loss(rewards_per_prompt, rankings), rel=1e-12)


def test_kway_loss_gradient_matches_reference():
    r = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    win, lose, weight = flat_pairs([(4, ranking_pairs([2, 0, 3, 1]))])
    kway_ranking_loss(r, win, lose, weight, 1).backward()
    ref = r.detach().clone().requires_grad_(True)
    pairs = ranking_pairs([2, 0, 3, 1])
    (-sum(torch.nn.functional.logsigmoid(ref[w] - ref[l]) for w, l in pairs) / len(pairs)).backward()
    assert torch.allclose(r.grad, ref.grad)


# ---------------------------------------------------------------------------------------------
# Scalar at the last real token


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(torch.zeros(1, 5, dtype=torch.long)).tolist() == [0]  # no real token
    values = torch.arange(15, dtype=torch.float).view(3, 5)
    assert gather_last(values, right).tolist() == [2.0, 9.0, 10.0]


def _tiny_rm():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return model


def test_reward_read_at_last_real_token_regardless_of_padding_side():
    from rlhf.batching import left_pad, right_pad
    from rlhf.rm import rewards_from_ids

    model = _tiny_rm()
    seqs = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 3, 4, 8, 11, 12, 2]]
    with torch.no_grad():
        alone = torch.stack([rewards_from_ids(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
        lp = rewards_from_ids(model, *left_pad(seqs, 0))
        rp = rewards_from_ids(model, *right_pad(seqs, 0))
        # HF's own pooling (rightmost non-PAD token) agrees on right padding, where positions need no fix.
        hf = model(*right_pad(seqs, 0)).logits.squeeze(-1)
    assert torch.allclose(lp, alone, atol=1e-5)
    assert torch.allclose(rp, alone, atol=1e-5)
    assert torch.allclose(hf, alone, atol=1e-5)


def test_reward_bias_from_config_is_added():
    from rlhf.rm import REWARD_BIAS_KEY, rewards_from_ids

    model = _tiny_rm()
    ids, mask = torch.tensor([[1, 5, 2]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        raw = rewards_from_ids(model, ids, mask, centered=False)
        setattr(model.config, REWARD_BIAS_KEY, -0.75)
        centered = rewards_from_ids(model, ids, mask)
    assert float(centered - raw) == pytest.approx(-0.75)


# ---------------------------------------------------------------------------------------------
# HH-RLHF transcripts


def test_parse_hh_single_turn():
    chosen = "\n\nHuman: What is 2+3?\n\nAssistant: 5."
    rejected = "\n\nHuman: What is 2+3?\n\nAssistant: I don't know, maybe 6."
    assert parse_hh(chosen, rejected) == ("What is 2+3?", "5.", "I don't know, maybe 6.")


def test_parse_hh_multi_turn_prompt_is_shared_prefix():
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    chosen = prefix + "\n\nAssistant: An apple."
    rejected = prefix + "\n\nAssistant: Apples are bad, you idiot."
    prompt, c, r = parse_hh(chosen, rejected)
    assert prompt == prefix.strip()
    assert (c, r) == ("An apple.", "Apples are bad, you idiot.")


def test_parse_hh_responses_sharing_a_start():
    # the common prefix runs into the responses ("An "), the prompt still ends at the last shared turn
    chosen = "\n\nHuman: Name a fruit.\n\nAssistant: An apple."
    rejected = "\n\nHuman: Name a fruit.\n\nAssistant: An onion."
    assert parse_hh(chosen, rejected) == ("Name a fruit.", "An apple.", "An onion.")


def test_parse_hh_rejects_non_transcripts():
    with pytest.raises(StageError, match="Assistant"):
        parse_hh("good answer", "bad answer", "x.jsonl:3")


# ---------------------------------------------------------------------------------------------
# Ranking validation


def test_validate_ranking_accepts_permutation():
    assert validate_ranking([2, 0, 1], 3) == [2, 0, 1]


@pytest.mark.parametrize(
    "ranking, k, match",
    [
        ([0, 1, 3], 3, "not a permutation"),
        ([0, 1], 3, "2 entries but there are 3"),
        ([0, 1, 2, 3], 3, "4 entries"),
        ([0, 0, 1], 3, "appears twice"),
        (["0", 1, 2], 3, "integer"),
        ([True, 0, 1], 3, "integer"),
        ("0>1>2", 3, "list"),
    ],
)
def test_validate_ranking_rejects(ranking, k, match):
    with pytest.raises(StageError, match=match):
        validate_ranking(ranking, k, "rankings.jsonl:7")


def test_parse_ranking_text():
    assert parse_ranking_text("2>1>4>3", 4) == ([1, 0, 3, 2], [])
    assert parse_ranking_text(" 3 1 2 ", 3) == ([2, 0, 1], [])
    for text, match in [("1>2", "missing 3"), ("1>1>2", "twice"), ("1>2>5", "does not exist"),
                        ("a>b>c", "not a ranking"), ("", "empty")]:
        with pytest.raises(StageError, match=match):
            parse_ranking_text(text, 3)


# ---------------------------------------------------------------------------------------------
# Agreement statistics


def test_agreements_and_spearman():
    assert pair_agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
    assert pair_agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
    assert pair_agreement([0, 1, 2], [1, 0, 2]) == (2, 3)
    # gold ties are skipped: only (0,2) and (1,2) count
    assert gold_agreement([0, 1, 2], [0.9, 0.9, 0.1]) == (2, 2)
    assert score_agreement([1.0, 1.0, 0.0], [0.5, 0.2, 0.1]) == (2.5, 3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_agreement_skips_identical_texts_and_matches_a_plain_loop():
    """Pairs of identical responses carry no preference: skipped when the texts are given."""
    texts = ["a", "b", "a", "c"]
    # (0, 2) is the only pair of identical texts: 6 pairs become 5
    assert pair_agreement([0, 1, 2, 3], [3, 2, 1, 0], texts) == (0, 5)
    assert gold_agreement([0, 1, 2, 3], [0.9, 0.5, 0.1, 0.5], texts) == (3, 4)  # (1, 3) is a gold tie; (2, 3) disagrees
    rng = random.Random(0)
    for _ in range(50):
        k = rng.randint(2, 7)
        a, b = rng.sample(range(k), k), rng.sample(range(k), k)
        gold = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(k)]
        resp = [rng.choice("xyz") for _ in range(k)]
        pa, pb = [a.index(i) for i in range(k)], [b.index(i) for i in range(k)]  # place of response i
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if resp[i] != resp[j]]
        assert pair_agreement(a, b, resp) == (sum((pa[i] < pa[j]) == (pb[i] < pb[j]) for i, j in pairs), len(pairs))
        scored = [(i, j) for i, j in pairs if gold[i] != gold[j]]
        assert gold_agreement(a, gold, resp) == (sum((pa[i] < pa[j]) == (gold[i] > gold[j]) for i, j in scored),
                                                 len(scored))
        winners_first = [(i, j) if pa[i] < pa[j] else (j, i) for i, j in pairs]
        assert pairs_gold_agreement(winners_first, gold) == gold_agreement(a, gold, resp)
    assert ranking_from_scores([0.2, 0.9, 0.2, 0.5]) == [1, 3, 0, 2]  # ties keep index order


def test_read_candidates_validates(tmp_path):
    path = tmp_path / "c.jsonl"
    good = {"prompt_id": "p1", "prompt": "q", "responses": ["a", "b"], "ended": [True, False]}
    path.write_text(json.dumps(good) + "\n")
    assert read_candidates(path, k=2) == [good]
    with pytest.raises(StageError, match="2 responses, expected 4"):
        read_candidates(path, k=4)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(StageError, match=r"c.jsonl:2: prompt_id 'p1' appears twice"):
        read_candidates(path)
    path.write_text(json.dumps(dict(good, ended=[True])) + "\n")
    with pytest.raises(StageError, match="one true/false per response"):
        read_candidates(path)
