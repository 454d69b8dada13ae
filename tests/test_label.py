"""`rlhf label` end to end with scripted keystrokes: rank, invalid input, skip, undo, quit, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT

runner = CliRunner()


def write_candidates(path: Path, n: int = 4, k: int = 3) -> list[dict]:
    records = [{"prompt_id": f"p{i}", "prompt": f"What is {i} + 1?",
                "responses": [f"{i + 1}.", f"Maybe {i}.", f"I like turtles {i}."][:k],
                "ended": [True, True, False][:k]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def read_labels(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label(tmp_path: Path, keys: str, labeler: str = "alice", *options: str):
    return runner.invoke(app, ["label", "--labeler", labeler, "--candidates", str(tmp_path / "cands.jsonl"),
                               "--out", str(tmp_path / "labels" / "human.jsonl"), *options], input=keys)


def test_label_session_undo_skip_quit_and_resume(tmp_path):
    write_candidates(tmp_path / "cands.jsonl")
    out = tmp_path / "labels" / "human.jsonl"

    # Session 1: help, a ranking, two invalid answers, skip, undo the skip, rank it, quit.
    res = label(tmp_path, "h\n2>1>3\nbogus\n1>1>2\ns\nu\n3>2>1\nq\n")
    assert res.exit_code == 0, res.output
    assert "Commands:" in res.output  # help was shown
    assert "not recorded" in res.output and "appears twice" in res.output
    assert "undone: skip of prompt p1" in res.output
    recs = read_labels(out)
    assert [(r["prompt_id"], r["ranking"], r["labeler"]) for r in recs] == [("p0", [1, 0, 2], "alice"),
                                                                            ("p1", [2, 1, 0], "alice")]
    assert recs[0]["responses"] == ["1.", "Maybe 0.", "I like turtles 0."]
    assert "2 prompts left" in res.output

    # Session 2 resumes at p2. Undo with nothing done this session takes back the last saved label (p1);
    # then rank p1, p2 (space-separated), p3 — and the input ends (terminal closed) without a quit.
    res = label(tmp_path, "u\n1>2>3\n1 3 2\n2>3>1\n")
    assert res.exit_code == 0, res.output
    assert "prompt p0" not in res.output  # already labeled: skipped on resume
    assert "undone: label of prompt p1" in res.output
    recs = read_labels(out)
    assert [(r["prompt_id"], r["ranking"]) for r in recs] == [("p0", [1, 0, 2]), ("p1", [0, 1, 2]),
                                                              ("p2", [0, 2, 1]), ("p3", [1, 2, 0])]

    # Session 3: nothing left for alice, nor for bob (every prompt is ranked by someone); with --overlap
    # bob ranks prompts others have ranked, from the first one, in the same file.
    res = label(tmp_path, "")
    assert "Nothing to label" in res.output
    res = label(tmp_path, "3>1>2\n", labeler="bob")
    assert "Nothing to label" in res.output and len(read_labels(out)) == 4
    res = label(tmp_path, "3>1>2\n", "bob", "--overlap")
    assert res.exit_code == 0, res.output
    recs = read_labels(out)
    assert len(recs) == 5 and recs[-1]["labeler"] == "bob" and recs[-1]["prompt_id"] == "p0"
    assert not list(out.parent.glob(".*tmp"))  # atomic writes leave no temporary files behind


def test_label_answers_survive_a_killed_terminal(tmp_path):
    """Each answer is on disk before the next prompt appears: input ending mid-session loses nothing."""
    write_candidates(tmp_path / "cands.jsonl")
    res = label(tmp_path, "1>2>3\n2>1>3\n1>")  # a half-typed third answer, then the terminal dies
    assert res.exit_code == 0, res.output
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    assert [r["prompt_id"] for r in recs] == ["p0", "p1"]


def test_label_real_stdin_subprocess(tmp_path):
    write_candidates(tmp_path / "cands.jsonl", n=2)
    res = subprocess.run([sys.executable, "-m", "cli", "label", "--labeler", "carol", "--candidates",
                          str(tmp_path / "cands.jsonl"), "--out", str(tmp_path / "h.jsonl")],
                         input="3>2>1\nq\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [r["ranking"] for r in read_labels(tmp_path / "h.jsonl")] == [[2, 1, 0]]


def test_label_bad_inputs_exit_1(tmp_path):
    res = label(tmp_path, "")  # no candidates file
    assert res.exit_code == 1
    write_candidates(tmp_path / "cands.jsonl")
    res = runner.invoke(app, ["label", "--candidates", str(tmp_path / "cands.jsonl")])
    assert res.exit_code == 2  # --labeler is required


@pytest.mark.parametrize("bad", ['{"prompt_id": "p0", "prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1], "labeler": "x"}\n'])
def test_label_refuses_a_corrupt_labels_file(tmp_path, bad):
    """A labels file with an invalid ranking is reported, not silently extended."""
    from stages.rank import human_rankings

    cands = write_candidates(tmp_path / "cands.jsonl", n=1)
    (tmp_path / "h.jsonl").write_text(bad)
    from rlhf.errors import StageError

    with pytest.raises(StageError, match="appears twice"):
        human_rankings(cands, tmp_path / "h.jsonl")
