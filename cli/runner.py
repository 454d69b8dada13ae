"""Runs one stage for a CLI command: lock its outputs, load its params section strictly, call `run`, print one line.

Exit codes: 0 success, 1 a failed run (one-line error on stderr), 2 bad usage (typer's own),
130 interrupted (a rerun resumes from the last checkpoint where the stage keeps one).

Faults a real run meets, handled here once for every stage:
- another process writing the same outputs: each output is locked (rlhf/locks.py) for the whole run,
  and a second run refuses to start; a lock left by a killed run is taken over;
- a write that fails (a full disk, a permission, a read-only disk): the write sites name the file and
  remove their temporary files (rlhf/io.py); here the message gets the option that moves the output,
  the partial outputs are removed (as `dvc repro` removes a stage's outputs before running it), and
  the checkpoint is kept, so a rerun after freeing space resumes from it. An OSError that no write site
  caught is still one line, never a traceback.
Untrusted text in errors and summaries is printed with its control characters escaped (rlhf/terminal.py).
"""

from __future__ import annotations

import errno
import importlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

out_console = Console()
err_console = Console(stderr=True)

PARAMS_HELP = "params file whose section for this stage is used"

# The options that name what a stage writes (dvc.yaml's outs, metrics and plots, plus the checkpoints);
# a stage that only reads an option of the same name lists it in READ_ONLY (evaluate reads the --plots it is given).
OUTPUT_OPTIONS = ("out", "value_out", "metrics", "headline", "plots", "reports", "checkpoints")
READ_ONLY = {"evaluate": {"plots"}}


def fail(message: str, code: int = 1) -> None:
    from rlhf.terminal import visible

    err_console.print(Text("error: ", style="bold red") + Text(visible(message, one_line=True)), soft_wrap=True)
    raise typer.Exit(code)


def stage_outputs(name: str, paths: dict[str, Any]) -> dict[str, Path]:
    """Option name -> path of everything `rlhf <name>` writes."""
    return {k: Path(v) for k, v in paths.items()
            if k in OUTPUT_OPTIONS and k not in READ_ONLY.get(name, set()) and v is not None}


def _option_of(path: Path, outputs: dict[str, Path]) -> str | None:
    """The option whose output contains `path` (the innermost one), as typed: `--value-out`."""
    full = Path(os.path.abspath(path))
    owners = [(len(Path(os.path.abspath(p)).parts), k) for k, p in outputs.items()
              if full.is_relative_to(Path(os.path.abspath(p)))]
    return f"--{max(owners)[1].replace('_', '-')}" if owners else None


def write_failed(name: str, exc: BaseException, outputs: dict[str, Path]) -> str:
    """The one line for a failed write; partial outputs removed, the checkpoint kept for the rerun."""
    from rlhf.errors import OutputError
    from rlhf.io import remove_outputs, write_failure

    if not isinstance(exc, OutputError):
        filename = getattr(exc, "filename", None)
        if filename:
            exc = write_failure(exc, filename) or exc
    if isinstance(exc, OutputError):
        message = exc.render(_option_of(exc.path, outputs))
    else:  # no file named (a write() on an open file): name the outputs the stage was writing
        from rlhf.io import write_errno

        codes = [write_errno(exc, path) for path in outputs.values()] or [write_errno(exc)]
        code = errno.ENOSPC if errno.ENOSPC in codes else next((c for c in codes if c), errno.EIO)
        listing = ", ".join(f"--{k.replace('_', '-')} {p}" for k, p in outputs.items())
        message = (f"{os.strerror(code).lower()} while {name} wrote its outputs ({listing}); "
                   "free space or fix that disk, or point them elsewhere")
    for option, path in outputs.items():
        if option != "checkpoints":
            try:
                remove_outputs(path)
            except OSError:
                pass  # a read-only disk: nothing was written there either
    checkpoint = outputs.get("checkpoints")
    if checkpoint is not None and (checkpoint / "checkpoint.pt").is_file():
        message += f"; the checkpoint in {checkpoint} is kept: rerun the same command to resume from it"
    return message


def run_stage(name: str, params_path: Path, *, overrides: Sequence[str] = (), **paths: Any) -> dict[str, Any]:
    """`overrides`: KEY=VALUE assignments over the params section (`rlhf.params.override`)."""
    from rlhf.errors import OutputError, StageError
    from rlhf.io import write_errno
    from rlhf.locks import output_locks
    from rlhf.params import load_section, override
    from rlhf.terminal import visible

    t0 = time.time()
    module = importlib.import_module(f"stages.{name}")
    outputs = stage_outputs(name, paths)
    # Under a launcher (torchrun, accelerate) every rank runs this; rank 0 writes, so rank 0 locks.
    outputs_to_lock = outputs if os.environ.get("RANK", "0") == "0" else {}

    def stale(path: Path, note: dict[str, Any]) -> None:
        err_console.print(Text(visible(f"note: taking over the lock of {path} left by pid {note.get('pid')} "
                                       "(that process has ended)"), style="dim"), soft_wrap=True)

    started = False
    try:
        with output_locks(outputs_to_lock, f"rlhf {name}", on_stale=stale):
            params = load_section(params_path, name, module.Params)
            if overrides:
                params = override(params, overrides, name)
            started = True
            result = module.run(params, **paths)
    except OutputError as exc:
        fail(write_failed(name, exc, outputs) if started else exc.render(_option_of(exc.path, outputs)))
    except StageError as exc:
        fail(str(exc))
    except (OSError, RuntimeError) as exc:
        # The last line of defence: a write no write site caught (or torch's short-write RuntimeError),
        # or an input the OS would not read.
        code = write_errno(exc)
        if code is None or isinstance(exc, (ConnectionError, TimeoutError)):
            raise
        filename = getattr(exc, "filename", None)
        if filename and _option_of(Path(filename), outputs) is None:
            fail(f"{filename}: {os.strerror(code).lower()}; check the file, its folder's permissions and the disk, "
                 "then rerun")
        fail(write_failed(name, exc, outputs))
    except KeyboardInterrupt:
        err_console.print(f"{name}: interrupted; rerun the same command to resume from its last checkpoint")
        raise typer.Exit(130) from None
    summary = module.summary(result) if hasattr(module, "summary") else "done"
    line = visible(f"{summary} [{time.time() - t0:.1f} s]", one_line=True)
    out_console.print(Text(f"{name}: ", style="bold green") + Text(line), soft_wrap=True)
    return result
