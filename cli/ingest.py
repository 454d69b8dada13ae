"""Your own data instead of the default world: `rlhf ingest` (examples/hh runs it with DVC)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.main import app
from cli.runner import PARAMS_HELP, run_stage


@app.command()
def ingest(
    source: str = typer.Option(..., help="a .jsonl/.json or .parquet file, a folder saved with Dataset.save_to_disk, or a hub id"),
    out: Path = typer.Option(Path("data/raw"), help="folder for prompts, demonstrations, corpus and rankings (replaced whole)"),
    metrics: Path = typer.Option(Path("metrics/ingest.json"), help="records read, skipped by reason, written per file"),
    params: Path = typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP),
) -> None:
    """Import preference or chat data (HH-RLHF, pairwise, chat messages, rated completions) as the raw files.

    Each prompt gets one role by a hash of its text: demonstration, comparison or prompt pool, so no
    prompt is in two files. Malformed records are skipped and counted, up to `ingest.max_malformed_share`.
    Formats: docs/formats.md, "Importing your data".

    Example:  rlhf ingest --source hh_train.jsonl --out data/raw
    """
    run_stage("ingest", params, source=source, out=out, metrics=metrics)
