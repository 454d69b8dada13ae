"""Artifacts beyond one machine: push DVC-tracked artifacts to a remote, lose them, pull them back.

A temporary git + DVC repository gets two kinds of artifacts: a model folder added with `dvc add`
(as one would track data/raw or a hub model), and the output of a one-stage pipeline (`dvc repro`,
as models/sft is). A plain folder is the remote (`dvc remote add -d`), exactly what an S3, GCS, SSH
or shared-disk remote does with another URL. After `dvc push`, the cache and the outputs are deleted
(a fresh clone on another machine) and `dvc pull` must restore every file byte for byte.
docs/scaling.md shows the same commands.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def dvc(*args: str) -> None:
    from dvc.cli import main

    assert main(list(args)) == 0, f"dvc {' '.join(args)} failed"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=repo, check=True,
                   capture_output=True)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_delete_pull_restores_artifacts(tiny_run, tmp_path, monkeypatch):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    monkeypatch.chdir(repo)
    git(repo, "init", "-q")
    dvc("init", "-q")
    dvc("config", "core.analytics", "false")
    dvc("remote", "add", "-d", "shared", str(remote))

    # 1. A tracked folder (a model) and a pipeline output.
    shutil.copytree(tiny_run.sft, repo / "models/sft")
    dvc("add", "-q", "models/sft")
    (repo / "summarize.py").write_text(
        "import pathlib\n"
        "out = pathlib.Path('out')\n"
        "out.mkdir(exist_ok=True)\n"
        "(out / 'size.txt').write_text(str(len(pathlib.Path('models/sft/model.safetensors').read_bytes())))\n"
    )
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"summarize": {
        "cmd": f"{shlex.quote(sys.executable)} summarize.py", "deps": ["summarize.py", "models/sft"], "outs": ["out"]}}}))
    dvc("repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "artifacts")
    before = {"models/sft": snapshot(repo / "models/sft"), "out": snapshot(repo / "out")}
    assert before["out"] and before["models/sft"]

    # 2. Push, then lose everything local: cache and outputs (what a fresh clone elsewhere has).
    dvc("push", "-q")
    assert any(p.is_file() for p in remote.rglob("*")), "nothing reached the remote"
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "models/sft")
    shutil.rmtree(repo / "out")

    # 3. Pull restores them byte for byte, and the pipeline is up to date (nothing to rerun).
    dvc("pull", "-q")
    assert {"models/sft": snapshot(repo / "models/sft"), "out": snapshot(repo / "out")} == before
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        assert r.status() == {}
