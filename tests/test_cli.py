"""CLI: instant help with examples, exit 0 / 1 / 2, one-line errors."""

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT

runner = CliRunner()


def test_top_level_help_is_fast_and_lists_stages():
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.time() - t0
    assert res.returncode == 0, res.stderr
    for name in ("prepare", "pretrain", "sft"):
        assert name in res.stdout
    assert elapsed < 3.0  # includes interpreter start; the import itself is what must stay light
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert heavy.stdout.strip() == "[]"


def test_every_command_has_help_with_an_example():
    from tests.test_contract import cli_commands

    for name in cli_commands():
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output, name


def test_bad_usage_exits_2():
    assert runner.invoke(app, ["prepare", "--no-such-flag"]).exit_code == 2
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_failed_run_exits_1_with_one_line_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "cli", "prepare", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
         "--metrics", str(tmp_path / "m.json"), "--params", str(ROOT / "profiles/tiny.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error:") and "prompts.jsonl: file not found" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad, key", [("lr: fast", "sft.lr"), ("typo_key: 1", "sft.typo_key")])
def test_bad_params_exit_1_naming_the_key(tmp_path, bad, key):
    text = (ROOT / "profiles/tiny.yaml").read_text().replace("sft:\n", f"sft:\n  {bad}\n", 1)
    if bad.startswith("lr"):
        text = text.replace("sft:\n  lr: fast\n", "sft:\n").replace("  lr: 0.001\n", "  lr: fast\n")
    (tmp_path / "params.yaml").write_text(text)
    res = runner.invoke(app, ["sft", "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 1
    assert key in res.output
