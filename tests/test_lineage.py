"""DVC lineage cannot lie: every file a stage's code imports or its command reads is one of its deps.

For each dvc.yaml stage `rlhf <name> …` the test derives, without importing anything heavy:
1. the import closure of stages/<name>.py inside the repository (module- and function-level imports,
   transitively, parsed with `ast`): every such file must be covered by a dep;
2. the data the stage opens: each input path of its command (a path that is not one of the stage's
   outs), narrowed to `<option> / "file"` where the stage module only opens named files under it;
3. repository paths in the stage's params values (`evaluate.models`, `reward.extra_pairs`, …): a
   value that names a tracked path or another stage's output must be covered too.
A dep covers a path when it is the path or a folder above it. Where DVC cannot list an optional
file (a missing dep fails `dvc repro`), its folder is the dep.

cli/*.py is deliberately not a dep (docs/architecture.md, "Lineage"): the commands map options to
`run_stage` and print a line; every path a stage uses is spelled out in dvc.yaml's cmd, and params
are loaded by rlhf/params.py, which is in every stage's closure. A test checks these premises.
"""

from __future__ import annotations

import ast
import posixpath
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("rlhf", "stages", "cli")  # top-level packages of the repository
NOT_DEPS = ("cli/",)  # run for every stage but cannot change its outputs (module docstring)


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


# ----------------------------------------------------------------------------------------------
# Import closure


def module_file(name: str) -> str | None:
    """Repository-relative file of a dotted module name, or None outside the repository."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand.relative_to(ROOT).as_posix()
    return None


def imported_files(path: str) -> set[str]:
    """Repository files imported anywhere in `path` (module level, inside functions, under TYPE_CHECKING)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from rlhf import world` imports a module; `from rlhf.io import read_jsonl` a name.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            f = module_file(name)
            if f is not None and not f.endswith("__init__.py"):
                out.add(f)
    return out


def import_closure(path: str) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(imported_files(f) - seen)
    return seen


# ----------------------------------------------------------------------------------------------
# Files a stage opens


def cmd_options(cmd: str) -> tuple[str, dict[str, list[str]]]:
    """('name', {option: [value, …]}) of `rlhf name --option value …`; a repeated option (evaluate's --plots,
    --stage-metrics) keeps every value."""
    words = shlex.split(cmd)
    assert words[0] == "rlhf" and len(words) > 1, cmd
    opts: dict[str, list[str]] = {}
    i = 2
    while i < len(words):
        assert words[i].startswith("--") and i + 1 < len(words), f"{cmd}: expected --option value at {words[i]!r}"
        opts.setdefault(words[i][2:].replace("-", "_"), []).append(words[i + 1])
        i += 2
    return words[1], opts


def overlaps(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def entry_paths(entries) -> list[str]:
    """Paths of a dvc.yaml outs / metrics / plots / deps list (entries are strings or {path: options})."""
    out = []
    for e in entries or []:
        out.extend([e] if isinstance(e, str) else list(e))
    return out


def stage_outputs(stage: dict) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in entry_paths(stage.get(key))]


def named_files(module: str) -> dict[str, set[str]]:
    """{variable: {"file", …}} for every `variable / "file"` in the module: the files it opens under a folder."""
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"), filename=module)
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
                and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)):
            out.setdefault(node.left.id, set()).add(node.right.value)
    return out


NOT_INPUTS = {"set", "out", "value_out", "checkpoints"}


def cmd_inputs(stage: dict, module: str) -> set[str]:
    """Paths the stage's command reads: its path options that are not its own outputs."""
    _, opts = cmd_options(stage["cmd"])
    outputs = stage_outputs(stage)
    under = named_files(module)
    files = set()
    for option, values in opts.items():
        for value in values:
            # `--set KEY=VALUE` is a params override (checked by test_contract), and options the CLI's runner
            # treats as outputs (cli.runner.OUTPUT_OPTIONS: locked, removed on a failed write) are never read.
            if option in NOT_INPUTS or any(overlaps(value, o) for o in outputs):
                continue
            files |= {f"{value}/{name}" for name in under[option]} if option in under else {value}
    return files


def path_values(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, dict):
        return [v for x in value.values() for v in path_values(x)]
    if isinstance(value, list):
        return [v for x in value for v in path_values(x)]
    return []


def params_inputs(stage: dict, params: dict, all_outputs: list[str], wdir: str = "") -> set[str]:
    """Values of the stage's params keys that name a repository path or another stage's output."""
    found = set()
    for key in stage.get("params", []):
        section, field = key.split(".", 1)
        for v in path_values(params.get(section, {}).get(field)):
            if (ROOT / wdir / v).exists() or any(overlaps(v, o) for o in all_outputs):
                found.add(v)
    return found


# ----------------------------------------------------------------------------------------------
# The check


def covered(path: str, deps: list[str]) -> bool:
    p = PurePosixPath(posixpath.normpath(path))
    return any(p == PurePosixPath(d) or PurePosixPath(d) in p.parents for d in map(posixpath.normpath, deps))


def missing_deps(stages: dict[str, dict], params: dict, wdir: str = "") -> list[str]:
    """One line per (stage, file) that the stage imports or reads but dvc.yaml does not list. `wdir`: the
    dvc.yaml's folder in the repository (an example pipeline's code deps are `../../rlhf/...`)."""
    all_outputs = [p for s in stages.values() for p in stage_outputs(s)]
    problems = []
    for name, stage in stages.items():
        command, _ = cmd_options(stage["cmd"])
        module = f"stages/{command}.py"
        deps = entry_paths(stage.get("deps"))
        need = {posixpath.relpath(f, wdir or ".") for f in import_closure(module) if not f.startswith(NOT_DEPS)}
        need |= cmd_inputs(stage, module) | params_inputs(stage, params, all_outputs, wdir)
        problems += [f"stage '{name}': {f} is not in its deps" for f in sorted(need) if not covered(f, deps)]
    return problems


@pytest.mark.parametrize("params_file", ["params.yaml", "profiles/tiny.yaml"])
def test_dvc_deps_cover_imports_and_inputs(params_file):
    params = yaml.safe_load((ROOT / params_file).read_text(encoding="utf-8"))
    problems = missing_deps(dvc_stages(), params)
    assert not problems, "dvc.yaml misses deps:\n" + "\n".join(problems)


def test_deps_exist_and_are_not_stale():
    """Every dep is a file, a folder, or another stage's output (no typo hides a missing lineage edge);
    a code dep outside every closure would rerun a stage for nothing."""
    stages = dvc_stages()
    all_outputs = [p for s in stages.values() for p in stage_outputs(s)]
    for name, stage in stages.items():
        command, _ = cmd_options(stage["cmd"])
        closure = import_closure(f"stages/{command}.py")
        for dep in entry_paths(stage.get("deps")):
            assert (ROOT / dep).exists() or any(overlaps(dep, o) for o in all_outputs), (name, dep)
            if dep.endswith(".py"):
                assert dep in closure, f"stage '{name}': {dep} is a dep but its code never imports it"


def test_cli_is_no_dep_because_commands_only_forward():
    """The premises of leaving cli/ out: no stage imports the CLI, and the CLI loads a stage's params
    with rlhf.params.load_section (in every stage's closure), so only the stage's code and params shape
    its outputs."""
    for name, stage in dvc_stages().items():
        command, _ = cmd_options(stage["cmd"])
        closure = import_closure(f"stages/{command}.py")
        assert not [f for f in closure if f.startswith("cli/")], name
        assert "rlhf/params.py" in closure, name
    tree = ast.parse((ROOT / "cli/runner.py").read_text(encoding="utf-8"))
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "rlhf.params"]
    assert any("load_section" in {a.name for a in n.names} for n in loads)


def test_the_check_fails_on_a_missing_dep():
    """The checker itself: dropping a library file, a data input, or a params path is reported by name."""
    stages = dvc_stages()
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    name = next(n for n, s in stages.items() if "rlhf/modeling.py" in entry_paths(s.get("deps")))
    broken = {**stages, name: {**stages[name], "deps": [d for d in stages[name]["deps"] if d != "rlhf/modeling.py"]}}
    assert f"stage '{name}': rlhf/modeling.py is not in its deps" in missing_deps(broken, params)

    sft = stages["sft"]
    broken = {"sft": {**sft, "deps": [d for d in sft["deps"] if d != "data/prepared/sft_val.jsonl"]}}
    assert missing_deps(broken, params) == ["stage 'sft': data/prepared/sft_val.jsonl is not in its deps"]

    evaluate = stages["evaluate"]  # one value of a repeated option (--stage-metrics) is checked like any other
    broken = {"evaluate": {**evaluate, "deps": [d for d in evaluate["deps"] if d != "metrics/rloo.json"]}}
    assert missing_deps(broken, params) == ["stage 'evaluate': metrics/rloo.json is not in its deps"]

    reward = stages["reward"]
    with_extra = {**params, "reward": {**params["reward"], "extra_pairs": "data/raw/prompts.jsonl"}}
    assert missing_deps({"reward": reward}, with_extra) == [
        "stage 'reward': data/raw/prompts.jsonl is not in its deps"]


def test_import_closure_sees_function_level_imports():
    closure = import_closure("stages/rank.py")
    assert "rlhf/judge.py" in closure  # imported inside rank.run and through rlhf.gold.load_judge
    assert "rlhf/world.py" in closure  # `from rlhf import world as W` in rlhf/judge.py


def test_stages_import_only_the_library():
    """A stage never imports another stage, and the library never imports a stage: shared code lives in
    rlhf/, so one stage's edit cannot silently rerun (or fail to rerun) another."""
    for path in sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "rlhf").glob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        imported = {f for f in imported_files(rel) if f.startswith(("stages/", "cli/"))}
        assert not imported, f"{rel} imports {sorted(imported)}; move what it needs into rlhf/"
