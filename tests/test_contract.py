"""One name per stage everywhere: dvc.yaml stage, params.yaml section, stages/<name>.py, `rlhf <name>`.

A stage may live in an example pipeline only (examples/*/dvc.yaml: `ingest`, which reads your own data
instead of the world); it still has its section in params.yaml and the tiny profile, its module and command.

Variant stages are the one exception: a dvc.yaml stage that runs another stage's command with params
overridden in its cmd (`rlhf ppo --set ptx_coef=0 ...`, the controls `sft_ptx` and `ppo_noptx`). It has
no section, module or command of its own; it lists its base stage's params except the overridden ones,
and writes outputs of its own.

Round stages (`<stage>_round<N>`: sample_round2, rank_round2, reward_round2, ppo_round2) are a second round
of data collection: the same command on the next round's inputs (InstructGPT ranked outputs of its PPO
policies too). Like variants they list their base's params except any overridden; unlike a control they
read other inputs than their base, and need not override anything.

The comparison stage (`compare`) runs `rlhf evaluate` with its models and pairs overridden in its cmd
(`--set "models={...}"`): the algorithms beside PPO and the second round, judged like the core models
but outside `make repro`. It reads those models, so its deps are its own.
"""

import re
import shlex

import dataclasses
import importlib

import yaml

from tests.conftest import ROOT

TOOLS = {"label"}  # commands outside the DAG (human labeling); they have no params section


def dvc_stages(path=ROOT / "dvc.yaml"):
    return yaml.safe_load(path.read_text())["stages"]


def example_pipelines() -> dict:
    """examples/<name>/dvc.yaml -> its stages: pipelines on user data, each a DVC project of its own."""
    return {p: dvc_stages(p) for p in sorted((ROOT / "examples").glob("*/dvc.yaml"))}


def base_command(stage: dict) -> str:
    return stage["cmd"].split()[1]


def variants() -> dict[str, str]:
    """Variant stage -> the stage whose command it runs."""
    return {name: base_command(s) for name, s in dvc_stages().items() if base_command(s) != name}


COMPARISONS = {"compare"}  # evaluate's variant on other models (module docstring)


def overridden(cmd: str) -> dict[str, str]:
    words = shlex.split(cmd)
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set")


def outputs(stage: dict) -> set[str]:
    entries = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
    return {e if isinstance(e, str) else next(iter(e)) for e in entries}


def cli_commands():
    from cli.main import app

    return {c.name or c.callback.__name__ for c in app.registered_commands}


def test_names_agree_across_dvc_params_modules_and_cli():
    stages = set(dvc_stages()) - set(variants())
    stages |= {name for pipeline in example_pipelines().values() for name in pipeline}
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    modules = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    commands = cli_commands() - TOOLS
    assert stages == sections == modules == commands, (stages, sections, modules, commands)
    assert set(yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())) == sections


def test_each_stage_lists_its_params_key_by_key_and_runs_its_command():
    stages = dvc_stages()
    for name, stage in stages.items():
        base = variants().get(name, name)
        assert stage["cmd"].startswith(f"rlhf {base} "), name
        module = importlib.import_module(f"stages.{base}")
        fields = {f.name for f in dataclasses.fields(module.Params)}
        keys = overridden(stage["cmd"])
        is_round = re.fullmatch(rf"{base}_round\d+", name) is not None
        assert set(keys) <= fields and (is_round or (base == name) == (not keys)), (name, keys)  # a control overrides something
        listed = set()
        for entry in stage.get("params", []):
            assert isinstance(entry, str) and entry.startswith(f"{base}."), (name, entry)
            listed.add(entry.split(".", 1)[1])
        assert listed == fields - set(keys), (name, fields ^ listed)
        assert callable(module.run) and module.__doc__, name
        if base != name:  # a variant: the base's inputs (a round: the next round's), outputs of its own
            assert is_round or name in COMPARISONS or stage["deps"] == stages[base]["deps"], name
            assert not outputs(stage) & outputs(stages[base]), name


def test_variant_overrides_are_valid_params():
    from rlhf.params import load_section, override

    for name, base in variants().items():
        module = importlib.import_module(f"stages.{base}")
        params = load_section(ROOT / "params.yaml", base, module.Params)
        keys = overridden(dvc_stages()[name]["cmd"])
        changed = override(params, [f"{k}={v}" for k, v in keys.items()], base)
        assert changed != params or (not keys and name.startswith(f"{base}_round")), name


def test_example_pipelines_list_params_key_by_key_and_load_strictly():
    """An example pipeline runs the stages' own commands (no variants), lists each stage's params key by key,
    and its params.yaml loads into every stage's Params (unknown, missing or mistyped keys fail here)."""
    from rlhf.params import load_section

    assert example_pipelines(), "examples/hh/dvc.yaml is missing"
    for path, stages in example_pipelines().items():
        for name, stage in stages.items():
            assert stage["cmd"].startswith(f"rlhf {name} "), (path, name)
            module = importlib.import_module(f"stages.{name}")
            fields = {f.name for f in dataclasses.fields(module.Params)}
            assert {e.split(".", 1)[1] for e in stage["params"] if e.startswith(f"{name}.")} == fields, (path, name)
            assert all(e.startswith(f"{name}.") for e in stage["params"]), (path, name)
            load_section(path.parent / "params.yaml", name, module.Params)
