"""The human labeling session behind `rlhf label`: show a prompt and its K responses, record a ranking.

The labeler types a ranking best first, e.g. `2>1>4>3` (numbers as shown, 1..K), or a command:
`s` skip, `u` undo, `h` help, `q` quit. Every answer is written to the labels file at once, atomically
(the whole file is rewritten to a temporary sibling and moved into place), so closing the terminal
loses nothing; a new session skips the prompts this labeler has already ranked.

Labels file: the rankings format (docs/formats.md), one record per (prompt, labeler), read by `rank` when
`rank.source: human`:
  {"prompt_id", "prompt", "responses": [K strings], "ranking": [0-based indices, best first], "labeler"}

Input comes from `read_line(prompt_text) -> str | None` (None = end of input, treated as quit), so the
session can be driven by scripted stdin in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from rlhf.errors import StageError
from rlhf.io import RANKING_SCHEMA, read_jsonl, write_jsonl

HELP = """\
Rank the responses from best to worst by their numbers, e.g. 2>1>4>3 (spaces also work: 2 1 4 3).
Judge as InstructGPT's labelers did: helpful (does what was asked), truthful (no made-up facts),
harmless (no insults or stereotypes), in that order unless harm is at stake.
Commands:  s / skip   next prompt (it is offered again next session)
           u / undo   take back the last answer or skip of this session (or your last saved label)
           h / help   this text
           q / quit   stop; every answer so far is saved, rerun the command to resume"""


@dataclass
class SessionResult:
    labeled: int = 0
    skipped: int = 0
    undone: int = 0
    remaining: int = 0
    quit: bool = False
    log: list[str] = field(default_factory=list)


class LabelSession:
    """One labeler working through the candidates that they have not ranked yet."""

    def __init__(self, candidates: list[dict[str, Any]], out: Path, labeler: str, *, console: Console,
                 read_line: Callable[[str], str | None]):
        if not labeler.strip():
            raise StageError("--labeler must be a non-empty name (it is stored with every ranking)")
        self.candidates = {c["prompt_id"]: c for c in candidates}
        self.out = Path(out)
        self.labeler = labeler
        self.console = console
        self.read_line = read_line
        self.records: list[dict[str, Any]] = read_jsonl(self.out, RANKING_SCHEMA, allow_empty=True) if self.out.exists() else []
        done = {r["prompt_id"] for r in self.records if r["labeler"] == labeler}
        self.pending = [pid for pid in self.candidates if pid not in done]
        self.history: list[tuple[str, str]] = []  # (action, prompt_id) of this session, for undo

    # -- persistence ---------------------------------------------------------------------------
    def _save(self) -> None:
        write_jsonl(self.out, self.records)  # atomic: temporary sibling + os.replace

    def _label(self, pid: str, ranking: list[int]) -> None:
        c = self.candidates[pid]
        self.records.append({"prompt_id": pid, "prompt": c["prompt"], "responses": list(c["responses"]),
                             "ranking": ranking, "labeler": self.labeler})
        self._save()

    def _unlabel(self, pid: str) -> None:
        for i in range(len(self.records) - 1, -1, -1):
            r = self.records[i]
            if r["prompt_id"] == pid and r["labeler"] == self.labeler:
                del self.records[i]
                break
        self._save()

    # -- display -------------------------------------------------------------------------------
    def _show(self, pid: str) -> None:
        c = self.candidates[pid]
        total = len(self.candidates)
        mine = sum(r["labeler"] == self.labeler and r["prompt_id"] in self.candidates for r in self.records)
        parts: list[Any] = [Text(c["prompt"], style="bold"), Text("")]
        for i, resp in enumerate(c["responses"], start=1):
            line = Text(f"[{i}] ", style="bold cyan") + Text(resp or "(empty response)")
            if "ended" in c and not c["ended"][i - 1]:
                line += Text("  (cut at the length limit)", style="dim")
            parts.append(line)
        self.console.print(Panel(Group(*parts), title=f"prompt {pid}",
                                 subtitle=f"{mine}/{total} ranked by {self.labeler}", expand=False))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> SessionResult:
        res = SessionResult()
        if not self.pending:
            self.console.print(f"Nothing to label: {self.labeler} has ranked all {len(self.candidates)} prompts.")
            return res
        self.console.print(f"{len(self.pending)} prompts to rank; type h for help.")
        shown = None
        while self.pending:
            pid = self.pending[0]
            if shown != pid:
                self._show(pid)
                shown = pid
            k = len(self.candidates[pid]["responses"])
            line = self.read_line(f"ranking (best first, e.g. {'>'.join(str(i) for i in range(1, k + 1))}) or s/u/h/q: ")
            if line is None:  # end of input: same as quit, nothing is lost
                res.quit = True
                break
            cmd = line.strip().lower()
            if cmd in ("q", "quit", "exit"):
                res.quit = True
                break
            if cmd in ("h", "help", "?"):
                self.console.print(HELP)
                continue
            if cmd in ("s", "skip"):
                self.pending.pop(0)
                self.history.append(("skip", pid))
                res.skipped += 1
                res.log.append(f"skip {pid}")
                continue
            if cmd in ("u", "undo"):
                self._undo(res)
                shown = None
                continue
            from rlhf.rm import parse_ranking_text

            try:
                ranking = parse_ranking_text(line, k)
            except StageError as exc:
                self.console.print(Text(f"not recorded: {exc}", style="red"))
                continue
            self._label(pid, ranking)
            self.pending.pop(0)
            self.history.append(("label", pid))
            res.labeled += 1
            res.log.append(f"label {pid} {ranking}")
            self.console.print(Text(f"saved: {' > '.join(str(i + 1) for i in ranking)}", style="green"))
        res.remaining = len(self.pending)
        if res.quit:
            self.console.print(f"Stopped; {res.remaining} prompts left. Rerun the same command to resume.")
        else:
            self.console.print("All prompts handled." + (" Skipped ones are offered again next time." if res.skipped else ""))
        return res

    def _undo(self, res: SessionResult) -> None:
        if self.history:
            action, pid = self.history.pop()
        else:
            # Nothing done this session: take back this labeler's last saved label (from an earlier session).
            mine = [r["prompt_id"] for r in self.records if r["labeler"] == self.labeler and r["prompt_id"] in self.candidates]
            if not mine:
                self.console.print(Text("nothing to undo", style="yellow"))
                return
            action, pid = "label", mine[-1]
        if action == "label":
            self._unlabel(pid)
        self.pending.insert(0, pid)
        res.undone += 1
        res.log.append(f"undo {action} {pid}")
        self.console.print(Text(f"undone: {action} of prompt {pid}", style="yellow"))
