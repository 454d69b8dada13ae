"""Commands of the feedback work: sample, rank, reward (DVC stages) and label (a tool outside the DAG)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, fail, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def sample(
    model: list[Path] = typer.Option([Path("models/sft")], help="policy to sample from (the SFT model); repeat it "
                                     "to share each prompt's K slots among several models"),
    prompts: Path = typer.Option(Path("data/prepared/rm.jsonl"), help="prompts to rank, {'id', 'prompt'} per line"),
    out: Path = typer.Option(Path("data/samples/candidates.jsonl"), help="candidates JSONL to write"),
    metrics: Path = typer.Option(Path("metrics/sample.json"), help="metrics JSON"),
    params: Path = Params,
) -> None:
    """Sample K responses per reward-model prompt from the SFT model (temperature 1, KV cache).

    Writes one record per prompt: {"prompt_id", "prompt", "responses": [K], "ended": [K]}.

    Example:  rlhf sample
    Example:  dvc exp run -S sample.k=6
    Example:  rlhf sample --model models/sft --model models/policy_round1 --out data/samples/round2.jsonl
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
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="override one key of the reward: section for this run (dvc.yaml's rounds)"),
) -> None:
    """Train the reward model: all C(K,2) pairs of a prompt in one batch element (InstructGPT).

    Reports held-out pairwise accuracy against the labels and the gold judge, Spearman correlation
    with the gold judge, and the bias that centers the demonstrations' reward at 0.

    reward.data_format says what --data holds: K-way rankings from `rlhf rank` (default), pairwise
    {prompt, chosen, rejected} records, or Anthropic HH-RLHF {chosen, rejected} transcripts ('hh').

    Example:  rlhf reward
    Example:  rlhf reward --data hh-rlhf/train.jsonl --params hh-params.yaml
    Example:  rlhf reward --set extra_pairs=data/rankings/round2.jsonl --set extra_format=rankings
    """
    run_stage("reward", params, overrides=set_, sft=sft, data=data, demos=demos, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)


@app.command()
def label(
    labeler: str = typer.Option(..., "--labeler", help="your name, stored with every ranking"),
    candidates: Path = typer.Option(Path("data/samples/candidates.jsonl"),
                                    help="candidates to rank (or reports/responses.jsonl to judge the models)"),
    out: Path = typer.Option(Path("labels/human.jsonl"),
                             help="labels file (rankings format), saved after every answer; several labelers may share it"),
    overlap: bool = typer.Option(False, "--overlap",
                                 help="also rank prompts other labelers ranked or are ranking (to measure agreement)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="stop after this many rankings"),
    shuffle: Optional[bool] = typer.Option(None, "--shuffle/--no-shuffle", show_default=False,
                                           help="show each prompt's responses in a seeded random order, saved in the "
                                                "file's order [default: on for files that name their models]"),
    seed: int = typer.Option(0, "--seed", help="seed of the shuffled order (with the labeler's name and the prompt id)"),
) -> None:
    """Rank candidate responses by hand in the terminal (outside the DAG; `rank` reads the result).

    Shows a prompt and its K responses; type a ranking of all K best first (for K=4: 2>1>4>3; a tie:
    2=1>4>3; flag response 3 as unsafe: 2>1>4>3 !3), or s (skip), u (undo), h (help), q (quit). Each
    answer is saved at once; rerun to resume where you stopped. Several labelers can work on one file
    at once: each gets prompts nobody else has ranked or is ranking, unless --overlap. Then
    `dvc exp run -S rank.source=human` trains the reward model on your rankings.

    Example:  rlhf label --labeler alice

    Example:  rlhf label --labeler bob --overlap --limit 20

    Example:  rlhf label --labeler carol --candidates reports/responses.jsonl --out labels/eval.jsonl   (blinded)
    """
    import sys

    from rich.console import Console
    from rich.text import Text

    from rlhf.errors import OutputError, StageError
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
        session = LabelSession(read_candidates(candidates), out, labeler, console=console, read_line=read_line,
                               overlap=overlap, limit=limit, shuffle=shuffle, seed=seed)
        result = session.run()
    except OutputError as exc:
        fail(exc.render("--out") + "; the answers before this one are saved")
    except StageError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        console.print("\ninterrupted; every answer so far is saved. Rerun the same command to resume.")
        raise typer.Exit(130) from None
    console.print(Text(f"label: {result.ranked} ranked, {result.skipped} skipped, {result.left} left -> {out}"))
