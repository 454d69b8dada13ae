"""The one error type a stage raises for a failed run: the CLI prints its message and exits 1."""

from __future__ import annotations

from pathlib import Path


class StageError(Exception):
    """A run failed for a reason the user can fix; the message names the file, record or key and the fix."""


class OutputError(StageError):
    """Writing an output failed for a reason outside the program: a full disk, a permission, a read-only disk.

    `fix` may hold `{elsewhere}`, filled with the generic advice, or by the CLI with the option that
    names the output (`point --checkpoints elsewhere`), which only the CLI knows.
    """

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(self.render())

    def render(self, option: str | None = None) -> str:
        elsewhere = f"point {option} elsewhere" if option else "write to another folder"
        return f"{self.problem} writing {self.path}; {self.fix.format(elsewhere=elsewhere)}"

    def moved(self, path: Path) -> OutputError:
        """The same failure, named by the path the user knows (a temporary folder's final name)."""
        return OutputError(path, self.problem, self.fix)
