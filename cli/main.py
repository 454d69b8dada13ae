"""The `rlhf` command line: one thin command per pipeline stage, plus tools outside the DAG.

Heavy libraries (torch, transformers) are imported inside commands so `rlhf --help` stays instant.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rlhf",
    help=(
        "The InstructGPT recipe as a reproducible pipeline: SFT, reward model, PPO-ptx, evaluation.\n\n"
        "Each command is one DVC stage reading its section of params.yaml. Run everything with "
        "`dvc repro`, or one stage at a time:\n\n"
        "  rlhf prepare && rlhf pretrain && rlhf sft\n\n"
        "Change a hyperparameter with `dvc exp run -S sft.lr=3e-4`, not with a flag."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# Commands register themselves on `app` when their module is imported; the order is the DAG's.
from cli import spine  # noqa: E402,F401
from cli import feedback  # noqa: E402,F401
from cli import rl  # noqa: E402,F401
from cli import bestofn  # noqa: E402,F401
from cli import report  # noqa: E402,F401
from cli import seeds  # noqa: E402,F401
