"""Command of the best-of-n control: bestofn (a DVC stage; no training)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def bestofn(
    sft: Path = typer.Option(Path("models/sft"), help="SFT model folder to sample from"),
    reward: Path = typer.Option(Path("models/reward"), help="reward model folder that picks the best of n"),
    test: Path = typer.Option(Path("data/prepared/test.jsonl"), help="held-out prompts, {'id', 'prompt'} per line"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file for the gold judge (proxy only if absent)"),
    metrics: Path = typer.Option(Path("metrics/bestofn.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/bestofn"), help="folder for bestofn.csv (n, kl, sqrt_kl, proxy, gold)"),
    params: Path = Params,
) -> None:
    """Best-of-n against the reward model, n = 1, 2, 4, ..., N: gold and proxy vs KL = log n - (n-1)/n.

    Samples N responses per test prompt from the SFT model, scores them with the reward model and the
    gold judge, and reports the expected score of the RM's pick from n samples (unbiased over all
    n-subsets, Gao et al. 2022), beside SFT's greedy answer on the same prompts.

    Example:  rlhf bestofn
    Example:  dvc exp run -S bestofn.samples=32
    """
    run_stage("bestofn", params, sft=sft, reward=reward, test=test, world=world, metrics=metrics, plots=plots)
