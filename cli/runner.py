"""Runs one stage for a CLI command: load its params section strictly, call `run`, print one line.

Exit codes: 0 success, 1 a failed run (one-line error on stderr), 2 bad usage (typer's own),
130 interrupted (a rerun resumes from the last checkpoint where the stage keeps one).
"""

from __future__ import annotations

import importlib
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


def fail(message: str, code: int = 1) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    raise typer.Exit(code)


def run_stage(name: str, params_path: Path, *, overrides: Sequence[str] = (), **paths: Any) -> dict[str, Any]:
    """`overrides`: KEY=VALUE assignments over the params section (`rlhf.params.override`)."""
    from rlhf.errors import StageError
    from rlhf.params import load_section, override

    t0 = time.time()
    module = importlib.import_module(f"stages.{name}")
    try:
        params = load_section(params_path, name, module.Params)
        if overrides:
            params = override(params, overrides, name)
        result = module.run(params, **paths)
    except StageError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print(f"{name}: interrupted; rerun the same command to resume from its last checkpoint")
        raise typer.Exit(130) from None
    summary = module.summary(result) if hasattr(module, "summary") else "done"
    out_console.print(Text(f"{name}: ", style="bold green") + Text(f"{summary} [{time.time() - t0:.1f} s]"), soft_wrap=True)
    return result
