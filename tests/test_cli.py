"""CLI: instant help with examples, exit 0 / 1 / 2, one-line errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich wraps help at the terminal's width; wide enough that no example wraps


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


# ----------------------------------------------------------------------------------------------
# The likeliest first mistake: a hyperparameter given as a flag


@pytest.mark.parametrize("args, line", [
    (["sft", "--lr", "0.001"], "error: no option --lr: sft.lr is a parameter; "
                               "change it with  dvc exp run -S sft.lr=0.001  or in params.yaml"),
    (["ppo", "--steps=10"], "error: no option --steps: ppo.steps is a parameter; "
                            "change it with  dvc exp run -S ppo.steps=10  or in params.yaml"),
    (["sft", "--warmup-steps", "5"], "dvc exp run -S sft.warmup_steps=5  or in params.yaml"),
    (["sft", "--params", "p.yaml", "--ptx-coef", "0"], "ppo.ptx_coef is a parameter of the ppo stage, not of sft; "
                                                       "change it with  dvc exp run -S ppo.ptx_coef=0  or in p.yaml"),
    (["world", "--lr", "1"], "world has no parameter lr (dpo.lr, grpo.lr, ppo.lr, "),  # lr of several other stages
    (["sft", "-S", "sft.lr=0.01"], "-S belongs to dvc exp run; run  dvc exp run -S sft.lr=0.01"),
])
def test_params_key_given_as_a_flag_gets_the_dvc_fix(args, line):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Usage: ") and f" {args[0]} " in lines[0], res.stderr
    assert lines[1].startswith("error: no option ") and line in lines[1], lines[1]


def test_a_typo_of_a_real_option_keeps_the_suggestion():
    res = runner.invoke(app, ["ppo", "--chekpoints", "x"])
    assert res.exit_code == 2
    assert "No such option: --chekpoints" in res.stderr and "--checkpoints" in res.stderr
    assert "dvc exp run" not in res.stderr


# ----------------------------------------------------------------------------------------------
# Help: a stage's params with their values, examples one per line, --version


def _stage_fields(name):
    import dataclasses
    import importlib

    return [f.name for f in dataclasses.fields(importlib.import_module(f"stages.{name}").Params)]


def test_each_stage_help_lists_every_params_key_and_its_value():
    import yaml

    from tests.test_contract import dvc_stages, variants

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in set(dvc_stages()) - set(variants()):  # a control variant runs its base stage's command
        res = runner.invoke(app, [name, "--help", "--params", str(ROOT / "params.yaml")])
        assert res.exit_code == 0, name
        panel = res.output.split(f"Params · {name}: in {ROOT / 'params.yaml'}", 1)[1]
        rows = {line[2:].split()[0]: line for line in panel.splitlines()
                if line.startswith("│ ") and line[2:3].isalpha()}  # a key's first line; not its wrapped docstring
        for key in _stage_fields(name):
            value = params[name][key]
            assert key in rows, (name, key)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value != "":
                assert f" {value} " in rows[key], (name, key, rows[key])


def test_help_reads_values_from_the_params_file_given(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "p.yaml").write_text(text.replace("sft:\n", "sft:\n  lr: 0.123\n", 1).replace("  lr: 0.001\n", "", 1))
    res = runner.invoke(app, ["sft", "--params", str(tmp_path / "p.yaml"), "--help"], env=WIDE)
    assert res.exit_code == 0
    assert "Params · sft: in " in res.output and "0.123" in res.output


def test_help_without_a_params_file_lists_the_keys_with_their_docstrings(tmp_path):
    res = runner.invoke(app, ["sft", "--help", "--params", str(tmp_path / "absent.yaml")], env=WIDE)
    assert res.exit_code == 0
    assert "sft: not found in" in res.output and "fields only" in res.output
    assert "Peak AdamW learning rate" in res.output  # sft.lr's field docstring
    assert all(key in res.output for key in _stage_fields("sft"))


def test_every_command_shows_its_examples_one_per_line_and_angle_brackets_survive():
    import inspect

    from tests.test_contract import cli_commands

    callbacks = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    for name in cli_commands():
        doc = inspect.getdoc(callbacks[name])
        examples = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("Example")]
        res = runner.invoke(app, [name, "--help"], env=WIDE)
        text = res.output.split("─ Options", 1)[0]  # the docstring part
        shown = [ln.strip() for ln in text.splitlines() if "Example" in ln]
        assert shown == examples, (name, shown, examples)  # each on its own line, none joined
    assert "(plots/<stage>)" in runner.invoke(app, ["evaluate", "--help"], env=WIDE).output
    assert "rlhf <stage> --help" in runner.invoke(app, ["--help"], env=WIDE).output


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"rlhf {version('rlhf')}"


def test_stage_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t0 = time.time(); from typer.testing import CliRunner; from cli.main import app; "
            "res = CliRunner().invoke(app, ['sft', '--help']); assert res.exit_code == 0 and 'Params' in res.output; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(time.time() - t0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) < 3.0  # ~0.2 s on an idle machine; generous for a loaded CI runner


# ----------------------------------------------------------------------------------------------
# Errors name the command that makes the missing input


def test_a_missing_model_folder_names_the_command_that_writes_it(tmp_path):
    from rlhf.errors import StageError
    from rlhf.models import check_model_dir
    from tests.test_contract import dvc_stages, variants

    written = {out: name for name, stage in dvc_stages().items() for out in stage.get("outs", [])
               if isinstance(out, str) and out.startswith("models/")}
    assert set(written) >= {"models/base", "models/sft", "models/reward", "models/policy"}
    controls = variants()
    for out, name in written.items():
        with pytest.raises(StageError) as err:
            check_model_dir(tmp_path / out, "model")
        expected = f"run `dvc repro {name}` first" if name in controls else f"run `rlhf {name}` (or `dvc repro {name}`) first"
        assert f"model folder not found; {expected}" in str(err.value), out
    with pytest.raises(StageError, match="folder not found; check the path, or run `dvc repro`"):
        check_model_dir(tmp_path / "elsewhere", "model")


def test_a_stage_logging_curves_runs_in_a_git_repository_with_no_commits(tmp_path):
    """dvclive's repository setup died in a fresh `git init` (SCMError: Empty git repo) and ran `dvc init` in any
    git repository; the stages' logger skips that setup (rlhf/training.py: quiet_live_class)."""
    import json
    import os

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    words = "the cat sat on a mat while two dogs ran far away from home".split()
    docs = [{"text": " ".join(words[(i + j) % len(words)] for j in range(12))} for i in range(120)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    params = (ROOT / "profiles/tiny.yaml").read_text().replace("max_steps: 30", "max_steps: 4", 1)
    (tmp_path / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DVC_ROOT", None)
    res = subprocess.run([sys.executable, "-m", "cli", "pretrain", "--corpus", "corpus.jsonl", "--out", "models/base",
                          "--metrics", "m.json", "--plots", "plots/pretrain", "--checkpoints", "ckpt"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert list((tmp_path / "plots/pretrain").rglob("*.tsv")) and (tmp_path / "models/base/config.json").is_file()
    assert not (tmp_path / ".dvc").exists()  # no `dvc init` behind the user's back


def test_rlhf_in_another_checkout_runs_that_checkouts_code(tmp_path):
    """A DVC experiment's copy of the repository (or a git worktree) runs its own code, not the code of the
    checkout `rlhf` was installed from (cli.run_this_checkout): dvc.lock hashes the copy's code."""
    import shutil

    script = Path(sys.executable).parent / "rlhf"
    if not script.is_file():
        pytest.skip("no rlhf console script next to this interpreter (the project is not installed)")
    copy = tmp_path / "copy"
    for package in ("cli", "stages", "rlhf"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "cli" / "__init__.py").open("a") as fh:
        fh.write('\nprint("the copy\'s code")\n')
    (copy / "docs").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RLHF_CHECKOUT"}
    for cwd in (copy, copy / "docs"):  # the copy itself, or a folder inside it
        res = subprocess.run([str(script), "world", "--help"], cwd=cwd, env=env, capture_output=True, text=True)
        assert res.returncode == 0 and "the copy's code" in res.stdout and "Usage: rlhf world" in res.stdout, res.stderr
    res = subprocess.run([str(script), "world", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "the copy's code" not in res.stdout
