"""`rlhf seeds run` and `rlhf seeds summarize`: the pipeline over N training seeds (a tool outside the DAG)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import fail, out_console

seeds_app = typer.Typer(
    help=("Results over training seeds: run the pipeline once per seed (DVC's experiment queue), then "
          "summarize mean, spread and 95% interval of every headline number.\n\n"
          "Example:  rlhf seeds run --seeds 3 && rlhf seeds summarize"),
    no_args_is_help=True,
)
app.add_typer(seeds_app, name="seeds")

PREFIX = typer.Option("seed", "--prefix", help="experiments are named PREFIX-SEED (seed-0, seed-1, ...)")
OUT_JSON = typer.Option(Path("results/seeds.json"), "--json", help="summary JSON to write")
OUT_MD = typer.Option(Path("results/seeds.md"), "--markdown", help="summary markdown table to write")


@seeds_app.command("run")
def run(
    seeds: int = typer.Option(3, "--seeds", "-n", min=1, help="number of training seeds: 0, 1, ..., N-1"),
    first: int = typer.Option(0, "--first", min=0, help="first seed (seed 0 is the default run)"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="experiments run at a time (each uses params' threads)"),
    prefix: str = PREFIX,
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params file whose seed keys are set"),
    summarize_after: bool = typer.Option(True, "--summarize/--no-summarize", help="write the summary at the end"),
    out_json: Path = OUT_JSON,
    out_md: Path = OUT_MD,
) -> None:
    """Queue one DVC experiment per training seed and run the queue; the workspace is left as it is.

    Sets `<section>.seed` of every params section that has one, except world, prepare and evaluate (the
    world, its splits and the judges stay fixed), with `dvc exp run --queue -S ...`, then runs them
    with `dvc exp run --run-all`. Needs a git repository whose params.yaml and dvc.yaml are committed.

    Example:  rlhf seeds run --seeds 3

    Example:  rlhf seeds run --seeds 2 --first 3 --prefix more   (seeds 3 and 4)
    """
    from rlhf.errors import StageError
    from rlhf.seeds import read_experiments, run_sweep, summarize, write_summary

    try:
        names = run_sweep(list(range(first, first + seeds)), params=params, prefix=prefix, jobs=jobs, cwd=Path.cwd(),
                          echo=lambda s: out_console.print(s, markup=False, highlight=False))
        if summarize_after:
            summary = summarize(read_experiments(Path.cwd(), names, prefix))
            write_summary(summary, out_json, out_md)
    except StageError as exc:
        fail(str(exc))
    out_console.print(f"seeds: ran {', '.join(names)}" + (f"; summary -> {out_md}, {out_json}" if summarize_after else ""))


@seeds_app.command("summarize")
def summarize_cmd(
    names: list[str] = typer.Argument(None, help="experiment names (default: every PREFIX-* experiment)"),
    prefix: str = PREFIX,
    runs: list[Path] = typer.Option(None, "--runs", help="read finished runs from these folders (each with metrics/) "
                                                          "instead of DVC experiments"),
    key: list[str] = typer.Option(None, "--key", help="extra glob over flattened metric paths, e.g. 'dpo.test.*.gold'"),
    out_json: Path = OUT_JSON,
    out_md: Path = OUT_MD,
) -> None:
    """Mean, sd, min/max and 95% t-interval of every headline number over the seed experiments.

    Reads each experiment's metrics (evaluate, reward, bestofn, ppo; missing files are skipped) through
    `dvc exp show --json`, or from folders given with --runs, and writes a JSON and a markdown table
    with the per-seed values and the CPU and torch version of this machine.

    Example:  rlhf seeds summarize

    Example:  rlhf seeds summarize --runs run-a --runs run-b --markdown docs/seed-table.md
    """
    from rlhf.errors import StageError
    from rlhf.seeds import HEADLINE, read_experiments, read_run_dir, summarize, write_summary

    try:
        exps = ([read_run_dir(p) for p in runs] if runs else read_experiments(Path.cwd(), names or None, prefix))
        summary = summarize(exps, patterns=(*HEADLINE, *(key or [])))
        write_summary(summary, out_json, out_md)
    except StageError as exc:
        fail(str(exc))
    n = summary["numbers"]
    out_console.print(f"seeds: {len(exps)} runs, {len(n)} numbers -> {out_md}, {out_json}")
