"""Determinism: the same params and seeds give byte-identical outputs on the same machine.

The session's `tiny_run` (stages called in process) is run a second time through the CLI, one fresh
`python` process running the four CLI commands, into another temporary folder. Every
data file, metrics file, curve and model tensor must match byte for byte. Separate processes also get
different string-hash seeds (PYTHONHASHSEED), so set or dict ordering that leaks into an output shows up.
Metrics files match too, except their `timing` block (wall times: rlhf.io.timing), the one part that varies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY, without_timing


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    fa, fb = files_under(a), files_under(b)
    assert sorted(fa) == sorted(fb), f"{a} and {b} hold different files"
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"differ between two runs with the same params: {[str(a / d) for d in differ]}"


def test_tiny_spine_twice_gives_byte_identical_outputs(tiny_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = tmp_path
    commands = [
        ["world", "--out", r / "data/raw"],
        ["prepare", "--raw", r / "data/raw", "--out", r / "data/prepared", "--metrics", r / "metrics/prepare.json"],
        ["pretrain", "--corpus", r / "data/prepared/corpus.jsonl", "--out", r / "models/base",
         "--metrics", r / "metrics/pretrain.json", "--plots", r / "plots/pretrain", "--checkpoints", r / "ckpt/pretrain"],
        ["sft", "--base", r / "models/base", "--data", r / "data/prepared", "--world", r / "data/raw/world.json",
         "--out", r / "models/sft", "--metrics", r / "metrics/sft.json", "--plots", r / "plots/sft",
         "--checkpoints", r / "ckpt/sft"],
    ]
    # One fresh interpreter runs the four commands (an interpreter start per stage would add ~4 s each).
    driver = (
        "import sys\n"
        "from cli.main import app\n"
        f"for args in {[[*map(str, a), '--params', str(TINY)] for a in commands]!r}:\n"
        "    code = app(args, standalone_mode=False)\n"
        "    assert not code, (args, code)\n"
    )
    res = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    first = tiny_run.root
    for name in ("prepare", "pretrain", "sft"):
        assert without_timing(r / f"metrics/{name}.json") == without_timing(first / f"metrics/{name}.json"), name
    for folder in ("data/raw", "data/prepared", "models/base", "models/sft", "plots/pretrain", "plots/sft"):
        assert_same_tree(r / folder, first / folder)
