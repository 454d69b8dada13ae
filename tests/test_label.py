"""`rlhf label` end to end with scripted keystrokes: rank, invalid input, skip, undo, quit, resume."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
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
    assert not list(out.parent.glob(".*"))  # atomic writes leave no temporary files behind, nor a lock file


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


# ---- issue 15: counts, ties, identical answers, help sized to K, skips, blinding, --limit, unsafe ----------


def test_counts_after_rank_skip_rank_undo_undo_rank_skip_quit(tmp_path):
    """The reported sequence once printed '3 ranked, 2 skipped, 1330 left' with 2 labels in the file."""
    write_candidates(tmp_path / "cands.jsonl", n=6)
    res = label(tmp_path, "1>2>3\ns\n1>2>3\nu\nu\n2>1>3\ns\nq\n")
    assert res.exit_code == 0, res.output
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    assert [r["prompt_id"] for r in recs] == ["p0", "p1"]  # p2's label was undone, p1 ranked after its skip was undone
    assert "skipped prompt p2" in res.output  # a skip says so
    assert "label: 2 ranked, 1 skipped, 4 left" in res.output
    res = label(tmp_path, "q\n")
    assert "4 prompts to rank" in res.output  # the next session agrees with the last one's count


def test_ties_are_stored_as_declared_ties_and_give_no_preference_pair(tmp_path):
    from rlhf.rm import ranking_pairs, validate_ranking_record
    from rlhf.preferences import load_groups

    write_candidates(tmp_path / "cands.jsonl", n=2)
    res = label(tmp_path, "1 = 3 > 2\n3>2>1\n")
    assert res.exit_code == 0, res.output
    assert "saved: 1=3>2" in res.output
    first, second = read_labels(tmp_path / "labels" / "human.jsonl")
    assert first["ranking"] == [0, 2, 1] and first["ties"] == [[0, 2]]
    assert "ties" not in second
    validate_ranking_record(first, "labels:1")
    assert ranking_pairs(first["ranking"], first["ties"]) == [(0, 1), (2, 1)]
    # The reward stage's reader: the tied pair (0, 2) is no comparison.
    groups = load_groups(tmp_path / "labels" / "human.jsonl", "rankings")
    assert [g["pairs"] for g in groups] == [[(0, 1), (2, 1)], [(2, 1), (2, 0), (1, 0)]]


@pytest.mark.parametrize("ties, match", [
    ([[0, 1]], "not next to each other"),          # ranking [0, 2, 1]: 0 and 1 are apart
    ([[0, 2], [2, 1]], "in two tie groups"),
    ([[0]], "groups of at least 2"),
    ([[0, 7]], "not in ranking"),
])
def test_malformed_ties_are_refused(ties, match):
    from rlhf.errors import StageError
    from rlhf.rm import validate_ranking_record

    record = {"prompt_id": "p", "prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 2, 1], "ties": ties, "labeler": "x"}
    with pytest.raises(StageError, match=match):
        validate_ranking_record(record, "rankings.jsonl:1")


def test_evaluation_reader_scores_a_declared_tie_as_half(tmp_path):
    from rlhf.judges import read_human_labels

    (tmp_path / "l.jsonl").write_text(json.dumps({"prompt_id": "p", "prompt": "q", "responses": ["a", "b", "c"],
                                                  "ranking": [1, 0, 2], "ties": [[1, 0]], "labeler": "x"}) + "\n")
    outcomes = read_human_labels(tmp_path / "l.jsonl")
    assert outcomes[("q", "a", "b")] == outcomes[("q", "b", "a")] == 0.5
    assert outcomes[("q", "a", "c")] == 1.0 and outcomes[("q", "c", "b")] == 0.0


def test_identical_answers_are_marked(tmp_path):
    (tmp_path / "cands.jsonl").write_text(json.dumps({"prompt_id": "p0", "prompt": "Hi?", "ended": [True] * 3,
                                                      "responses": ["Hello.", "Go away.", "Hello."]}) + "\n")
    res = label(tmp_path, "1=3>2\n")
    assert "(identical to [1])" in res.output
    assert res.output.count("identical to") == 1


@pytest.mark.parametrize("k", [3, 4, 8])
def test_help_and_prompt_examples_are_sized_to_k(tmp_path, k):
    from rlhf.labeling import example_ranking, parse_answer

    records = [{"prompt_id": "p0", "prompt": "Say a number.", "responses": [f"{i}." for i in range(k)], "ended": [True] * k}]
    (tmp_path / "cands.jsonl").write_text(json.dumps(records[0]) + "\n")
    res = label(tmp_path, "h\nq\n")
    examples = set(re.findall(r"\b\d+(?:[>=]\d+)+\b", res.output))
    assert examples, res.output
    for example in examples:  # every example shown (help, tie example, prompt line) is a valid answer for K
        ranking, _, _ = parse_answer(example, k)
        assert sorted(ranking) == list(range(k)), example
    assert example_ranking(8) == "2>1>4>3>6>5>8>7" and example_ranking(3, tie=True) == "2=1>3"


def eval_candidates(path: Path, n: int = 6) -> list[dict]:
    """reports/responses.jsonl as `evaluate` writes it: every model's answer, always in the same position."""
    records = [{"prompt_id": f"t{i}", "prompt": f"Question {i}?", "models": ["base", "sft", "policy"],
                "responses": [f"base answer {i}", f"sft answer {i}", f"policy answer {i}"],
                "ended": [True, True, True], "family": "f"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def shown_answers(output: str) -> list[list[str]]:
    """Per prompt panel, the model names in the order their answers were shown."""
    return [re.findall(r"\[\d\] (base|sft|policy) answer", panel) for panel in output.split("Question")[1:]]


def test_evaluation_labeling_is_blinded_seeded_and_mapped_back(tmp_path):
    eval_candidates(tmp_path / "cands.jsonl")
    keys = "1>2>3\n" * 6
    res = label(tmp_path, keys)
    assert res.exit_code == 0, res.output
    orders = shown_answers(res.output)
    assert len(orders) == 6 and len({tuple(o) for o in orders}) > 1  # positions vary per prompt
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    names = ["base", "sft", "policy"]
    for rec, order in zip(recs, orders):
        # '1>2>3' ranks the answers as shown: mapped back to the file's order on save.
        assert [names[i] for i in rec["ranking"]] == order
        assert [names[i] for i in rec["shown"]] == order and rec["models"] == names
        assert rec["responses"] == [f"{n} answer {rec['prompt_id'][1:]}" for n in names]
    # Seeded: the same labeler and seed see the same order again.
    first = label(tmp_path, "q\n", "dave", "--overlap")
    again = label(tmp_path, "q\n", "dave", "--overlap")
    assert shown_answers(again.output) == shown_answers(first.output) and len(shown_answers(first.output)) == 1
    # --no-shuffle shows the file's order.
    plain = label(tmp_path, "q\n", "erin", "--overlap", "--no-shuffle")
    assert shown_answers(plain.output) == [names]


def test_seed_changes_the_blinded_order():
    from rlhf.labeling import LabelSession

    cands = [{"prompt_id": f"t{i}", "prompt": "q", "responses": ["a", "b", "c", "d"], "models": ["w", "x", "y", "z"],
              "ended": [True] * 4} for i in range(10)]

    def orders(seed: int) -> list[list[int]]:
        session = LabelSession(cands, Path("unused.jsonl"), "ann", console=None, read_line=lambda _: None, seed=seed)
        return [session.order(c["prompt_id"]) for c in cands]

    assert orders(0) == orders(0) and orders(0) != orders(1)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders(0))


def test_limit_and_unsafe_flag(tmp_path):
    write_candidates(tmp_path / "cands.jsonl", n=4)
    res = label(tmp_path, "2>1>3 !3\n1>2>3\n1>2>3\n", "alice", "--limit", "2")
    assert res.exit_code == 0, res.output
    assert "Reached --limit 2" in res.output and "label: 2 ranked, 0 skipped, 2 left" in res.output
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    assert len(recs) == 2
    assert recs[0]["unsafe"] == [2] and "flagged unsafe: 3" in res.output
    assert "unsafe" not in recs[1]
    res = label(tmp_path, "2>1>3 !9\nq\n")
    assert "not recorded: after '!'" in res.output


def test_escape_sequences_in_candidates_are_shown_escaped(tmp_path):
    (tmp_path / "cands.jsonl").write_text(json.dumps({
        "prompt_id": "p\x1b]0;owned\x07", "prompt": "Hi\x1b[2J there\r", "ended": [True, True],
        "responses": ["\x1b[31mred\x1b[0m", "plain \u202eevil"]}) + "\n")
    res = label(tmp_path, "1>2\n")
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\r" not in res.output and "\u202e" not in res.output
    assert "\\x1b[31mred\\x1b[0m" in res.output and "\\u202eevil" in res.output and "Hi\\x1b[2J there\\r" in res.output
    # The stored label keeps the text exactly as it was.
    assert read_labels(tmp_path / "labels" / "human.jsonl")[0]["responses"][0] == "\x1b[31mred\x1b[0m"


# ---- issue 18: two labelers on one file ------------------------------------------------------------


class Labeler:
    """A real `rlhf label` process, fed one answer at a time once it shows its prompt."""

    def __init__(self, tmp_path: Path, name: str, *options: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "label", "--labeler", name, "--candidates", str(tmp_path / "cands.jsonl"),
             "--out", str(tmp_path / "labels" / "human.jsonl"), *options],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"})
        self.chunks: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.output = ""
        self.seen: dict[str, int] = {}

    def _pump(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            self.chunks.put(chunk)
        self.chunks.put(b"")

    def wait_for(self, text: str, timeout: float = 90) -> None:
        """Read output until `text` appears once more than it had."""
        deadline = time.time() + timeout
        while self.output.count(text) <= self.seen.get(text, 0):
            try:
                chunk = self.chunks.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                pytest.fail(f"no {text!r} from the labeler within {timeout} s:\n{self.output}")
            if not chunk:
                pytest.fail(f"the labeler ended before {text!r}:\n{self.output}")
            self.output += chunk.decode()
        self.seen[text] = self.output.count(text)

    def start(self) -> Labeler:
        self.wait_for("or s/u/h/q: ")
        return self

    def answer(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        self.wait_for("left ->" if line == "q" else "or s/u/h/q: ")

    def finish(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        while (chunk := self.chunks.get(timeout=10)):
            self.output += chunk.decode()
        assert self.proc.returncode == 0, self.output
        return self.output


def test_two_labeler_processes_on_one_file_keep_every_ranking_on_disjoint_prompts(tmp_path):
    write_candidates(tmp_path / "cands.jsonl", n=8)
    # Both sessions are open at once, each with a prompt on screen; they answer in turns.
    alice = Labeler(tmp_path, "alice").start()
    bob = Labeler(tmp_path, "bob").start()
    for _ in range(3):
        alice.answer("1>2>3")
        bob.answer("3>2>1")
    alice.answer("q")
    bob.answer("q")
    alice_out, bob_out = alice.finish(), bob.finish()
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    by = {name: [r["prompt_id"] for r in recs if r["labeler"] == name] for name in ("alice", "bob")}
    assert len(recs) == 6 and len(by["alice"]) == 3 and len(by["bob"]) == 3, by
    assert not set(by["alice"]) & set(by["bob"]), f"both labelers were given the same prompts: {by}"
    assert "label: 3 ranked, 0 skipped" in alice_out and "label: 3 ranked, 0 skipped" in bob_out
    assert not list((tmp_path / "labels").glob(".*"))  # no lock, claim or temporary file is left


def test_overlap_labelers_rank_the_same_prompts(tmp_path):
    write_candidates(tmp_path / "cands.jsonl", n=4)
    alice = Labeler(tmp_path, "alice").start()
    bob = Labeler(tmp_path, "bob", "--overlap").start()
    for _ in range(2):
        alice.answer("1>2>3")
        bob.answer("3>2>1")
    alice.finish(), bob.finish()
    recs = read_labels(tmp_path / "labels" / "human.jsonl")
    assert [r["prompt_id"] for r in recs if r["labeler"] == "bob"] == ["p0", "p1"]  # shared subset for agreement
    assert [r["prompt_id"] for r in recs if r["labeler"] == "alice"] == ["p0", "p1"]


def test_a_killed_labelers_claim_does_not_block_the_prompt(tmp_path):
    write_candidates(tmp_path / "cands.jsonl", n=2)
    ghost = Labeler(tmp_path, "ghost").start()  # p0 on its screen
    ghost.proc.kill()
    ghost.proc.wait()
    assert (tmp_path / "labels" / ".human.jsonl.lock").exists()  # its claim is left behind
    res = label(tmp_path, "1>2>3\nq\n")
    assert res.exit_code == 0, res.output
    assert [r["prompt_id"] for r in read_labels(tmp_path / "labels" / "human.jsonl")] == ["p0"]
    assert not (tmp_path / "labels" / ".human.jsonl.lock").exists()


def test_a_failed_save_is_one_line_and_keeps_earlier_answers(tmp_path, monkeypatch):
    """The disk fills up while the second answer is written: one line, the first answer kept, no temporary file."""
    import errno

    from rlhf.io import write_jsonl

    write_candidates(tmp_path / "cands.jsonl", n=3)
    calls = []

    def full_disk_on_second_save(path, records):
        calls.append(path)
        if len(calls) != 2:
            return write_jsonl(path, records)

        def records_then_enospc():
            yield records[0]
            raise OSError(errno.ENOSPC, "No space left on device")

        return write_jsonl(path, records_then_enospc())

    monkeypatch.setattr("rlhf.labeling.write_jsonl", full_disk_on_second_save)
    res = label(tmp_path, "1>2>3\n2>1>3\n3>2>1\n")
    assert res.exit_code == 1
    out = tmp_path / "labels" / "human.jsonl"
    assert res.stderr.strip().splitlines() == [
        f"error: no space left on device writing {out}; free space on that disk or point --out elsewhere; "
        "the answers before this one are saved"]
    assert [r["prompt_id"] for r in read_labels(out)] == ["p0"]
    assert not list(out.parent.glob(".*"))  # the temporary file and the lock are gone
