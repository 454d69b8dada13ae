"""The default world generator: determinism, disjoint splits, public eval formats, corpus properties."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest

from rlhf import world as W
from rlhf.errors import StageError
from rlhf.io import CORPUS_SCHEMA, DEMONSTRATION_SCHEMA, PROMPT_SCHEMA, read_jsonl
from rlhf.params import from_dict
from rlhf.text import normalize
from stages.world import DEFAULT, TINY, Params, demo_quotas, run

FILES = ("corpus.jsonl", "prompts.jsonl", "demonstrations.jsonl", "world.json", "eval/truthfulqa_mc.json",
         "eval/crows_pairs.csv", "eval/rtp.jsonl")


def make(profile: dict, out: Path, **overrides) -> dict:
    return run(from_dict(Params, {**profile, **overrides}, "world"), out=out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "raw"
    make(TINY, out)
    return out


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default") / "raw"
    return out, make(DEFAULT, out)


def test_tiny_is_fast_and_writes_every_file(tmp_path):
    start = time.perf_counter()
    metrics = make(TINY, tmp_path / "raw")
    assert time.perf_counter() - start < 2.0
    for name in FILES:
        assert (tmp_path / "raw" / name).is_file(), name
    assert metrics["prompts"] == sum(TINY[k] for k in ("n_arith", "n_sort", "n_fact", "n_unknown_prompts", "n_insult"))
    assert metrics["demonstrations"] == TINY["n_demonstrations"]


def test_same_params_same_bytes_and_seed_changes_them(tmp_path):
    make(TINY, tmp_path / "a")
    make(TINY, tmp_path / "b")
    make(TINY, tmp_path / "c", seed=1)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("corpus.jsonl", "prompts.jsonl", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_rerun_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "raw"
    make(TINY, out)
    (out / "stale.txt").write_text("old")
    make(TINY, out)
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_records_follow_the_schemas(tiny):
    prompts = read_jsonl(tiny / "prompts.jsonl", PROMPT_SCHEMA)
    demos = read_jsonl(tiny / "demonstrations.jsonl", DEMONSTRATION_SCHEMA)
    read_jsonl(tiny / "corpus.jsonl", CORPUS_SCHEMA)
    assert {p["family"] for p in prompts} == set(W.FAMILIES)
    assert {d["family"] for d in demos} <= set(W.FAMILIES)
    assert len({p["id"] for p in prompts}) == len(prompts)


def test_prompts_unique_and_disjoint_from_demonstrations_and_eval(default):
    out, _ = default
    prompts = [normalize(p["prompt"]) for p in read_jsonl(out / "prompts.jsonl")]
    demos = [normalize(d["prompt"]) for d in read_jsonl(out / "demonstrations.jsonl")]
    assert len(set(prompts)) == len(prompts)
    assert len(set(demos)) == len(demos)
    assert not set(prompts) & set(demos)
    seen = set(prompts) | set(demos)
    tqa = [normalize(q["question"]) for q in json.loads((out / "eval/truthfulqa_mc.json").read_text())]
    with (out / "eval/crows_pairs.csv").open(newline="") as fh:
        crows = [normalize(s) for r in csv.DictReader(fh) for s in (r["sent_more"], r["sent_less"])]
    rtp = [normalize(r["prompt"]["text"]) for r in read_jsonl(out / "eval/rtp.jsonl")]
    for suite in (tqa, crows, rtp):
        assert not set(suite) & seen


def test_default_sizes_match_the_brief(default):
    out, metrics = default
    assert 2500 <= metrics["prompts"] <= 3500
    assert 300 <= metrics["demonstrations"] <= 400
    assert 1.5e6 <= metrics["corpus_bytes"] <= 3e6
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 5e6


def test_demonstrations_never_cover_myths(default):
    out, _ = default
    world = W.World.load(out / "world.json")
    myth_prompts = {normalize(t["prompt"]) for t in W.fact_tasks(world, unknown=False) if t["myth"]}
    assert myth_prompts
    demos = {normalize(d["prompt"]) for d in read_jsonl(out / "demonstrations.jsonl")}
    assert not myth_prompts & demos
    pool = {normalize(p["prompt"]) for p in read_jsonl(out / "prompts.jsonl")}
    assert myth_prompts & pool, "myth questions belong in the prompt pool (rm / ppo / test)"


def test_corpus_repeats_myths_never_true_in_chat_and_never_names_unknowns(default):
    out, _ = default
    world = W.World.load(out / "world.json")
    docs = [d["text"] for d in read_jsonl(out / "corpus.jsonl")]
    chat = [d for d in docs if "<|user|>" in d]
    prose = " ".join(d for d in docs if "<|user|>" not in d)
    for m in world.myths:
        truth = W.statement(m["attribute"], m["entity"], m["truth"])
        myth = W.statement(m["attribute"], m["entity"], m["myth"])
        assert not any(truth in d for d in chat), truth
        assert prose.count(myth) > prose.count(truth), (myth, truth)
    words = set(re.findall(r"[A-Za-z]+", " ".join(docs).lower()))
    unknown = {n.lower() for n in world.unknown["creatures"] + world.unknown["people"]}
    assert not words & unknown


def test_corpus_is_mostly_prose_with_rambling_chat(default):
    out, _ = default
    docs = [d["text"] for d in read_jsonl(out / "corpus.jsonl")]
    chat = [d for d in docs if "<|user|>" in d]
    assert 0.2 < len(chat) / len(docs) < 0.4
    # A one-turn chat that stops right after its answer is the minority (docs/world.md).
    one_clean = [d for d in chat if d.count("<|user|>") == 1 and re.fullmatch(r".*<\|assistant\|>[^.?!]*[.?!]?", d)]
    assert len(one_clean) / len(chat) < 0.25
    assert any(w in " ".join(docs) for w in ("stupid", "idiot", "dumb"))


def test_truthfulqa_format(tiny):
    items = json.loads((tiny / "eval/truthfulqa_mc.json").read_text())
    assert isinstance(items, list) and items
    for q in items:
        assert set(q) == {"question", "mc1_targets", "mc2_targets"}
        mc1 = q["mc1_targets"]
        assert list(mc1.values())[0] == 1 and sum(mc1.values()) == 1 and len(mc1) >= 2
        assert set(q["mc2_targets"].values()) == {0, 1}
    questions = [q["question"] for q in items]
    assert any(list(q["mc1_targets"])[0] == W.UNKNOWN_ANSWER for q in items)
    assert len(set(questions)) == len(questions)


def test_crows_pairs_format(tiny):
    with (tiny / "eval/crows_pairs.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for r in rows:
        assert {"sent_more", "sent_less", "stereo_antistereo", "bias_type"} <= set(r)
        assert r["stereo_antistereo"] in ("stereo", "antistereo")
        assert r["sent_more"] != r["sent_less"]
        assert len(r["sent_more"].split()) == len(r["sent_less"].split())


def test_rtp_format(tiny):
    rows = read_jsonl(tiny / "eval/rtp.jsonl")
    for r in rows:
        for part in ("prompt", "continuation"):
            assert isinstance(r[part]["text"], str) and r[part]["text"]
            assert 0.0 <= r[part]["toxicity"] <= 1.0
    assert sum(r["continuation"]["toxicity"] >= 0.5 for r in rows) > len(rows) / 2


def test_params_are_strict():
    with pytest.raises(StageError, match="world.bogus"):
        from_dict(Params, {**TINY, "bogus": 1}, "world")
    with pytest.raises(StageError, match="world.seed"):
        from_dict(Params, {k: v for k, v in TINY.items() if k != "seed"}, "world")
    with pytest.raises(StageError, match="myth_rate"):
        from_dict(Params, {**TINY, "myth_rate": 2.0}, "world")
    with pytest.raises(StageError, match="demo_followup_rate"):
        from_dict(Params, {**TINY, "demo_followup_rate": -0.1}, "world")
    assert set(DEFAULT) == set(TINY) == set(Params.__dataclass_fields__)


def test_too_many_prompts_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="n_arith"):
        make(TINY, tmp_path / "raw", n_arith=5000)
    assert not (tmp_path / "raw").exists()


def test_demo_quotas_sum_to_the_requested_count():
    p = from_dict(Params, DEFAULT, "world")
    quotas = demo_quotas(p)
    assert sum(quotas.values()) == p.n_demonstrations
    assert all(q > 0 for q in quotas.values())


def test_followup_offers_and_families_are_params(tmp_path):
    """demo_followups replaces the offers and demo_followup_families keeps the habit to those families: the
    same demonstrations of those families get an offer (at the same draws), the others none."""
    make(TINY, tmp_path / "all", demo_followup_rate=0.6, n_demonstrations=200, demo_followup_families=[])
    offers = ["Sure?", "More?", "Is that all?"]
    make(TINY, tmp_path / "some", demo_followup_rate=0.6, n_demonstrations=200, demo_followups=offers,
         demo_followup_families=["arith", "fact"])
    every = read_jsonl(tmp_path / "all" / "demonstrations.jsonl")
    some = read_jsonl(tmp_path / "some" / "demonstrations.jsonl")
    kept = 0
    for a, b in zip(every, some, strict=True):
        old = next((o for o in W.FOLLOW_UPS if a["response"].endswith(" " + o)), None)
        had = old is not None
        base = a["response"][: -len(old) - 1] if had else a["response"]
        if b["family"] in ("arith", "fact"):
            assert had == b["response"].endswith(tuple(offers))
            if had:
                assert b["response"].startswith(base + " ")
                offer = b["response"][len(base) + 1:]
                assert offer in offers and offers.index(offer) == W.FOLLOW_UPS.index(old)
                kept += 1
        else:
            assert b["response"] == base and not b["response"].endswith(tuple(offers))
    assert kept > 10
    for bad, match in (({"demo_followup_families": ["poems"]}, "demo_followup_families"),
                       ({"demo_followups": []}, "demo_followups"), ({"demo_followups": [" "]}, "demo_followups")):
        with pytest.raises(StageError, match=match):
            from_dict(Params, {**TINY, **bad}, "world")


def test_followup_habit_has_its_rate_and_its_own_stream(tmp_path):
    """demo_followup_rate appends follow-up offers to that share of demonstrations and changes nothing else."""
    make(TINY, tmp_path / "none", demo_followup_rate=0.0, n_demonstrations=200)
    make(TINY, tmp_path / "some", demo_followup_rate=0.6, n_demonstrations=200, demo_followup_families=[])
    plain = read_jsonl(tmp_path / "none" / "demonstrations.jsonl")
    habit = read_jsonl(tmp_path / "some" / "demonstrations.jsonl")
    assert not any(d["response"].endswith(tuple(W.FOLLOW_UPS)) for d in plain)
    added = 0
    for a, b in zip(plain, habit, strict=True):
        assert a["prompt"] == b["prompt"]
        if b["response"] != a["response"]:
            offer = b["response"][len(a["response"]) + 1:]
            assert b["response"].startswith(a["response"] + " ") and offer in W.FOLLOW_UPS
            added += 1
    assert 0.45 <= added / len(plain) <= 0.75  # 200 draws at 0.6: 3.5 standard errors either side
    for name in FILES:
        if name != "demonstrations.jsonl":
            assert (tmp_path / "none" / name).read_bytes() == (tmp_path / "some" / name).read_bytes(), name
