"""Kill-and-resume: a training stage SIGKILLed after a checkpoint resumes and ends exactly like an
uninterrupted run (same weights bit for bit, byte-identical metrics and curves).

The uninterrupted reference is the session's `tiny_run` (same tiny params, same inputs). The killed
run is a real `python -m cli <stage>` subprocess; it gets SIGKILL as soon as its first checkpoint file
appears, so it dies in the middle of training with no chance to clean up. Before it starts, a stale
model folder and metrics file stand at the output paths: the stage must delete them, so the kill
leaves nothing that looks like a finished result. The rerun goes through the same CLI (in process, to
spare an interpreter start) and must say that it resumed.
"""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TINY, kill_after_first_checkpoint, without_timing

def plant_stale_outputs(model_dir: Path, metrics: Path) -> None:
    """A finished-looking result of some earlier run at the output paths."""
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"old")
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text('{"train_loss": 0.1}\n')


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"tensor {name} differs after resume"
    for name in ("config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def assert_same_curves(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files, f"no curves in {a}"
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, f"curves differ after resume: {mismatch + errors}"


def kill_then_resume(stage: str, paths: dict[str, Path], tmp_path: Path, *, stale: bool = True) -> tuple[int, str]:
    """Kill `stage` at its first checkpoint, check it left no result, rerun it; (checkpoint step, rerun output)."""
    args = [stage, *[a for k, v in paths.items() for a in (f"--{k}", str(v))], "--params", str(TINY)]
    if stale:
        plant_stale_outputs(paths["out"], paths["metrics"])
    step = kill_after_first_checkpoint(args, paths["checkpoints"] / "checkpoint.pt", tmp_path / "killed.log")

    # Nothing that looks finished: the stale result was deleted at start, no new one was written.
    assert not paths["out"].exists(), "a killed run left a model folder"
    assert not paths["metrics"].exists(), "a killed run left a metrics file"

    from cli.main import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"resuming from {paths['checkpoints'] / 'checkpoint.pt'} at step {step}" in " ".join(res.output.split())
    assert not paths["checkpoints"].exists(), "checkpoints are removed once the run has finished"
    return step, res.output


def test_pretrain_resumes_after_sigkill_to_the_same_result(tiny_run, tmp_path):
    paths = {"corpus": tiny_run.prepared / "corpus.jsonl", "out": tmp_path / "models/base",
             "metrics": tmp_path / "metrics/pretrain.json", "plots": tmp_path / "plots/pretrain",
             "checkpoints": tmp_path / "checkpoints/pretrain"}
    step, _ = kill_then_resume("pretrain", paths, tmp_path)
    assert 0 < step < 30
    assert without_timing(paths["metrics"]) == without_timing(tiny_run.metrics / "pretrain.json")
    assert_same_weights(paths["out"], tiny_run.base)
    assert_same_curves(paths["plots"], tiny_run.root / "plots/pretrain")


def test_sft_resumes_after_sigkill_to_the_same_result(tiny_run, tmp_path):
    paths = {"base": tiny_run.base, "data": tiny_run.prepared, "world": tiny_run.world,
             "out": tmp_path / "models/sft", "metrics": tmp_path / "metrics/sft.json",
             "plots": tmp_path / "plots/sft", "checkpoints": tmp_path / "checkpoints/sft"}
    step, _ = kill_then_resume("sft", paths, tmp_path)
    assert step > 0
    assert without_timing(paths["metrics"]) == without_timing(tiny_run.metrics / "sft.json")
    assert_same_weights(paths["out"], tiny_run.sft)
    assert_same_curves(paths["plots"], tiny_run.root / "plots/sft")


def test_reward_resumes_after_sigkill_to_the_same_result(tiny_rm, tmp_path):
    # stale=False: the reward stage does not delete an earlier run's outputs when it starts (yet).
    paths = {"sft": tiny_rm.sft, "data": tiny_rm.rankings, "demos": tiny_rm.prepared / "sft.jsonl",
             "world": tiny_rm.world, "out": tmp_path / "models/reward", "metrics": tmp_path / "metrics/reward.json",
             "plots": tmp_path / "plots/reward", "checkpoints": tmp_path / "checkpoints/reward"}
    step, _ = kill_then_resume("reward", paths, tmp_path, stale=False)
    assert step > 0
    assert without_timing(paths["metrics"]) == without_timing(tiny_rm.metrics / "reward.json")
    assert_same_weights(paths["out"], tiny_rm.reward)
    assert_same_curves(paths["plots"], tiny_rm.root / "plots/reward")


# ------------------------------------------------------------------------------------------------
# Numerical faults: a NaN/inf loss stops the stage with a clear error; the last good checkpoint stays.


def nan_after(monkeypatch, n_good: int) -> None:
    """Make the training loss (the grad-enabled calls of masked_lm_loss) NaN from call `n_good` on."""
    import rlhf.training

    real, calls = rlhf.training.masked_lm_loss, [0]

    def faulty(logits, labels):
        loss = real(logits, labels)
        if not torch.is_grad_enabled():  # validation loss: untouched
            return loss
        calls[0] += 1
        return loss * float("nan") if calls[0] > n_good else loss

    monkeypatch.setattr(rlhf.training, "masked_lm_loss", faulty)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(stage, tiny_run, tmp_path, monkeypatch):
    from rlhf.errors import StageError
    from stages import pretrain, sft
    from tests.conftest import tiny_params

    nan_after(monkeypatch, n_good=5)  # steps 0-4 fine, step 5 NaN; checkpoints every 2 steps -> step 4 kept
    out, metrics, ckpt = tmp_path / "model", tmp_path / "metrics.json", tmp_path / "ckpt"
    plant_stale_outputs(out, metrics)
    common = dict(out=out, metrics=metrics, plots=tmp_path / "plots", checkpoints=ckpt)
    with pytest.raises(StageError) as err:
        if stage == "pretrain":
            pretrain.run(tiny_params("pretrain", checkpoint_every=2), corpus=tiny_run.prepared / "corpus.jsonl", **common)
        else:
            sft.run(tiny_params("sft", checkpoint_every=2), base=tiny_run.base, data=tiny_run.prepared,
                    world=tiny_run.world, **common)
    assert str(err.value) == (f"{stage} loss became nan at step 5: lower the learning rate or check the data; "
                              f"the last good checkpoint is kept in {ckpt}")
    state = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not out.exists() and not metrics.exists()


def test_exploding_learning_rate_fails_via_cli_with_one_line(tiny_run, tmp_path):
    """lr 1e30: the weights blow up after one update; the run stops at the first non-finite value."""
    from cli.main import app

    params = tmp_path / "params.yaml"
    text = TINY.read_text()
    params.write_text(text.replace("  lr: 0.001\n", "  lr: 1.0e+30\n", 1))  # the sft section's lr
    out, metrics = tmp_path / "models/sft", tmp_path / "metrics/sft.json"
    res = CliRunner().invoke(app, ["sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared),
                                   "--world", str(tiny_run.world), "--out", str(out), "--metrics", str(metrics),
                                   "--plots", str(tmp_path / "plots"), "--checkpoints", str(tmp_path / "ckpt"),
                                   "--params", str(params)])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()  # the progress bar's last state, then the error
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    assert re.match(r"error: sft (loss|gradient norm) became (nan|inf|-inf) at step \d+: lower the learning rate", lines[-1])
    assert not out.exists() and not metrics.exists()
