"""Shared fixtures: a tiny end-to-end run of the pipeline, built once per test session.

The tiny profile (profiles/tiny.yaml) trains every stage in seconds, offline. `tiny_run` runs
world -> prepare -> pretrain -> sft into a temporary folder and returns its paths; later stages'
tests extend it instead of training their own models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "profiles" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def without_timing(metrics: Path | dict) -> dict:
    """A metrics file (path or parsed) without its `timing` block (rlhf.io.timing): the one part that differs
    between two runs of the same params on the same machine (wall times, and where a resumed run started)."""
    m = json.loads(Path(metrics).read_text()) if isinstance(metrics, (str, Path)) else dict(metrics)
    m.pop("timing", None)
    return m


def kill_after_first_checkpoint(args: list[str], checkpoint: Path, log: Path, timeout: float = 300,
                                cwd: Path = ROOT) -> int:
    """Run `python -m cli ARGS` in `cwd`, SIGKILL it once `checkpoint` exists; return the checkpoint's step.
    The resume tests of every training stage start this way."""
    import torch

    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=cwd, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while not checkpoint.is_file():
                if proc.poll() is not None:
                    pytest.fail(f"exited with {proc.returncode} before writing {checkpoint}:\n{log.read_text()}")
                if time.time() - t0 > timeout:
                    pytest.fail(f"no checkpoint after {timeout} s:\n{log.read_text()}")
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The checkpoint was moved into place whole (os.replace): it loads, tensors only (weights_only).
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["step"]


def assert_runs_agree(one: Path, two: Path, base: Path) -> None:
    """Two trainings of the same model from `base` (say 1 and 2 processes) agree far more closely than either
    moved: over the whole model the difference is under 0.15 of the move, and under 0.4 in every tensor. Summation
    order differs between the runs, and a tensor that barely moves (a norm's weight) carries relatively more of
    that rounding (measured on the tiny profile, 2-core AMD EPYC: 0.09 overall, at most 0.27 in a tensor)."""
    from safetensors.torch import load_file

    w1, w2, w0 = (load_file(p / "model.safetensors") for p in (one, two, base))
    assert w1.keys() == w2.keys()
    apart = {n: float((w1[n] - w2[n]).norm()) for n in w1}
    moved = {n: float((w1[n] - w0[n]).norm()) for n in w1}
    assert sum(a * a for a in apart.values()) ** 0.5 <= 0.15 * sum(m * m for m in moved.values()) ** 0.5
    for name in w1:
        assert apart[name] <= 0.4 * moved[name] + 1e-6, (name, apart[name], moved[name])


def tiny_params(stage: str, **overrides):
    """The tiny profile's params for `stage`, with fields replaced by `overrides`."""
    import dataclasses
    import importlib

    from rlhf.params import load_section

    module = importlib.import_module(f"stages.{stage}")
    return dataclasses.replace(load_section(TINY, stage, module.Params), **overrides)


@dataclass(frozen=True)
class TinyRun:
    root: Path
    raw: Path
    world: Path
    prepared: Path
    base: Path
    sft: Path
    metrics: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    from stages import prepare, pretrain, sft, world

    root = tmp_path_factory.mktemp("tiny")
    raw, prepared, models, metrics = root / "data/raw", root / "data/prepared", root / "models", root / "metrics"
    world.run(tiny_params("world"), out=raw)
    prepare.run(tiny_params("prepare"), raw=raw, out=prepared, metrics=metrics / "prepare.json")
    pretrain.run(tiny_params("pretrain"), corpus=prepared / "corpus.jsonl", out=models / "base",
                 metrics=metrics / "pretrain.json", plots=root / "plots/pretrain", checkpoints=root / "ckpt/pretrain")
    sft.run(tiny_params("sft"), base=models / "base", data=prepared, world=raw / "world.json", out=models / "sft",
            metrics=metrics / "sft.json", plots=root / "plots/sft", checkpoints=root / "ckpt/sft")
    return TinyRun(root=root, raw=raw, world=raw / "world.json", prepared=prepared, base=models / "base",
                   sft=models / "sft", metrics=metrics)


@dataclass(frozen=True)
class TinyRM(TinyRun):
    """`tiny_run` plus the feedback stages' outputs: candidates, rankings and the reward model folder."""

    candidates: Path
    rankings: Path
    reward: Path


@pytest.fixture(scope="session")
def tiny_rm(tiny_run) -> TinyRM:
    """tiny_run -> sample -> rank -> reward on the tiny profile (same temp root, metrics beside the others)."""
    import dataclasses

    from stages import rank, reward, sample

    root, metrics = tiny_run.root, tiny_run.metrics
    candidates = root / "data/samples/candidates.jsonl"
    rankings = root / "data/rankings/rankings.jsonl"
    sample.run(tiny_params("sample"), model=tiny_run.sft, prompts=tiny_run.prepared / "rm.jsonl", out=candidates,
               metrics=metrics / "sample.json")
    rank.run(tiny_params("rank"), candidates=candidates, world=tiny_run.world, labels=root / "labels/human.jsonl",
             out=rankings, metrics=metrics / "rank.json")
    reward.run(tiny_params("reward"), sft=tiny_run.sft, data=rankings, demos=tiny_run.prepared / "sft.jsonl",
               world=tiny_run.world, out=root / "models/reward", metrics=metrics / "reward.json",
               plots=root / "plots/reward", checkpoints=root / "ckpt/reward")
    fields = {f.name: getattr(tiny_run, f.name) for f in dataclasses.fields(tiny_run)}
    return TinyRM(**fields, candidates=candidates, rankings=rankings, reward=root / "models/reward")
