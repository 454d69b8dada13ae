"""The human labeling session behind `rlhf label`: show a prompt and its K responses, record a ranking.

The labeler types a ranking best first by the numbers shown, e.g. `2>1>4>3`; `=` declares a tie
(`1=4>3>2`); `!N` after the ranking flags response N as unsafe (`2>1>4>3 !4`). Commands: `s` skip,
`u` undo, `h` help, `q` quit. Responses identical to an earlier one are marked. Every prompt,
response and id is shown with its control characters escaped (rlhf/terminal.py): data cannot recolor
or rewrite the labeler's screen.

Several labelers may work on one labels file at once (the default `labels/human.jsonl` is shared):
- every change is a reload-merge-write under the file's lock (rlhf/locks.py), so no session overwrites
  another's labels; the file is rewritten whole, atomically, after every answer, so closing the
  terminal loses nothing;
- each session claims the prompt on its screen (the claims live in the lock file, `.human.jsonl.lock`,
  which is removed when the last session ends; a claim of a process that has ended is ignored), and
  by default is only given prompts that nobody has ranked and no other session is showing. With
  `overlap` a labeler also gets prompts others have ranked, for a shared subset on which to measure
  inter-labeler agreement as InstructGPT did.

Evaluation candidates (`reports/responses.jsonl`, whose records name their `models`) list the models'
answers in a fixed order; shown as they are, the labeler would know which model wrote which. With
`shuffle` (the default for such files) each prompt's responses are shown in an order drawn from
(seed, labeler, prompt id) and mapped back to the file's order on save.

Labels file: the rankings format (docs/formats.md), one record per (prompt, labeler), read by `rank` when
`rank.source: human` and by `evaluate` with `evaluate.judge: labels`:
  {"prompt_id", "prompt", "responses": [K strings], "ranking": [0-based indices, best first], "labeler",
   "ties"?: [[indices judged equal], ...], "unsafe"?: [indices flagged], "shown"?: [indices in display order],
   "models"?: [K names]}

Input comes from `read_line(prompt_text) -> str | None` (None = end of input, treated as quit), so the
session can be driven by scripted stdin in tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from rlhf.errors import StageError
from rlhf.io import RANKING_SCHEMA, read_jsonl, write_jsonl
from rlhf.terminal import visible

# A claim by a process on another machine (a labels file on a shared disk) cannot be checked for
# liveness; it lapses after this long without the session picking a new prompt.
CLAIM_TTL_S = 6 * 3600


def example_ranking(k: int, tie: bool = False) -> str:
    """An example ranking of exactly k responses: neighbours swapped (2>1>4>3...), optionally a tie."""
    order = [j for i in range(1, k + 1, 2) for j in ((i + 1, i) if i + 1 <= k else (i,))]
    seps = ["=" if tie and i == 0 else ">" for i in range(k - 1)]
    return "".join(f"{n}{s}" for n, s in zip(order, seps)) + str(order[-1])


def help_text(k: int) -> str:
    return f"""\
Rank the {k} responses from best to worst by their numbers, e.g. {example_ranking(k)} (spaces also work).
A tie: '=' between equally good responses, e.g. {example_ranking(k, tie=True)}; identical responses are marked.
Flag a harmful or unsafe response by adding !N after the ranking, e.g. {example_ranking(k)} !{k}.
Judge as InstructGPT's labelers did: helpful (does what was asked), truthful (no made-up facts),
harmless (no insults or stereotypes), in that order unless harm is at stake.
Commands:  s / skip   next prompt (it is offered again next session)
           u / undo   take back the last answer or skip of this session (or your last saved label)
           h / help   this text
           q / quit   stop; every answer so far is saved, rerun the command to resume"""


def parse_answer(line: str, k: int) -> tuple[list[int], list[list[int]], list[int]]:
    """A typed answer '2>1=4>3 !4' -> (ranking, tie groups, flagged unsafe), 0-based, in display numbers."""
    from rlhf.rm import parse_ranking_text

    ranking_text, _, flags_text = line.partition("!")
    ranking, ties = parse_ranking_text(ranking_text, k)
    flags = [f for f in re.split(r"[!\s,]+", flags_text) if f]
    if not all(f.isdigit() and 1 <= int(f) <= k for f in flags):
        raise StageError(f"after '!' give the numbers (1..{k}) of the responses to flag as unsafe, e.g. !{k}")
    return ranking, ties, sorted({int(f) - 1 for f in flags})


@dataclass
class SessionResult:
    ranked: int = 0
    """Labels this session added to the file (less the ones it took back)."""
    skipped: int = 0
    """Prompts skipped this session and not ranked since (offered again next session)."""
    left: int = 0
    """Prompts still to rank when the session ended, skipped ones included (what the next session offers)."""
    quit: bool = False
    log: list[str] = field(default_factory=list)


class SharedLabels:
    """The labels file as several concurrent sessions see it: each access is a reload-merge-write under its lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.session = uuid.uuid4().hex[:12]

    @contextlib.contextmanager
    def open(self) -> Iterator[_View]:
        from rlhf.locks import locked

        with locked(self.path, keep=lambda state: bool(state.get("claims"))) as lock:
            records = read_jsonl(self.path, RANKING_SCHEMA, allow_empty=True) if self.path.exists() else []
            view = _View(records, _live_claims(lock.state.get("claims", {})), self.session)
            yield view
            if view.changed:
                write_jsonl(self.path, view.records)  # atomic: temporary sibling + os.replace
            lock.write({"claims": view.claims})


def _live_claims(claims: Any) -> dict[str, dict[str, Any]]:
    from rlhf.locks import pid_alive

    if not isinstance(claims, dict):
        return {}
    here, now = socket.gethostname(), time.time()
    return {s: c for s, c in claims.items() if isinstance(c, dict) and isinstance(c.get("pid"), int)
            and (pid_alive(c["pid"]) if c.get("host") == here else now - float(c.get("since", 0)) < CLAIM_TTL_S)}


@dataclass
class _View:
    records: list[dict[str, Any]]
    claims: dict[str, dict[str, Any]]
    session: str
    changed: bool = False

    def labeled(self, pid: str, labeler: str | None) -> bool:
        """Has `labeler` (anyone, if None) ranked prompt `pid`?"""
        return any(r["prompt_id"] == pid and (labeler is None or r["labeler"] == labeler) for r in self.records)

    def claimed_by_other(self, pid: str) -> str | None:
        return next((c["labeler"] for s, c in self.claims.items() if s != self.session and c["prompt_id"] == pid), None)

    def claim(self, pid: str | None, labeler: str) -> None:
        if pid is None:
            self.claims.pop(self.session, None)
        else:
            self.claims[self.session] = {"prompt_id": pid, "labeler": labeler, "pid": os.getpid(),
                                         "host": socket.gethostname(), "since": time.time()}

    def put(self, record: dict[str, Any]) -> None:
        """Add a label, replacing this labeler's earlier one of the same prompt."""
        self.remove(record["prompt_id"], record["labeler"])
        self.records.append(record)
        self.changed = True

    def remove(self, pid: str, labeler: str) -> None:
        keep = [r for r in self.records if not (r["prompt_id"] == pid and r["labeler"] == labeler)]
        self.changed = self.changed or len(keep) != len(self.records)
        self.records = keep


class LabelSession:
    """One labeler working through the candidates that are still to rank."""

    def __init__(self, candidates: list[dict[str, Any]], out: Path, labeler: str, *, console: Console,
                 read_line: Callable[[str], str | None], overlap: bool = False, limit: int | None = None,
                 shuffle: bool | None = None, seed: int = 0):
        if not labeler.strip():
            raise StageError("--labeler must be a non-empty name (it is stored with every ranking)")
        if limit is not None and limit < 1:
            raise StageError(f"--limit must be at least 1, got {limit}")
        self.candidates = {c["prompt_id"]: c for c in candidates}
        self.out = Path(out)
        self.labels = SharedLabels(self.out)
        self.labeler = labeler
        self.console = console
        self.read_line = read_line
        self.overlap = overlap
        self.limit = limit
        # Evaluation candidates name their models: blind the labeler to which position is which model.
        self.shuffle = any("models" in c for c in candidates) if shuffle is None else shuffle
        self.seed = seed
        self.queue = list(self.candidates)  # this session's prompts still to offer, in file order
        self.skipped: list[str] = []
        self.added: list[str] = []  # prompts this session labeled (and did not take back)
        self.history: list[tuple[str, str]] = []  # (action, prompt_id) of this session, for undo

    # -- shared state ---------------------------------------------------------------------------
    def _done(self, view: _View, pid: str) -> bool:
        return view.labeled(pid, self.labeler if self.overlap else None)

    def _left(self, view: _View) -> int:
        return sum(not self._done(view, pid) for pid in self.candidates)

    def _next(self) -> tuple[str | None, int]:
        """Claim the next prompt to show: (its id, or None; how many are still to rank)."""
        with self.labels.open() as view:
            self.queue = [pid for pid in self.queue if not self._done(view, pid)]
            free = [pid for pid in self.queue if self.overlap or not view.claimed_by_other(pid)]
            pid = free[0] if free else None
            view.claim(pid, self.labeler)
            return pid, self._left(view)

    def _release(self) -> int:
        with self.labels.open() as view:
            view.claim(None, self.labeler)
            return self._left(view)

    # -- display --------------------------------------------------------------------------------
    def order(self, pid: str) -> list[int]:
        """Original response indices in the order shown (a seeded shuffle per labeler and prompt, or as is)."""
        k = len(self.candidates[pid]["responses"])
        order = list(range(k))
        if self.shuffle:
            random.Random(f"label-{self.seed}-{self.labeler}-{pid}").shuffle(order)
        return order

    def _show(self, pid: str, done: int) -> None:
        c = self.candidates[pid]
        parts: list[Any] = [Text(visible(c["prompt"]), style="bold"), Text("")]
        shown_texts: list[str] = []
        for n, i in enumerate(self.order(pid), start=1):
            resp = c["responses"][i]
            line = Text(f"[{n}] ", style="bold cyan") + Text(visible(resp) if resp else "(empty response)")
            if resp in shown_texts:
                line += Text(f"  (identical to [{shown_texts.index(resp) + 1}])", style="bold yellow")
            if "ended" in c and not c["ended"][i]:
                line += Text("  (cut at the length limit)", style="dim")
            shown_texts.append(resp)
            parts.append(line)
        self.console.print(Panel(Group(*parts), title=Text(f"prompt {visible(pid, one_line=True)}"),
                                 subtitle=Text(f"{done}/{len(self.candidates)} ranked"), expand=False))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> SessionResult:
        res = SessionResult()
        try:
            self._loop(res)
        finally:
            # Also on Ctrl-C or a failed save: the claim goes (a claim left behind lapses with the process).
            with contextlib.suppress(OSError, StageError):
                res.left = self._release()
        res.ranked, res.skipped = len(self.added), len(self.skipped)
        if res.quit:
            self.console.print(f"Stopped; {res.left} prompts left. Rerun the same command to resume.")
        return res

    def _loop(self, res: SessionResult) -> None:
        pid, left = self._next()
        if pid is None:
            if left == 0:
                self.console.print(Text(f"Nothing to label: all {len(self.candidates)} prompts are ranked"
                                        + (f" by {visible(self.labeler, one_line=True)}." if self.overlap else ".")))
            else:
                self.console.print(f"All {left} prompts still to rank are on other labelers' screens right now; "
                                   "rerun later, or pass --overlap to rank prompts others rank too.")
            return
        self.console.print(f"{left} prompts to rank; type h for help.")
        shown = False
        while pid is not None:
            k = len(self.candidates[pid]["responses"])
            if not shown:
                self._show(pid, len(self.candidates) - left)
                shown = True
            line = self.read_line(f"ranking (best first, e.g. {example_ranking(k)}) or s/u/h/q: ")
            if line is None:  # end of input: same as quit, nothing is lost
                res.quit = True
                return
            cmd = line.strip().lower()
            if cmd in ("q", "quit", "exit"):
                res.quit = True
                return
            if cmd in ("h", "help", "?"):
                self.console.print(Text(help_text(k)))
                continue
            if cmd in ("s", "skip"):
                self.queue.remove(pid)
                self.skipped.append(pid)
                self.history.append(("skip", pid))
                res.log.append(f"skip {pid}")
                self.console.print(Text(f"skipped prompt {visible(pid, one_line=True)}; it is offered again next session",
                                        style="yellow"))
            elif cmd in ("u", "undo"):
                self._undo(res)
            else:
                try:
                    ranking, ties, unsafe = parse_answer(line, k)
                except StageError as exc:
                    self.console.print(Text(visible(f"not recorded: {exc}", one_line=True), style="red"))
                    continue
                self._label(pid, ranking, ties, unsafe, res)
                if self.limit is not None and len(self.added) >= self.limit:
                    self.console.print(f"Reached --limit {self.limit}.")
                    res.quit = True
                    return
            pid, left = self._next()
            shown = False
        if self.queue:  # the rest is on other labelers' screens
            self.console.print(f"The other {len(self.queue)} prompts still to rank are being ranked by other labelers.")
        else:
            self.console.print("All prompts handled." + (" Skipped ones are offered again next time." if self.skipped else ""))

    def _label(self, pid: str, shown_ranking: list[int], shown_ties: list[list[int]], shown_unsafe: list[int],
               res: SessionResult) -> None:
        c = self.candidates[pid]
        order = self.order(pid)
        record: dict[str, Any] = {"prompt_id": pid, "prompt": c["prompt"], "responses": list(c["responses"]),
                                  "ranking": [order[i] for i in shown_ranking], "labeler": self.labeler}
        if shown_ties:
            record["ties"] = [[order[i] for i in group] for group in shown_ties]
        if shown_unsafe:
            record["unsafe"] = sorted(order[i] for i in shown_unsafe)
        if self.shuffle:
            record["shown"] = order
        if "models" in c:
            record["models"] = list(c["models"])
        with self.labels.open() as view:
            view.put(record)
        self.queue.remove(pid)
        if pid in self.skipped:
            self.skipped.remove(pid)
        self.added.append(pid)
        self.history.append(("label", pid))
        res.log.append(f"label {pid} {record['ranking']}")
        typed = "".join(f"{n + 1}{'=' if any(n in g and m in g for g in shown_ties) else '>'}"
                        for n, m in zip(shown_ranking, shown_ranking[1:])) + str(shown_ranking[-1] + 1)
        flagged = f"  (flagged unsafe: {', '.join(str(i + 1) for i in shown_unsafe)})" if shown_unsafe else ""
        self.console.print(Text(f"saved: {typed}{flagged}", style="green"))

    def _undo(self, res: SessionResult) -> None:
        if self.history:
            action, pid = self.history.pop()
        else:
            # Nothing done this session: take back this labeler's last saved label (from an earlier session).
            with self.labels.open() as view:
                mine = [r["prompt_id"] for r in view.records
                        if r["labeler"] == self.labeler and r["prompt_id"] in self.candidates]
            if not mine:
                self.console.print(Text("nothing to undo", style="yellow"))
                return
            action, pid = "label", mine[-1]
        if action == "label":
            with self.labels.open() as view:
                view.remove(pid, self.labeler)
            if pid in self.added:
                self.added.remove(pid)
        else:
            self.skipped.remove(pid)
        self.queue = [pid] + [p for p in self.queue if p != pid]
        res.log.append(f"undo {action} {pid}")
        self.console.print(Text(f"undone: {action} of prompt {visible(pid, one_line=True)}", style="yellow"))
