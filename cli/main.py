"""The `rlhf` command line: one thin command per pipeline stage, plus tools outside the DAG.

The commands, in the DAG's order (dvc.yaml), and where each is defined; each runs stages/<name>.py
with the `<name>:` section of params.yaml:

    ingest                             cli/ingest.py       your own data set instead of the world (examples/hh)
    world, prepare, pretrain, sft      cli/supervised.py   data and the supervised policy (InstructGPT step 1)
    sample, rank, reward               cli/feedback.py     comparisons and the reward model (step 2)
    label                              cli/feedback.py     a tool outside the DAG: rank candidates by hand
    dpo                                cli/dpo.py          DPO on the rankings, no reward model (Rafailov et al. 2023)
    ppo                                cli/ppo.py          PPO-ptx against the reward model (step 3); its controls
                                                           sft_ptx and ppo_noptx run `rlhf ppo --set KEY=0`
    rloo, grpo                         cli/critic_free.py  critic-free policy gradients against the reward model
                                                           (Ahmadian et al. 2024; Shao et al. 2024)
    bestofn                            cli/bestofn.py      the reward model's best of n SFT samples (no training)
    evaluate                           cli/evaluate.py     base vs SFT vs policy, benchmarks, the report
    seeds                              cli/seeds.py        a tool outside the DAG: the pipeline over N seeds

Every command is a `cli.command.Command`: markdown-safe help, a stage's params listed in its --help, and
a hyperparameter given as a flag answered with the `dvc exp run -S` that sets it. Heavy libraries
(torch, transformers) are imported inside commands so `rlhf --help` stays instant.
"""

from __future__ import annotations

from typing import Any

import typer

from cli.command import Command


class App(typer.Typer):
    """A typer app whose commands are `Command`s unless a command asks for another class."""

    def command(self, *args: Any, cls: type | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(
    name="rlhf",
    help=(
        "The InstructGPT recipe as a reproducible pipeline: SFT, reward model, PPO-ptx, evaluation.\n\n"
        "Each command is one DVC stage reading its section of params.yaml. Run everything with "
        "`dvc repro`, or one stage at a time:\n\n"
        "  rlhf prepare && rlhf pretrain && rlhf sft\n\n"
        "Change a hyperparameter with `dvc exp run -S sft.lr=0.0003`, not with a flag; "
        "`rlhf <stage> --help` lists a stage's parameters and their values."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"rlhf {version('rlhf')}")
        except PackageNotFoundError:
            typer.echo("rlhf (not installed; `pip install -e .` in the repository)")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the installed rlhf version and exit."),
) -> None:
    pass


# Commands register themselves on `app` when their module is imported; the import order is the DAG's.
from cli import ingest  # noqa: E402,F401  your own data instead of the world
from cli import supervised  # noqa: E402,F401  world, prepare, pretrain, sft
from cli import feedback  # noqa: E402,F401  sample, rank, reward, label
from cli import dpo  # noqa: E402,F401
from cli import ppo  # noqa: E402,F401  ppo (and its controls sft_ptx, ppo_noptx: `rlhf ppo --set ...`)
from cli import critic_free  # noqa: E402,F401  rloo, grpo
from cli import bestofn  # noqa: E402,F401
from cli import evaluate  # noqa: E402,F401
from cli import seeds  # noqa: E402,F401  a tool outside the DAG: the pipeline over N training seeds
