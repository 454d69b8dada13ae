"""Data and the supervised policy (InstructGPT step 1): world, prepare, pretrain, sft."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage

Params = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


@app.command()
def world(
    out: Path = typer.Option(Path("data/raw"), help="folder to write the world's files into (replaced whole)"),
    params: Path = Params,
) -> None:
    """Generate the default world: corpus, prompt pool, demonstrations, gold judge data, eval suites.

    Deterministic from `world.seed`: the same params write byte-identical files.

    Example:  rlhf world --out data/raw
    """
    run_stage("world", params, out=out)


@app.command()
def prepare(
    raw: Path = typer.Option(Path("data/raw"), help="folder with prompts.jsonl, demonstrations.jsonl, corpus.jsonl"),
    out: Path = typer.Option(Path("data/prepared"), help="folder for the sft/sft_val/rm/ppo/test splits"),
    metrics: Path = typer.Option(Path("metrics/prepare.json"), help="split sizes and duplicate counts"),
    params: Path = Params,
) -> None:
    """Validate raw inputs, deduplicate, split prompts into disjoint sft / rm / ppo / test sets.

    Refuses to run (exit 1) if a test prompt appears in any training input.

    Example:  rlhf prepare --raw data/raw --out data/prepared
    """
    run_stage("prepare", params, raw=raw, out=out, metrics=metrics)


@app.command()
def pretrain(
    corpus: Path = typer.Option(Path("data/prepared/corpus.jsonl"), help="pretraining documents, {'text': ...} per line"),
    out: Path = typer.Option(Path("models/base"), help="HF model folder to write"),
    metrics: Path = typer.Option(Path("metrics/pretrain.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/pretrain"), help="dvclive folder for the loss curves"),
    checkpoints: Path = typer.Option(Path("checkpoints/pretrain"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """Train a BPE tokenizer and a small Llama from scratch, or take `pretrain.base_model` from Hugging Face.

    Example:  rlhf pretrain
    Example:  dvc exp run -S pretrain.base_model=/path/to/hf-model-folder
    """
    run_stage("pretrain", params, corpus=corpus, out=out, metrics=metrics, plots=plots, checkpoints=checkpoints)


@app.command()
def sft(
    base: Path = typer.Option(Path("models/base"), help="base model folder"),
    data: Path = typer.Option(Path("data/prepared"), help="folder with sft.jsonl, sft_val.jsonl, test.jsonl"),
    world: Path = typer.Option(Path("data/raw/world.json"), help="world file for the gold judge (skipped if absent)"),
    out: Path = typer.Option(Path("models/sft"), help="HF model folder to write"),
    metrics: Path = typer.Option(Path("metrics/sft.json"), help="metrics JSON"),
    plots: Path = typer.Option(Path("plots/sft"), help="dvclive folder for the loss curves"),
    checkpoints: Path = typer.Option(Path("checkpoints/sft"), help="resumable checkpoints (removed on success)"),
    params: Path = Params,
) -> None:
    """Fine-tune the base model on demonstrations (loss on response tokens only, EOS appended).

    Reports the gold judge's mean score of base and SFT greedy answers on held-out test prompts.

    Example:  rlhf sft
    """
    run_stage("sft", params, base=base, data=data, world=world, out=out, metrics=metrics, plots=plots,
              checkpoints=checkpoints)
