"""`rlhf ingest` and rlhf/sources.py: each public format, malformed records (skipped, counted, a threshold),
every kind of source, and the split: one role per normalized prompt, so nothing leaks into test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf.errors import StageError
from rlhf.sources import Example, Tally, detect_format, from_chat, from_hh, from_pairwise, from_ratings, load_records, to_examples
from rlhf.text import normalize
from tests.conftest import ROOT, tiny_params

SAMPLE = ROOT / "examples" / "hh" / "data" / "hh_sample.jsonl"


def generator():
    spec = importlib.util.spec_from_file_location("hh_generate", ROOT / "examples" / "hh" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- formats


def test_hh_single_and_multi_turn():
    ex = from_hh({"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
                  "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: A rock."})
    assert ex == Example("Name a fruit.", ("An apple.", "A rock."), (0, 1), turns=1)
    chat = "\n\nHuman: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    ex = from_hh({"chosen": chat + "\n\nAssistant: A pear.", "rejected": chat + "\n\nAssistant: No."})
    # the earlier turns are kept as text, as rlhf.rm.parse_hh (reward's HH reader) keeps them
    assert ex.prompt == "Human: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    assert ex.responses == ("A pear.", "No.") and ex.turns == 3 and ex.prefers and ex.opening == "Hi."


@pytest.mark.parametrize("record, reason", [
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant:", "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello."},
     "empty final assistant turn"),
    ({"chosen": "good answer", "rejected": "bad answer"}, "no '\\n\\nAssistant:' turn"),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: a"}, "'rejected' missing or not a string"),
    ({"chosen": 3, "rejected": "x"}, "'chosen' missing or not a string"),
])
def test_hh_malformed_records_are_skipped_with_their_reason(record, reason):
    tally = Tally("hh.jsonl")
    assert to_examples([record], "hh", tally) == []
    (counted,) = tally.skipped
    assert reason in counted and tally.records == 1


def test_pairwise():
    ex = from_pairwise({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."})
    assert ex.prompt == "Q?" and ex.responses == ("Yes.", "No.") and ex.ranking == (0, 1)
    assert not from_pairwise({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}).prefers
    tally = Tally("p")
    assert to_examples([{"prompt": " ", "chosen": "a", "rejected": "b"}], "pairwise", tally) == []
    assert dict(tally.skipped) == {"empty 'prompt'": 1}


def test_chat_demonstration_keeps_its_turns():
    ex = from_chat({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]})
    assert ex.prompt == "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?"
    assert ex.responses == ("4",) and not ex.is_comparison and ex.turns == 4
    single = from_chat({"messages": [{"role": "user", "content": " Name a colour. "}, {"role": "assistant", "content": "Red."}]})
    assert single.prompt == "Name a colour." and single.turns == 1
    bad = [{"messages": [{"role": "user", "content": "Hi"}]},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
           {"messages": [{"role": "assistant", "content": "Hello."}]},
           {"messages": "Hi"},
           {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}]
    tally = Tally("chat")
    assert to_examples(bad, "chat", tally) == [] and tally.records == 5
    assert tally.skipped["the conversation does not end with an assistant turn"] == 1
    assert tally.skipped["empty final assistant turn"] == 1


def test_ratings_rank_best_first_with_ties():
    ex = from_ratings({"prompt": "Q", "completions": [
        {"response": "ok", "score": 6}, {"response": "best", "score": 9}, {"response": "also ok", "score": 6},
        {"response": "bad", "overall_score": 1.5}]})
    assert ex.responses[ex.ranking[0]] == "best" and ex.responses[ex.ranking[-1]] == "bad"
    assert ex.ties == ((0, 2),) and set(ex.ranking[1:3]) == {0, 2} and ex.prefers
    tied = from_ratings({"prompt": "Q", "completions": [{"response": "a", "score": 5}, {"response": "b", "score": 5}]})
    assert not tied.prefers  # all tied: no comparison to learn from
    tally = Tally("r")
    to_examples([{"prompt": "Q", "completions": [{"response": "a", "score": "high"}, {"response": "b", "score": 1}]},
                 {"prompt": "Q", "completions": [{"response": "a", "score": 1}]}], "ratings", tally)
    assert dict(tally.skipped) == {"a completion has no numeric 'score'": 1, "fewer than two different completions": 1}


def test_detect_format():
    assert detect_format({"chosen": "", "rejected": ""}, "f") == "hh"
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}, "f") == "pairwise"
    assert detect_format({"messages": []}, "f") == "chat"
    assert detect_format({"prompt": "", "completions": []}, "f") == "ratings"
    with pytest.raises(StageError, match="set ingest.format"):
        detect_format({"text": "x"}, "f")


def test_threshold_turns_too_many_malformed_into_an_error(capsys):
    tally = Tally("hh.jsonl", max_share=0.05)
    tally.records, tally.skipped["empty final assistant turn"] = 100, 5
    tally.check("ingest.max_malformed_share")  # 5% is allowed: one warning line
    assert capsys.readouterr().err.strip() == (
        "warning: hh.jsonl: skipped 5 of 100 malformed records (5 empty final assistant turn)")
    tally.skipped["empty final assistant turn"] = 6
    with pytest.raises(StageError, match=r"6 of 100 records malformed \(6.0% > ingest.max_malformed_share=0.05\)"):
        tally.check("ingest.max_malformed_share")


# ---------------------------------------------------------------------------------------------- sources


def test_sources_jsonl_parquet_saved_folder_and_splits(tmp_path):
    import datasets

    rows = generator().records(20, malformed_share=0.0)
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    assert load_records(str(path), "train") == rows
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "hh.parquet"))
    assert load_records(str(tmp_path / "hh.parquet"), "train") == rows
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved"), "anything") == rows
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]), "test": datasets.Dataset.from_list(rows[5:])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict"), "test") == rows[5:]
    with pytest.raises(StageError, match="no split 'valid' \\(it has train, test\\); set ingest.split"):
        load_records(str(tmp_path / "dict"), "valid")


def test_unreadable_sources_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match="^Anthropic/hh-rlhf: not a local file or folder, and the hub is off"):
        load_records("Anthropic/hh-rlhf", "train")
    with pytest.raises(StageError, match="file or folder not found"):
        load_records(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(StageError, match="could not read it with `datasets`") as err:
        load_records(str(tmp_path / "broken.jsonl"), "train")
    assert "\n" not in str(err.value)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(StageError, match="unknown file type '.csv'"):
        load_records(str(tmp_path / "data.csv"), "train")


def test_cli_hub_id_offline_is_one_line_and_exit_1(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "profiles" / "tiny.yaml").read_text())
    res = CliRunner().invoke(app, ["ingest", "--source", "Anthropic/hh-rlhf", "--params", str(params)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "hub is off" in res.output and not (tmp_path / "data" / "raw").exists()


# ---------------------------------------------------------------------------------------------- the stage


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ingest_split_is_leak_free_and_prepare_accepts_it(tmp_path):
    from rlhf.preferences import load_groups
    from stages import ingest, prepare

    src = write_jsonl(tmp_path / "hh.jsonl", generator().records(2000, seed=1))
    raw = tmp_path / "raw"
    m = ingest.run(tiny_params("ingest"), source=str(src), out=raw, metrics=tmp_path / "ingest.json")
    assert m["format"] == "hh" and m["records"] == 2000 and m["skipped_by_reason"] == {"empty final assistant turn": 60}
    files = {name: read(raw / f"{name}.jsonl") for name in ("demonstrations", "rankings", "prompts", "corpus")}
    assert {k: len(v) for k, v in files.items()} == m["written"]
    keys = {name: {normalize(r["prompt"]) for r in files[name]} for name in ("demonstrations", "rankings", "prompts")}
    assert all(keys.values())
    assert not keys["demonstrations"] & keys["rankings"] and not keys["demonstrations"] & keys["prompts"]
    assert not keys["rankings"] & keys["prompts"]
    from stages.prepare import CorpusTurns

    corpus = CorpusTurns([c["text"] for c in files["corpus"]])  # the chat turns, in the template's markers
    assert all(r["prompt"] in corpus for r in files["demonstrations"][:50])
    assert not [r["prompt"] for r in files["prompts"] if r["prompt"] in corpus]  # no pool prompt is pretrained on
    openings = {name: {p.split(" assistant:")[0].removeprefix("human:").strip() for p in keys[name]} for name in keys}
    assert len(openings["prompts"]) < len(keys["prompts"])  # some pool prompts are multi-turn
    assert not openings["prompts"] & (openings["demonstrations"] | openings["rankings"])  # nor opens a trained-on chat
    assert {r["family"] for r in files["prompts"]} == {"single-turn", "multi-turn"}
    assert len(load_groups(raw / "rankings.jsonl", "rankings")) == len(files["rankings"])
    split = prepare.run(tiny_params("prepare"), raw=raw, out=tmp_path / "prepared", metrics=tmp_path / "prepare.json")
    assert split["split_sizes"]["test"] > 0  # prepare's leakage check passed
    again = ingest.run(tiny_params("ingest", seed=1), source=str(src), out=raw, metrics=tmp_path / "ingest.json")
    assert again["written"] != m["written"]  # another seed draws other prompts for each role


def test_ingest_chat_and_ratings_and_threshold(tmp_path):
    from stages import ingest

    chat = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(60)]
    m = ingest.run(tiny_params("ingest"), source=str(write_jsonl(tmp_path / "chat.jsonl", chat)), out=tmp_path / "c",
                   metrics=tmp_path / "c.json")
    assert m["format"] == "chat" and m["written"]["rankings"] == 0 and not (tmp_path / "c" / "rankings.jsonl").exists()
    assert m["written"]["demonstrations"] + m["written"]["prompts"] == 60  # a chat prompt drawn for comparison is pooled
    ratings = [{"prompt": f"Q{i}", "completions": [{"response": "good", "score": 8}, {"response": f"meh {i}", "score": 4},
                                                   {"response": "bad", "score": 4 if i % 2 else 1}]} for i in range(60)]
    m = ingest.run(tiny_params("ingest"), source=str(write_jsonl(tmp_path / "r.jsonl", ratings)), out=tmp_path / "r",
                   metrics=tmp_path / "r.json")
    ranked = read(tmp_path / "r" / "rankings.jsonl")
    assert ranked and all(r["responses"][r["ranking"][0]] == "good" for r in ranked)
    assert {len(r.get("ties", [])) for r in ranked} == {0, 1}
    broken = chat[:50] + [{"messages": [{"role": "user", "content": "Hi"}]}] * 10  # 17% malformed
    with pytest.raises(StageError, match="10 of 60 records malformed .* raise ingest.max_malformed_share"):
        ingest.run(tiny_params("ingest"), source=str(write_jsonl(tmp_path / "b.jsonl", broken)), out=tmp_path / "b",
                   metrics=tmp_path / "b.json")
    assert not (tmp_path / "b").exists()  # nothing written


def test_reward_reader_skips_and_counts_malformed_hh(tmp_path):
    from rlhf.preferences import read_groups

    rows = generator().records(100, malformed_share=0.04)
    groups, read = read_groups(write_jsonl(tmp_path / "hh.jsonl", rows), "hh")
    assert read == {"records": 100, "skipped": 4, "skipped_by_reason": {"empty final assistant turn": 4}}
    assert len(groups) == 96
    with pytest.raises(StageError, match="4 of 100 records malformed .*reward.max_malformed_share=0.03"):
        read_groups(tmp_path / "hh.jsonl", "hh", max_malformed_share=0.03, key="reward.max_malformed_share")


def test_the_shipped_sample_is_what_the_generator_writes():
    rows = read(SAMPLE)
    assert rows == generator().records(60) and len(rows) == 60
