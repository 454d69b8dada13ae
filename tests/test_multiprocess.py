"""Multi-process training: sft under `accelerate launch --multi_gpu --num_processes 2` (DDP, gloo on CPU).

The one-process run is a plain `python -m cli sft`; the two-process run adds the launcher (its own
start-up, ~3-5 s here, is in its wall time). Same params, so the global batch is the same: with two
processes each rank computes the loss on its half of every batch (`Dist.shard`) and the ranks average their
gradients. The result is not bit-identical to one process (each rank's loss is a mean over its own
response tokens, so the average of the two halves weights tokens slightly differently than one mean
over the whole batch, and the all-reduce sums in another order) but it must be close. Wall times of
both runs are printed (`pytest -s` shows them). The gold comparison is skipped (no world file) so
the timing is training plus start-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


from tests.conftest import ROOT, TINY


def free_port() -> int:
    with socket.socket() as s:  # other jobs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_sft(tiny_run, out_root: Path, processes: int) -> tuple[dict, float]:
    if processes == 1:  # how one process is normally run
        launcher = [sys.executable, "-m", "cli"]
    else:
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), "-m", "cli"]
    cmd = [*launcher, "sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared),
           "--world", str(out_root / "no-world.json"), "--out", str(out_root / "sft"),
           "--metrics", str(out_root / "sft.json"), "--plots", str(out_root / "plots"),
           "--checkpoints", str(out_root / "ckpt"), "--params", str(TINY)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((out_root / "sft.json").read_text()), wall


def test_two_process_sft_matches_one_process(tiny_run, tmp_path):
    from safetensors.torch import load_file

    one, wall_1 = launch_sft(tiny_run, tmp_path / "one", 1)
    two, wall_2 = launch_sft(tiny_run, tmp_path / "two", 2)
    print(f"\nsft on the tiny profile: 1 process {wall_1:.1f} s, 2 processes {wall_2:.1f} s "
          f"(train loss {one['train_loss']} vs {two['train_loss']}; val loss {one['val_loss']} vs {two['val_loss']})")

    assert one["processes"] == 1 and two["processes"] == 2
    assert one["steps"] == two["steps"]  # same global batch, same number of optimizer steps
    assert abs(one["train_loss"] - two["train_loss"]) < 0.02 * one["train_loss"]
    assert abs(one["val_loss"] - two["val_loss"]) < 0.02 * one["val_loss"]
    w1, w2 = load_file(tmp_path / "one/sft/model.safetensors"), load_file(tmp_path / "two/sft/model.safetensors")
    base = load_file(tiny_run.base / "model.safetensors")
    for name in w1:
        moved = (w1[name] - base[name]).norm()
        # The two runs agree far more closely than either moved away from the base model.
        assert (w1[name] - w2[name]).norm() <= 0.2 * moved + 1e-6, name
    assert not (tmp_path / "two/ckpt").exists() and (tmp_path / "two/sft/config.json").is_file()


def test_two_process_reward_matches_one_process(tiny_rm, tmp_path):
    """The reward model under 2 processes: whole K-way groups per rank, gradients averaged."""
    out = tmp_path / "two"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "cli", "reward", "--sft", str(tiny_rm.sft),
           "--data", str(tiny_rm.rankings), "--demos", str(tiny_rm.prepared / "sft.jsonl"),
           "--world", str(tiny_rm.world), "--out", str(out / "reward"), "--metrics", str(out / "reward.json"),
           "--plots", str(out / "plots"), "--checkpoints", str(out / "ckpt"), "--params", str(TINY)]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=600)
    print(f"\nreward on the tiny profile, 2 processes: {time.time() - t0:.1f} s")
    assert res.returncode == 0, res.stdout + res.stderr
    one = json.loads((tiny_rm.metrics / "reward.json").read_text())
    two = json.loads((out / "reward.json").read_text())
    assert one["train"]["steps"] == two["train"]["steps"]
    assert abs(one["train"]["train_loss"] - two["train"]["train_loss"]) < 0.05
    assert abs(one["heldout"]["accuracy_labels"] - two["heldout"]["accuracy_labels"]) < 0.1
    assert (out / "reward/config.json").is_file() and not (out / "ckpt").exists()


def test_ppo_refuses_a_multi_process_launch(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["ppo", "--params", str(TINY), "--sft", str(tmp_path / "x")],
                             env={"WORLD_SIZE": "2", "RANK": "0"})
    assert res.exit_code == 1 and "one process" in res.output
