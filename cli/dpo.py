"""Direct Preference Optimization: the SFT model trained on the rankings directly, no reward model, no RL."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def dpo(
    sft: Path = typer.Option(Path("models/sft"), help="SFT model: the policy's start and the frozen reference"),
    data: Path = typer.Option(Path("data/rankings/rankings.jsonl"), help="comparisons (format: dpo.data_format)"),
    test: Path = typer.Option(Path("data/prepared/test.jsonl"), help="held-out test prompts for the KL and gold comparison"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file for the gold judge (skipped if absent)"),
    out: Path = typer.Option(Path("models/dpo"), help="HF causal-LM folder to write"),
    metrics: Path = typer.Option(Path("metrics/dpo.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/dpo"), help="dvclive folder for the training curves"),
    checkpoints: Path = typer.Option(Path("checkpoints/dpo"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """Train the policy with DPO on the rankings (Rafailov et al. 2023): SFT is the frozen reference.

    dpo.loss: pairs (default) uses all C(K,2) pairs of a prompt in one batch element, as the reward model
    does; plackett_luce uses each full ranking's likelihood (docs/algorithms.md compares them). Reports
    held-out preference accuracy of the implicit reward β log(π/π_ref), KL from SFT on sampled test
    answers, and the gold judge's score of greedy test answers of SFT and DPO.

    dpo.data_format says what --data holds, as for `rlhf reward`: rankings, pairwise or hh.

    Example:  rlhf dpo
    Example:  dvc exp run -S dpo.loss=plackett_luce -S dpo.beta=0.2
    """
    run_stage("dpo", params, sft=sft, data=data, test=test, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)
