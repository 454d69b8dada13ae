"""Faults a real run meets (issue 18): a full disk, an unwritable output, two runs on one output folder,
escape sequences in data. Each ends in one line and exit 1, leaves no partial output, and keeps what a
rerun needs: the checkpoint, the labels.

A full disk is simulated portably: the writer at the chosen save point (torch.save, safetensors, dvclive,
the metrics JSON) writes part of its bytes and raises what the real one raises on a full disk (OSError
ENOSPC; safetensors' "os error 28"; torch's short-write RuntimeError). `test_real_tiny_filesystem`
repeats the checkpoint case on a 300 KB tmpfs where the test runner may mount one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import ROOT, TINY, without_timing

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of atomic writes, and lock files, anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name.endswith((".tmp", ".lock", ".old")))


def one_error_line(res) -> str:
    """The run failed with exit 1 and one `error:` line, the last on stderr (a progress bar may precede it)."""
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert res.exit_code == 1 and errors == lines[-1:], (res.exit_code, res.output)
    assert "Traceback" not in res.output
    return errors[0]


# ---- the message of each write failure ------------------------------------------------------------


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "no space left on device writing {path}; free 2 MB on that disk or write to another folder"),
    (errno.EDQUOT, "disk quota exceeded writing {path}; free 2 MB on that disk or write to another folder"),
    (errno.EACCES, "permission denied writing {path}; make {dir} writable or write to another folder"),
    (errno.EROFS, "read-only file system writing {path}; write to another folder, on a writable disk"),
    (errno.ENOENT, "its folder disappeared writing {path}; rerun (was it deleted while the stage ran?) or write to another folder"),
    (errno.EIO, "input/output error writing {path}; check the disk, then rerun, or write to another folder"),
])
def test_a_failed_write_names_the_path_and_the_fix_and_leaves_no_temporary_file(tmp_path, monkeypatch, code, expected):
    from rlhf.errors import OutputError
    from rlhf.io import atomic_path

    monkeypatch.setattr("rlhf.io.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 500_000, 500_000))
    path = tmp_path / "out" / "metrics.json"
    with pytest.raises(OutputError) as info:
        with atomic_path(path, need=2_000_000) as tmp:
            tmp.write_bytes(b"{\"half\": ")
            raise OSError(code, os.strerror(code))
    assert str(info.value) == expected.format(path=path, dir=path.parent)
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_a_parent_that_is_a_file_is_named(tmp_path):
    """A real fault, no simulation: an output's parent folder is a file."""
    from rlhf.errors import OutputError
    from rlhf.io import write_json

    (tmp_path / "metrics").write_text("not a folder")
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'metrics'} is a file, not a folder, writing "
                                                    f"{tmp_path / 'metrics' / 'sft.json'}; move {tmp_path / 'metrics'} away")):
        write_json(tmp_path / "metrics" / "sft.json", {"a": 1})


def test_torch_short_write_and_safetensors_os_error_are_write_failures(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from rlhf.io import write_failure

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 552320 vs 552208")
    monkeypatch.setattr("rlhf.io.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert write_failure(short, tmp_path / "c.pt").problem == "no space left on device"  # the disk is full
    monkeypatch.setattr("rlhf.io.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 10**9))
    assert write_failure(short, tmp_path / "c.pt").problem == "input/output error"  # space left: another cause
    st = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(st, tmp_path / "m.safetensors").problem == "no space left on device"
    assert write_failure(RuntimeError("CUDA out of memory"), tmp_path / "c.pt") is None  # not a write: raised as is


def test_a_failure_inside_a_folder_write_is_named_by_its_final_path(tmp_path):
    from rlhf.errors import OutputError
    from rlhf.io import atomic_dir, write_json

    out = tmp_path / "models" / "sft"
    with pytest.raises(OutputError, match=re.escape(f"writing {out / 'config.json'};")):
        with atomic_dir(out) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "config.json"))
    with pytest.raises(OutputError, match=re.escape(f"writing {out / 'eval' / 'a.json'};")):
        with atomic_dir(out) as tmp:
            (tmp / "eval").mkdir()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("pathlib.Path.write_bytes", lambda self, data: (_ for _ in ()).throw(ENOSPC))
                write_json(tmp / "eval" / "a.json", {"a": 1})
    assert list((tmp_path / "models").iterdir()) == []


# ---- disk full at every save point of sft, then a rerun resumes ---------------------------------------


def sft_args(tiny_run, tmp_path: Path, params: Path) -> tuple[list[str], dict[str, Path]]:
    paths = {"out": tmp_path / "models/sft", "metrics": tmp_path / "metrics/sft.json", "plots": tmp_path / "plots/sft",
             "checkpoints": tmp_path / "checkpoints/sft"}
    args = ["sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared), "--world", str(tiny_run.world),
            *[a for k, v in paths.items() for a in (f"--{k}", str(v))], "--params", str(params)]
    return args, paths


def checkpoint_step(paths: dict[str, Path]) -> int | None:
    import torch

    ckpt = paths["checkpoints"] / "checkpoint.pt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["step"] if ckpt.is_file() else None


def test_sft_disk_full_at_each_save_point_then_resumes_to_the_same_result(tiny_run, tmp_path, monkeypatch):
    """sft (8 steps, a checkpoint every 2) meets a full disk at each save point in turn; after each, a rerun
    (space freed) resumes from the last checkpoint, and the last rerun ends exactly like an uninterrupted run."""
    import torch
    from dvclive.plots.metric import Metric
    from safetensors import SafetensorError

    from cli.main import app
    from tests.test_resume import assert_same_curves, assert_same_weights

    params = tmp_path / "params.yaml"
    data = yaml.safe_load(TINY.read_text())
    data["sft"]["checkpoint_every"] = 2
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    args, paths = sft_args(tiny_run, tmp_path, params)
    real_save, real_dump = torch.save, Metric.dump

    def run(fault: str, patch) -> str:
        with pytest.MonkeyPatch.context() as mp:
            patch(mp)
            res = CliRunner().invoke(app, args)
        line = one_error_line(res)
        assert line.startswith("error: no space left on device writing "), line
        assert not paths["out"].exists() and not paths["metrics"].exists(), f"{fault}: a partial result is left"
        assert not paths["plots"].exists(), f"{fault}: the partial dvclive folder is left"
        assert not leftovers(tmp_path), f"{fault}: {leftovers(tmp_path)}"
        return line + "\n" + res.output

    # 1. The third checkpoint (step 6) meets the full disk half-written: the step-4 checkpoint stays.
    saves = []

    def torch_save_fills_disk(obj, f, *a, **k):
        saves.append(obj["step"])
        if len(saves) == 3:
            f.write(b"PK\x03\x04" + b"\0" * 4096)
            raise ENOSPC
        return real_save(obj, f, *a, **k)

    out = run("checkpoint", lambda mp: mp.setattr(torch, "save", torch_save_fills_disk))
    ckpt = paths["checkpoints"]
    assert out.startswith(f"error: no space left on device writing {ckpt / 'checkpoint.pt'}; free space on that disk "
                          f"or point --checkpoints elsewhere; the checkpoint in {ckpt} is kept: rerun the same "
                          "command to resume from it"), out
    assert saves == [2, 4, 6] and checkpoint_step(paths) == 4

    # 2. The curves: dvclive's third append after resuming fails (a write() on an open file: no file name).
    dumps = []

    def dvclive_fills_disk(self, val, **kw):
        dumps.append(self.name)
        if len(dumps) == 3:
            raise ENOSPC
        return real_dump(self, val, **kw)

    out = run("plots", lambda mp: mp.setattr(Metric, "dump", dvclive_fills_disk))
    assert "resuming from" in out and "at step 4" in " ".join(out.split())
    assert out.startswith(f"error: no space left on device writing {paths['plots']}; free space on that disk or point "
                          f"--plots elsewhere; the checkpoint in {ckpt} is kept"), out
    assert checkpoint_step(paths) == 4

    # 3. The final model: safetensors writes part of the weights, then reports "os error 28".
    import transformers.modeling_utils as mu

    real_safe = mu.safe_save_file

    def safetensors_fills_disk(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 1024)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = run("final model", lambda mp: mp.setattr(mu, "safe_save_file", safetensors_fills_disk))
    assert out.startswith(f"error: no space left on device writing {paths['out'] / 'model.safetensors'}; free "), out
    assert "or point --out elsewhere; the checkpoint in" in out
    assert checkpoint_step(paths) == 6  # this run saved step 6 before the end
    assert mu.safe_save_file is real_safe

    # 4. The metrics file, written last: the model saved just before is removed with it.
    real_write_bytes = Path.write_bytes

    def metrics_fill_disk(self, data):
        if self.name.startswith(".sft.json."):  # the temporary sibling of metrics/sft.json
            raise ENOSPC
        return real_write_bytes(self, data)

    out = run("metrics", lambda mp: mp.setattr(Path, "write_bytes", metrics_fill_disk))
    assert out.startswith(f"error: no space left on device writing {paths['metrics']}; free "), out
    assert "or point --metrics elsewhere; the checkpoint in" in out and checkpoint_step(paths) == 6

    # 5. Space freed: the rerun resumes from step 6 and ends exactly like the uninterrupted tiny run.
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"resuming from {ckpt / 'checkpoint.pt'} at step 6" in " ".join(res.output.split())
    assert without_timing(paths["metrics"]) == without_timing(tiny_run.metrics / "sft.json")
    assert_same_weights(paths["out"], tiny_run.sft)
    assert_same_curves(paths["plots"], tiny_run.root / "plots/sft")
    assert not ckpt.exists() and not leftovers(tmp_path)


def test_pretrain_disk_full_at_its_metrics_removes_the_model_and_keeps_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    """The same contract in another training stage: the model written just before the metrics is removed."""
    from cli.main import app

    paths = {"out": tmp_path / "models/base", "metrics": tmp_path / "metrics/pretrain.json",
             "plots": tmp_path / "plots/pretrain", "checkpoints": tmp_path / "checkpoints/pretrain"}
    args = ["pretrain", "--corpus", str(tiny_run.prepared / "corpus.jsonl"),
            *[a for k, v in paths.items() for a in (f"--{k}", str(v))], "--params", str(TINY)]
    real_write_bytes = Path.write_bytes

    def metrics_fill_disk(self, data):
        if self.name.startswith(".pretrain.json."):
            raise ENOSPC
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", metrics_fill_disk)
    res = CliRunner().invoke(app, args)
    assert one_error_line(res).startswith(f"error: no space left on device writing {paths['metrics']}; free ")
    assert res.stderr.strip().endswith(f"or point --metrics elsewhere; the checkpoint in {paths['checkpoints']} is kept: "
                                       "rerun the same command to resume from it")
    assert checkpoint_step(paths) == 20  # of 30 steps, a checkpoint every 10
    assert not paths["out"].exists() and not paths["plots"].exists() and not leftovers(tmp_path)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)], capture_output=True).returncode == 0
    return ok


def test_real_tiny_filesystem(tiny_run, tmp_path):
    """Where the runner may mount a tmpfs (root in a container with CAP_SYS_ADMIN): sft's outputs on 300 KB."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        args = ["sft", "--base", str(tiny_run.base), "--data", str(tiny_run.prepared), "--world", str(tiny_run.world),
                "--out", str(disk / "models/sft"), "--metrics", str(disk / "metrics/sft.json"),
                "--plots", str(disk / "plots/sft"), "--checkpoints", str(disk / "checkpoints/sft"), "--params", str(TINY)]
        res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 1, res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert errors == [line for line in res.stderr.splitlines() if line.strip() and "━" not in line], res.stderr
        assert re.match(rf"error: no space left on device writing {re.escape(str(disk))}/\S+; free \d+ MB on that disk", errors[0])
        assert "Traceback" not in res.stderr
        assert not (disk / "models/sft").exists() and not (disk / "metrics/sft.json").exists() and not leftovers(disk)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- the last line of defence, and faults found before any work ------------------------------------


def test_an_unwritable_output_fails_before_the_stage_starts(tmp_path, monkeypatch):
    """A read-only output folder is found when its lock is taken, not after training."""
    from cli.main import app

    real_mkdir = Path.mkdir
    readonly = tmp_path / "ro"

    def mkdir(self, *a, **k):
        if self.is_relative_to(readonly):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    started = []
    monkeypatch.setattr("stages.world.run", lambda *a, **k: started.append(1))
    res = CliRunner().invoke(app, ["world", "--out", str(readonly / "raw"), "--params", str(TINY)])
    assert one_error_line(res) == (f"error: read-only file system writing {readonly / 'raw'}; point --out elsewhere, "
                                   "on a writable disk")
    assert not started


def test_an_os_error_no_write_site_caught_is_still_one_line(tmp_path, monkeypatch):
    """The CLI's last line of defence: a write in place (as the report's figures are written) fails."""
    from cli.main import app

    out = tmp_path / "raw"

    def run(params, *, out):
        out.mkdir(parents=True)
        (out / "partial.jsonl").write_text("{}\n")
        raise OSError(errno.EACCES, "Permission denied", str(out / "eval" / "figure.png"))

    monkeypatch.setattr("stages.world.run", run)
    res = CliRunner().invoke(app, ["world", "--out", str(out), "--params", str(TINY)])
    assert one_error_line(res) == (f"error: permission denied writing {out / 'eval' / 'figure.png'}; make {out} "
                                   "writable or point --out elsewhere")
    assert not out.exists()  # the partial output is removed

    def short_write(params, *, out):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 552320 vs 552208")

    monkeypatch.setattr("stages.world.run", short_write)
    monkeypatch.setattr("rlhf.io.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    res = CliRunner().invoke(app, ["world", "--out", str(out), "--params", str(TINY)])
    assert one_error_line(res) == (f"error: no space left on device while world wrote its outputs (--out {out}); "
                                   "free space or fix that disk, or point them elsewhere")

    def unreadable_input(params, *, out):
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "prepared" / "sft.jsonl"))

    monkeypatch.setattr("stages.world.run", unreadable_input)
    res = CliRunner().invoke(app, ["world", "--out", str(out), "--params", str(TINY)])
    assert one_error_line(res) == (f"error: {tmp_path / 'prepared' / 'sft.jsonl'}: permission denied; check the file, "
                                   "its folder's permissions and the disk, then rerun")

    def a_bug(params, *, out):
        raise RuntimeError("a bug, not a fault of the disk")

    monkeypatch.setattr("stages.world.run", a_bug)
    res = CliRunner().invoke(app, ["world", "--out", str(out), "--params", str(TINY)])
    assert isinstance(res.exception, RuntimeError)  # bugs are not dressed up as disk faults


# ---- two runs, one output folder ------------------------------------------------------------------


def test_output_locks_in_one_process(tmp_path):
    from rlhf.errors import StageError
    from rlhf.locks import lock_path, output_locks

    outputs = {"out": tmp_path / "models/sft", "metrics": tmp_path / "metrics/sft.json"}
    with output_locks(outputs, "rlhf sft"):
        note = json.loads(lock_path(outputs["out"]).read_text())
        assert note["pid"] == os.getpid() and note["command"] == "rlhf sft"
        with pytest.raises(StageError, match=re.escape(f"{outputs['metrics']} is being written by another run (rlhf sft, "
                                                       f"pid {os.getpid()}, since ")):
            with output_locks({"metrics": outputs["metrics"]}, "rlhf sft"):
                pass
        with output_locks({"out": tmp_path / "models/other"}, "rlhf sft"):  # other outputs: no conflict
            pass
    assert not leftovers(tmp_path)


def test_a_second_run_of_a_stage_refuses_and_a_killed_runs_lock_is_taken_over(tiny_run, tmp_path):
    from cli.main import app
    from rlhf.locks import lock_path

    args, paths = sft_args(tiny_run, tmp_path, TINY)
    lock = lock_path(paths["out"])
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() - t0 < 120, "the first run never locked its outputs"
            time.sleep(0.05)
        second = CliRunner().invoke(app, args)
        assert one_error_line(second).startswith(
            f"error: {paths['checkpoints']} is being written by another run (rlhf sft, pid {first.pid}, since ")
        assert second.stderr.strip().endswith("wait for it to finish, or point --checkpoints elsewhere")
        assert first.poll() is None  # the second run did not disturb the first
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.is_file()  # a SIGKILL leaves the lock file behind: stale
    # The stale lock does not block: the next run takes it over and gets as far as its params (broken on purpose).
    broken = tmp_path / "broken.yaml"
    broken.write_text(TINY.read_text().replace("sft:\n", "sft:\n  no_such_key: 1\n", 1))
    res = CliRunner().invoke(app, [*args[:-1], str(broken)])
    assert one_error_line(res).startswith("error: params key 'sft.no_such_key' is unknown"), res.stderr
    assert f"note: taking over the lock of {paths['out']} left by pid {first.pid}" in " ".join(res.stderr.split())
    assert not lock.exists()


def test_only_rank_zero_locks_under_a_launcher(tmp_path, monkeypatch):
    from cli.main import app
    from rlhf.locks import output_locks

    seen = []
    monkeypatch.setattr("stages.world.run", lambda params, *, out: seen.append(out) or {})
    monkeypatch.setattr("stages.world.summary", lambda m: "ok", raising=False)
    with output_locks({"out": tmp_path / "raw"}, "rlhf world"):  # rank 0 holds it
        res = CliRunner().invoke(app, ["world", "--out", str(tmp_path / "raw"), "--params", str(TINY)], env={"RANK": "1"})
    assert res.exit_code == 0, res.output
    assert seen == [tmp_path / "raw"]


def test_output_options_match_dvc_yaml():
    """The CLI locks (and cleans after a failed write) exactly what dvc.yaml declares as each stage's outputs."""
    import shlex

    from cli.runner import stage_outputs

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        words = shlex.split(stage["cmd"])
        options = {words[i][2:].replace("-", "_"): words[i + 1] for i in range(2, len(words) - 1) if words[i].startswith("--")}
        declared = set()
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
        locked = {str(p) for p in stage_outputs(words[1], options).values()}  # the command's (compare runs evaluate)
        for path in declared:  # every declared output lies in one the CLI locks
            assert any(path == p or path.startswith(p + "/") for p in locked), (name, path, locked)
        others = {d for other, s in stages.items() if other != name
                  for key in ("outs", "metrics", "plots") for e in s.get(key, [])
                  for d in ([e] if isinstance(e, str) else list(e))}
        for path in locked:  # and the CLI locks (and removes on failure) no other stage's output; a path it
            # locks beyond its own declared outputs is one the command is told to keep clear (sft_ptx's
            # --value-out: the control trains no value model, and the default would be ppo's models/value)
            if not any(d == path or d.startswith(path + "/") for d in declared):
                assert not any(d == path or d.startswith(path + "/") or path.startswith(d + "/") for d in others), (name, path)


# ---- untrusted text reaching the terminal ------------------------------------------------------------


def test_visible_spells_out_control_characters():
    from rlhf.terminal import visible

    assert visible("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert visible("a\rb\x9b2Jc\u202ed\x00") == "a\\rb\\x9b2Jc\\u202ed\\x00"
    assert visible("line 1\n\tline 2 — é 你好 👍") == "line 1\n\tline 2 — é 你好 👍"  # text itself untouched
    assert visible("a\nb\tc", one_line=True) == "a\\nb\\tc"


def test_errors_and_summaries_escape_data(tmp_path, monkeypatch):
    from cli.main import app
    from rlhf.errors import StageError

    def bad(params, *, out):
        raise StageError("prompts.jsonl:2: duplicate id 'p\x1b[2J\x1b[31mX'\nsecond line")

    monkeypatch.setattr("stages.world.run", bad)
    res = CliRunner().invoke(app, ["world", "--out", str(tmp_path / "raw"), "--params", str(TINY)])
    line = one_error_line(res)
    assert line == "error: prompts.jsonl:2: duplicate id 'p\\x1b[2J\\x1b[31mX'\\nsecond line"
    monkeypatch.setattr("stages.world.run", lambda params, *, out: {})
    monkeypatch.setattr("stages.world.summary", lambda m: "wrote \x1b]0;title\x07 files", raising=False)
    res = CliRunner().invoke(app, ["world", "--out", str(tmp_path / "raw"), "--params", str(TINY)])
    assert res.exit_code == 0 and "wrote \\x1b]0;title\\x07 files" in res.output and "\x1b" not in res.output


def test_a_lock_held_too_long_is_named(tmp_path):
    from rlhf.errors import StageError
    from rlhf.locks import locked, output_locks

    labels = tmp_path / "labels" / "human.jsonl"
    with output_locks({"out": labels}, "rlhf label"):
        with pytest.raises(StageError, match=re.escape(f"{labels}: still locked after 0 s by rlhf label, pid {os.getpid()}, since ")
                           + r".*; if no such process runs, delete " + re.escape(str(labels.parent / ".human.jsonl.lock"))):
            with locked(labels, timeout=0.1):
                pass


# ---- the same contract in reward, dpo and ppo: a full disk at a checkpoint, then a rerun resumes --------


def feedback_args(stage: str, tiny_rm, tmp_path: Path, params: Path) -> tuple[list[str], dict[str, Path]]:
    """The CLI arguments of `stage` on the tiny run, its outputs under tmp_path."""
    paths = {"out": tmp_path / f"models/{stage}", "metrics": tmp_path / f"metrics/{stage}.json",
             "plots": tmp_path / f"plots/{stage}", "checkpoints": tmp_path / f"checkpoints/{stage}"}
    inputs = {
        "reward": ["--sft", str(tiny_rm.sft), "--data", str(tiny_rm.rankings), "--demos",
                   str(tiny_rm.prepared / "sft.jsonl"), "--world", str(tiny_rm.world)],
        "dpo": ["--sft", str(tiny_rm.sft), "--data", str(tiny_rm.rankings), "--test",
                str(tiny_rm.prepared / "test.jsonl"), "--world", str(tiny_rm.world)],
        "ppo": ["--sft", str(tiny_rm.sft), "--reward", str(tiny_rm.reward), "--data", str(tiny_rm.prepared),
                "--world", str(tiny_rm.world), "--value-out", str(tmp_path / "models/value")],
    }[stage]
    return [stage, *inputs, *[a for k, v in paths.items() for a in (f"--{k}", str(v))], "--params", str(params)], paths


@pytest.mark.parametrize("stage, every, steps", [("reward", 2, None), ("dpo", 2, None), ("ppo", 1, 3)])
def test_disk_full_at_a_checkpoint_then_the_rerun_resumes(tiny_rm, tmp_path, stage, every, steps):
    """A full disk at the second checkpoint save of reward, dpo or ppo: exit 1, one line naming the path and
    the fix, no partial output, the first checkpoint kept; with space freed the same command resumes from it."""
    import torch

    from cli.main import app

    data = yaml.safe_load(TINY.read_text())
    data[stage]["checkpoint_every"] = every
    if steps:
        data[stage]["steps"] = steps
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    args, paths = feedback_args(stage, tiny_rm, tmp_path, params)
    real_save, saves = torch.save, []

    def torch_save_fills_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "step" in obj:  # a checkpoint (dpo also caches its reference log-probs)
            saves.append(obj["step"])
            if len(saves) == 2:
                f.write(b"PK\x03\x04" + b"\0" * 4096)
                raise ENOSPC
        return real_save(obj, f, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", torch_save_fills_disk)
        res = CliRunner().invoke(app, args)
    line = one_error_line(res)
    ckpt = paths["checkpoints"]
    assert line.startswith(f"error: no space left on device writing {ckpt / 'checkpoint.pt'}; free space on that "
                           "disk or point --checkpoints elsewhere"), line
    assert not paths["out"].exists() and not paths["metrics"].exists() and not paths["plots"].exists()
    assert not leftovers(tmp_path), leftovers(tmp_path)
    first = checkpoint_step({"checkpoints": ckpt})
    assert first is not None and first == saves[0], (first, saves)

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"at step {first}" in " ".join(res.output.split()) or f"from step {first}" in " ".join(res.output.split()), res.output
    assert paths["metrics"].is_file() and (paths["out"] / "config.json").is_file()
    assert not ckpt.exists() and not leftovers(tmp_path)
