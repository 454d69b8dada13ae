"""prepare: disjoint splits by normalized text, deduplication, leakage refusal, no partial outputs."""

import json

import pytest

from rlhf.errors import StageError
from rlhf.io import read_jsonl
from rlhf.text import normalize
from stages.prepare import Params, run

P = Params(seed=0, test_fraction=0.2, rm_fraction=0.4, sft_val_fraction=0.1)


def make_raw(root, prompts, demos, corpus):
    root.mkdir(parents=True, exist_ok=True)
    for name, records in (("prompts", prompts), ("demonstrations", demos), ("corpus", corpus)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def pool(n=200):
    return [{"id": f"p{i}", "prompt": f"Question number {i}?", "family": "f"} for i in range(n)]


def demos(n=40):
    return [{"prompt": f"Demo {i}?", "response": f"Answer {i}."} for i in range(n)]


CORPUS = [{"text": "Some text."}, {"text": "<|user|>Hello there?<|assistant|>Hi."}]


def test_splits_are_disjoint_and_cover_the_pool(tmp_path):
    raw = make_raw(tmp_path / "raw", pool() + [{"id": "dup", "prompt": "  QUESTION number 5? "}], demos(), CORPUS)
    m = run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    texts = {}
    for name in ("rm", "ppo", "test", "sft", "sft_val"):
        texts[name] = {normalize(r["prompt"]) for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl", allow_empty=True)}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert len(texts["rm"]) + len(texts["ppo"]) + len(texts["test"]) == 200  # the duplicate was dropped
    assert m["duplicates_dropped"]["prompts"] == 1
    assert len(texts["sft"]) + len(texts["sft_val"]) == 40
    assert 10 < m["split_sizes"]["test"] < 70  # ~20% of 200
    assert m["split_sizes"] == {name: len(texts[name]) for name in names}


def test_split_is_deterministic_and_seeded(tmp_path):
    raw = make_raw(tmp_path / "raw", pool(), demos(), CORPUS)
    run(P, raw=raw, out=tmp_path / "a", metrics=tmp_path / "a.json")
    run(P, raw=raw, out=tmp_path / "b", metrics=tmp_path / "b.json")
    run(Params(1, 0.2, 0.4, 0.1), raw=raw, out=tmp_path / "c", metrics=tmp_path / "c.json")
    assert (tmp_path / "a/test.jsonl").read_bytes() == (tmp_path / "b/test.jsonl").read_bytes()
    assert (tmp_path / "a/test.jsonl").read_bytes() != (tmp_path / "c/test.jsonl").read_bytes()


def test_pool_prompt_that_is_demonstrated_never_reaches_test(tmp_path):
    demo = [{"prompt": "question NUMBER 7?", "response": "x"}] + demos()
    raw = make_raw(tmp_path / "raw", pool(), demo, CORPUS)
    run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    for name in ("rm", "ppo", "test"):
        assert "question number 7?" not in {normalize(r["prompt"]) for r in read_jsonl(tmp_path / f"out/{name}.jsonl", allow_empty=True)}


def test_refuses_when_a_test_prompt_is_a_corpus_chat_turn(tmp_path):
    from stages.prepare import assign_split

    leaked = next(p for p in pool() if assign_split(p["prompt"], P) == "test")
    corpus = CORPUS + [{"text": f"<|user|>{leaked['prompt'].upper()}<|assistant|>whatever"}]
    raw = make_raw(tmp_path / "raw", pool(), demos(), corpus)
    with pytest.raises(StageError, match=f"test prompt '{leaked['id']}'.*corpus.jsonl"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_refuses_when_a_test_prompt_is_in_user_rankings(tmp_path):
    from stages.prepare import assign_split

    leaked = next(p for p in pool() if assign_split(p["prompt"], P) == "test")
    raw = make_raw(tmp_path / "raw", pool(), demos(), CORPUS)
    ranking = {"prompt_id": "x", "prompt": leaked["prompt"], "responses": ["a", "b"], "ranking": [0, 1], "labeler": "me"}
    (raw / "rankings.jsonl").write_text(json.dumps(ranking) + "\n")
    with pytest.raises(StageError, match="rankings.jsonl"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")


def test_duplicate_ids_and_bad_records_fail_without_outputs(tmp_path):
    raw = make_raw(tmp_path / "raw", pool() + [{"id": "p3", "prompt": "Different?"}], demos(), CORPUS)
    with pytest.raises(StageError, match=r"prompts.jsonl:201: duplicate id 'p3'"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    raw = make_raw(tmp_path / "raw2", pool(), demos() + [{"prompt": "x"}], CORPUS)
    with pytest.raises(StageError, match=r"demonstrations.jsonl:41: missing field 'response'"):
        run(P, raw=raw, out=tmp_path / "out", metrics=tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_fractions_are_validated():
    from rlhf.params import from_dict

    with pytest.raises(StageError, match="prepare.rm_fraction"):
        from_dict(Params, {"seed": 0, "test_fraction": 0.5, "rm_fraction": 0.6, "sft_val_fraction": 0.1}, "prepare")
