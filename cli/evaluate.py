"""Evaluation: base vs SFT vs policy on held-out prompts and public benchmarks, and the report."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)
# The defaults are the DVC pipeline's evaluate stage (dvc.yaml's cmd lists them too, for its deps); its compare
# stage names the comparison algorithms' folders instead.
CURVE_STAGES = ("pretrain", "sft", "reward", "ppo", "sft_ptx", "ppo_noptx")
COST_STAGES = ("pretrain", "sft", "reward", "ppo", "sft_ptx", "ppo_noptx", "bestofn")


@app.command()
def evaluate(
    test: Path = typer.Option(Path("data/prepared/test.jsonl"), help="held-out test prompts, {'id', 'prompt'} per line"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file: gold judge and held-out labelers (skipped if absent)"),
    truthfulqa: Path = typer.Option(Path("data/raw/eval/truthfulqa_mc.json"), help="TruthfulQA multiple-choice JSON (skipped if absent)"),
    crows_pairs: Path = typer.Option(Path("data/raw/eval/crows_pairs.csv"), help="CrowS-Pairs CSV (skipped if absent)"),
    rtp: Path = typer.Option(Path("data/raw/eval/rtp.jsonl"), help="RealToxicityPrompts JSONL (skipped if absent)"),
    plots: list[Path] = typer.Option(
        [Path(f"plots/{s}") for s in CURVE_STAGES], help="a training stage's dvclive folder (plots/<stage>) whose "
        "curves the report shows; repeat for each stage; only these are read, a missing one is noted"),
    stage_metrics: list[Path] = typer.Option(
        [Path(f"metrics/{s}.json") for s in COST_STAGES], help="a training stage's metrics file (metrics/<stage>.json): "
        "its wall time and throughput, best-of-n's gold per n, the reward model's accuracy; repeat for each stage; "
        "a missing one is noted"),
    reports: Path = typer.Option(Path("reports"), help="folder for report.html, report.md, figures/, responses.jsonl"),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="metrics JSON (dvc metrics show/diff)"),
    headline: Path = typer.Option(Path("metrics/headline.json"), help="the ten-odd numbers to compare across experiments"),
    params: Path = Params,
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="override one key of the evaluate: section for this run, the value in YAML "
                                        "(dvc.yaml's compare stage sets models and pairs)"),
) -> None:
    """Compare the models in `evaluate.models` on held-out prompts and the public benchmarks; write the report.

    Helpfulness win rates (held-out labelers, human labels or a reward model as judge, 95% bootstrap
    intervals), TruthfulQA MC1/MC2, CrowS-Pairs and RealToxicityPrompts, exactly as the benchmarks define
    them (docs/evaluation.md). A benchmark whose file is absent is skipped and noted in the report.

    The report also puts every model on one gold-against-KL-from-SFT chart (KL measured here, on the same
    test prompts for all; best-of-n from its metrics) and tabulates each training stage's wall time and
    throughput from the metrics files given.

    Example:  rlhf evaluate && xdg-open reports/report.html
    Example:  rlhf evaluate --plots plots/sft --plots plots/dpo --stage-metrics metrics/dpo.json
    Example:  dvc exp run -S evaluate.judge=reward -S evaluate.reward_model=models/reward
    Example:  rlhf evaluate --set "models={sft: models/sft, dpo: models/dpo}" --set "pairs=[[dpo, sft]]" --reports reports_dpo
    """
    run_stage("evaluate", params, overrides=set_, test=test, world=world, truthfulqa=truthfulqa, crows_pairs=crows_pairs, rtp=rtp,
              plots=plots, stage_metrics=stage_metrics, reports=reports, metrics=metrics, headline=headline,
              params_file=params)
