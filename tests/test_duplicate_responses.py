"""A response sampled twice among one prompt's K candidates must not teach the RM both A > B and B > A.

The pair builder (`rlhf.rm.ranking_pairs` with the texts) counts identical texts once, at their best
rank; the rank stage writes rankings where every copy follows its best-ranked copy. Both are checked
against a plain reference: the pairs of the ranking of the distinct texts alone.
"""

from __future__ import annotations

import itertools
import random

from rlhf.rm import merge_duplicate_ranks, ranking_pairs


def reference_pairs(ranking, responses):
    """Distinct texts in order of their best rank; every earlier one beats every later one (as texts)."""
    order = []
    for i in ranking:
        if responses[i] not in order:
            order.append(responses[i])
    return {(a, b) for a, b in itertools.combinations(order, 2)}


def as_texts(pairs, responses):
    return [(responses[w], responses[l]) for w, l in pairs]


def test_duplicate_ranked_apart_gives_no_contradicting_pair():
    responses = ["X", "Y", "X", "Z"]
    ranking = [0, 1, 2, 3]  # X > Y > X' > Z: without merging, X > Y and Y > X (via the copy)
    naive = as_texts(ranking_pairs(ranking), responses)
    assert ("X", "Y") in naive and ("Y", "X") in naive and ("X", "X") in naive  # the bug this guards against
    pairs = as_texts(ranking_pairs(ranking, responses=responses), responses)
    assert pairs == [("X", "Y"), ("X", "Z"), ("Y", "Z")]


def test_pairs_match_the_reference_on_random_rankings_with_duplicates():
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(2, 7)
        responses = [rng.choice("ABCD") for _ in range(k)]
        ranking = rng.sample(range(k), k)
        pairs = as_texts(ranking_pairs(ranking, responses=responses), responses)
        assert len(pairs) == len(set(pairs))  # no pair counted twice
        assert set(pairs) == reference_pairs(ranking, responses)
        assert not any((b, a) in set(pairs) for a, b in pairs)  # never both A > B and B > A
        merged = merge_duplicate_ranks(ranking, responses)
        assert sorted(merged) == list(range(k))  # still a full ranking of all K
        assert ranking_pairs(merged, responses=responses) == ranking_pairs(ranking, responses=responses)
        # In the merged ranking even the pairs of the plain builder agree with each other.
        plain = [p for p in as_texts(ranking_pairs(merged), responses) if p[0] != p[1]]
        assert not any((b, a) in set(plain) for a, b in plain)


def test_distinct_responses_keep_every_pair():
    responses = ["a", "b", "c", "d"]
    assert ranking_pairs([2, 0, 3, 1], responses=responses) == ranking_pairs([2, 0, 3, 1])
    assert merge_duplicate_ranks([2, 0, 3, 1], responses) == [2, 0, 3, 1]


def test_rank_stage_merges_duplicates_before_writing():
    from stages.rank import merge_duplicates

    records = [{"prompt": "p", "responses": ["X", "Y", "X"], "ranking": [0, 1, 2], "labeler": "l1"},
               {"prompt": "q", "responses": ["U", "V"], "ranking": [1, 0], "labeler": "l1"}]
    out, changed = merge_duplicates(records)
    assert changed == 1
    assert out[0]["ranking"] == [0, 2, 1] and out[1] == records[1]
    assert records[0]["ranking"] == [0, 1, 2]  # the input is not modified


def test_reward_stage_groups_use_the_merged_pairs(tmp_path):
    import json

    from rlhf.preferences import load_groups

    path = tmp_path / "rankings.jsonl"
    rec = {"prompt_id": "p1", "prompt": "p", "responses": ["X", "Y", "X", "Z"], "ranking": [0, 1, 2, 3],
           "labeler": "l1"}
    path.write_text(json.dumps(rec) + "\n")
    (group,) = load_groups(path, "rankings")
    assert as_texts(group["pairs"], rec["responses"]) == [("X", "Y"), ("X", "Z"), ("Y", "Z")]
