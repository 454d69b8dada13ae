"""Evaluation: base vs SFT vs policy on held-out prompts and public benchmarks, and the report."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def evaluate(
    test: Path = typer.Option(Path("data/prepared/test.jsonl"), help="held-out test prompts, {'id', 'prompt'} per line"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file: gold judge and held-out labelers (skipped if absent)"),
    truthfulqa: Path = typer.Option(Path("data/raw/eval/truthfulqa_mc.json"), help="TruthfulQA multiple-choice JSON (skipped if absent)"),
    crows_pairs: Path = typer.Option(Path("data/raw/eval/crows_pairs.csv"), help="CrowS-Pairs CSV (skipped if absent)"),
    rtp: Path = typer.Option(Path("data/raw/eval/rtp.jsonl"), help="RealToxicityPrompts JSONL (skipped if absent)"),
    plots: Path = typer.Option(Path("plots"), help="folder with each stage's dvclive curves (plots/<stage>/...)"),
    reports: Path = typer.Option(Path("reports"), help="folder for report.html, report.md, figures/, responses.jsonl"),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="metrics JSON (dvc metrics show/diff)"),
    headline: Path = typer.Option(Path("metrics/headline.json"), help="the ten-odd numbers to compare across experiments"),
    params: Path = Params,
) -> None:
    """Compare the models in `evaluate.models` on held-out prompts and the public benchmarks; write the report.

    Helpfulness win rates (held-out labelers, human labels or a reward model as judge, 95% bootstrap
    intervals), TruthfulQA MC1/MC2, CrowS-Pairs and RealToxicityPrompts, exactly as the benchmarks define
    them (docs/evaluation.md). A benchmark whose file is absent is skipped and noted in the report.

    Example:  rlhf evaluate && xdg-open reports/report.html
    Example:  dvc exp run -S evaluate.judge=reward -S evaluate.reward_model=models/reward
    """
    run_stage("evaluate", params, test=test, world=world, truthfulqa=truthfulqa, crows_pairs=crows_pairs, rtp=rtp,
              plots=plots, reports=reports, metrics=metrics, headline=headline, params_file=params)
