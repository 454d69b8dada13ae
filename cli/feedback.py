"""Commands of the feedback work: sample, rank, reward (DVC stages) and label (a tool outside the DAG)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, fail, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def sample(
    model: Path = typer.Option(Path("models/sft"), help="policy to sample from (the SFT model)"),
    prompts: Path = typer.Option(Path("data/prepared/rm.jsonl"), help="prompts to rank, {'id', 'prompt'} per line"),
    out: Path = typer.Option(Path("data/samples/candidates.jsonl"), help="candidates JSONL to write"),
    metrics: Path = typer.Option(Path("metrics/sample.json"), help="metrics JSON"),
    params: Path = Params,
) -> None:
    """Sample K responses per reward-model prompt from the SFT model (temperature 1, KV cache).

    Writes one record per prompt: {"prompt_id", "prompt", "responses": [K], "ended": [K]}.

    Example:  rlhf sample && dvc exp run -S sample.k=6
    """
    run_stage("sample", params, model=model, prompts=prompts, out=out, metrics=metrics)


@app.command()
def rank(
    candidates: Path = typer.Option(Path("data/samples/candidates.jsonl"), help="candidates from `rlhf sample`"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file: simulated labelers and gold judge"),
    labels: Path = typer.Option(Path("labels/human.jsonl"), help="human rankings from `rlhf label` (rank.source: human)"),
    out: Path = typer.Option(Path("data/rankings/rankings.jsonl"), help="rankings JSONL to write"),
    metrics: Path = typer.Option(Path("metrics/rank.json"), help="agreement metrics JSON"),
    params: Path = Params,
) -> None:
    """Rank each prompt's candidates best first, by simulated labelers or from human labels.

    rank.source: simulated (default) draws one labeler of the world's training pool per prompt, several
    for a share of prompts, and reports inter-labeler agreement and agreement with the gold judge.
    rank.source: human takes the rankings written by `rlhf label` and names any prompt left unlabeled.

    Example:  rlhf rank
    Example:  dvc exp run -S rank.source=human
    """
    run_stage("rank", params, candidates=candidates, world=world, labels=labels, out=out, metrics=metrics)


@app.command()
def reward(
    sft: Path = typer.Option(Path("models/sft"), help="SFT model the reward model starts from"),
    data: Path = typer.Option(Path("data/rankings/rankings.jsonl"), help="comparisons (format: reward.data_format)"),
    demos: Path = typer.Option(Path("data/prepared/sft.jsonl"), help="demonstrations whose mean reward is set to 0"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file for the gold judge (skipped if absent)"),
    out: Path = typer.Option(Path("models/reward"), help="HF folder to write (AutoModelForSequenceClassification)"),
    metrics: Path = typer.Option(Path("metrics/reward.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/reward"), help="dvclive folder for the training curves"),
    checkpoints: Path = typer.Option(Path("checkpoints/reward"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """Train the reward model: all C(K,2) pairs of a prompt in one batch element (InstructGPT).

    Reports held-out pairwise accuracy against the labels and the gold judge, Spearman correlation
    with the gold judge, and the bias that centers the demonstrations' reward at 0.

    Example:  rlhf reward
    Example:  dvc exp run -S reward.data_format=hh   (with --data pointing at HH-RLHF transcripts)
    """
    run_stage("reward", params, sft=sft, data=data, demos=demos, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)


@app.command()
def label(
    labeler: str = typer.Option(..., "--labeler", help="your name, stored with every ranking"),
    candidates: Path = typer.Option(Path("data/samples/candidates.jsonl"), help="candidates to rank"),
    out: Path = typer.Option(Path("labels/human.jsonl"), help="labels file (rankings format), saved after every answer"),
) -> None:
    """Rank candidate responses by hand in the terminal (outside the DAG; `rank` reads the result).

    Shows a prompt and its K responses; type a ranking best first such as 2>1>4>3, or s (skip),
    u (undo), h (help), q (quit). Each answer is saved at once; rerun to resume where you stopped.
    Then `dvc exp run -S rank.source=human` trains the reward model on your rankings.

    Example:  rlhf label --labeler alice
    """
    import sys

    from rich.console import Console

    from rlhf.errors import StageError
    from rlhf.labeling import LabelSession
    from rlhf.rm import read_candidates

    console = Console(highlight=False)

    def read_line(prompt: str) -> str | None:
        console.print(prompt, end="")
        line = sys.stdin.readline()
        if not line:
            console.print()
            return None
        return line.rstrip("\n")

    try:
        session = LabelSession(read_candidates(candidates), out, labeler, console=console, read_line=read_line)
        result = session.run()
    except StageError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        console.print("\ninterrupted; every answer so far is saved. Rerun the same command to resume.")
        raise typer.Exit(130) from None
    console.print(f"label: {result.labeled} ranked, {result.skipped} skipped, {result.remaining} left -> {out}")
