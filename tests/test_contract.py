"""One name per stage everywhere: dvc.yaml stage, params.yaml section, stages/<name>.py, `rlhf <name>`."""

import dataclasses
import importlib

import yaml

from tests.conftest import ROOT

TOOLS = {"label"}  # commands outside the DAG (human labeling); they have no params section


def dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def cli_commands():
    from cli.main import app

    return {c.name or c.callback.__name__ for c in app.registered_commands}


def test_names_agree_across_dvc_params_modules_and_cli():
    stages = set(dvc_stages())
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    modules = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    commands = cli_commands() - TOOLS
    assert stages == sections == modules == commands, (stages, sections, modules, commands)
    assert set(yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())) == sections


def test_each_stage_lists_its_params_key_by_key_and_runs_its_command():
    for name, stage in dvc_stages().items():
        assert stage["cmd"].startswith(f"rlhf {name}"), name
        module = importlib.import_module(f"stages.{name}")
        fields = {f.name for f in dataclasses.fields(module.Params)}
        listed = set()
        for entry in stage.get("params", []):
            assert isinstance(entry, str) and entry.startswith(f"{name}."), (name, entry)
            listed.add(entry.split(".", 1)[1])
        assert listed == fields, (name, fields ^ listed)
        assert callable(module.run) and module.__doc__, name
