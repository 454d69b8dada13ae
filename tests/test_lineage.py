"""DVC lineage cannot lie: every file a stage's code imports or its command reads is one of its deps.

For each dvc.yaml stage `rlhf <name> …` the test derives, without importing anything heavy:
1. the import closure of stages/<name>.py inside the repository (module- and function-level imports,
   transitively, parsed with `ast`): every such file must be covered by a dep;
2. the data the stage opens: each input path of its command (a path that is not one of the stage's
   outs), narrowed to `<option> / "file"` where the stage module only opens named files under it;
3. repository paths in the stage's params values (`evaluate.models`, `reward.extra_pairs`, …), and in
   the values its command overrides (`--set KEY=VALUE`: the compare stage's models): a value that names
   a tracked path or another stage's output must be covered too.
A dep covers a path when it is the path or a folder above it. Where DVC cannot list an optional
file (a missing dep fails `dvc repro`), its folder is the dep.

cli/*.py is deliberately not a dep (docs/architecture.md, "Lineage"): the commands map options to
`run_stage` and print a line; every path a stage uses is spelled out in dvc.yaml's cmd, and params
are loaded by rlhf/params.py, which is in every stage's closure. A test checks these premises.
"""

from __future__ import annotations

import ast
import functools
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


@functools.cache
def parse(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)


@functools.cache
def import_names(path: str) -> dict[str, str]:
    """{local name: dotted name} of the module's imports (`from rlhf import rollout as RO` -> RO: rlhf.rollout)."""
    out = {}
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return out


def find_def(path: str, qualname: list[str]) -> ast.FunctionDef | None:
    """The function (or class method) `qualname` defined at the top of `path`; a class gives its constructor
    arguments no files (its fields are named, not derived)."""
    body = parse(path).body
    for i, name in enumerate(qualname):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            return None
        if i == len(qualname) - 1:
            return node if isinstance(node, ast.FunctionDef) else None
        body = node.body
    return None


def resolve_call(func: ast.expr, path: str, imports: dict[str, str]) -> tuple[str, ast.FunctionDef] | None:
    """(file, definition) of the repository function a call names: `f`, `module.f`, `Class.method`,
    `module.Class.method`, imported or defined in `path`; None for anything else."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.insert(0, func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    dotted = (imports.get(func.id, "") + "." + ".".join(parts)).strip(".") if func.id in imports else None
    candidates = [(path, [func.id, *parts])]
    if dotted:  # split `rlhf.rollout.DataFiles.under` into a module file and a name inside it
        words = dotted.split(".")
        candidates = [(module_file(".".join(words[:k])), words[k:]) for k in range(len(words) - 1, 0, -1)]
    for file, qualname in candidates:
        node = find_def(file, qualname) if file and qualname else None
        if node is not None:
            return file, node
    return None


def bound_parameter(call: ast.Call, node: ast.FunctionDef, arg: str) -> str | None:
    """The parameter of `node` that `call` passes the variable `arg` to (a method's self/cls skipped)."""
    params = [a.arg for a in node.args.posonlyargs + node.args.args]
    if params and params[0] in ("self", "cls"):
        params = params[1:]
    for i, a in enumerate(call.args):
        if isinstance(a, ast.Name) and a.id == arg and i < len(params):
            return params[i]
    return next((k.arg for k in call.keywords if isinstance(k.value, ast.Name) and k.value.id == arg), None)


def is_named_file(node: ast.AST, var: str) -> bool:
    """`var / "file"`."""
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
            and node.left.id == var and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str))


def passes(call: ast.Call, var: str) -> bool:
    return any(isinstance(a, ast.Name) and a.id == var for a in [*call.args, *(k.value for k in call.keywords)])


def only_named_uses(scope: ast.AST, var: str, followed: list[ast.Call]) -> bool:
    """Whether `scope` uses `var` only as `var / "file"`, as an argument of a followed call, in an f-string
    (a message), or in `var = Path(var)`; any other use (str(var), var.glob, open(var), …) reads the folder."""
    allowed: set[int] = set()
    for n in ast.walk(scope):
        if is_named_file(n, var):
            allowed.add(id(n.left))
        elif isinstance(n, ast.FormattedValue) and isinstance(n.value, ast.Name):
            allowed.add(id(n.value))
        elif (isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == [var]
              and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", None) == "Path"):
            allowed |= {id(a) for a in n.value.args}
    for call in followed:
        allowed |= {id(a) for a in [*call.args, *(k.value for k in call.keywords)]}
    uses = [n for n in ast.walk(scope) if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)]
    return all(id(n) in allowed for n in uses)


def files_under(path: str, scope: ast.AST, var: str, *, strict: bool, seen: frozenset = frozenset()) -> set[str]:
    """The names `var / "file"` in `scope` opens, and those of every repository function it passes `var` to,
    followed through the library (DataFiles.under(data) opens data / "ppo.jsonl", …). "" stands for the
    whole folder: a followed function (`strict`) that uses its folder in any other way reads all of it."""
    out = {n.right.value for n in ast.walk(scope) if is_named_file(n, var)}
    followed = []
    for call in (n for n in ast.walk(scope) if isinstance(n, ast.Call) and passes(n, var)):
        target = resolve_call(call.func, path, import_names(path))
        param = target and bound_parameter(call, target[1], var)
        if not param:
            continue
        followed.append(call)
        key = (target[0], target[1].name, param)
        if key not in seen:
            out |= files_under(target[0], target[1], param, strict=True, seen=seen | {key})
    if strict and not only_named_uses(scope, var, followed):
        out.add("")
    return out


def named_files(module: str) -> dict[str, set[str]]:
    """{variable: {"file", …}} for every `variable / "file"` in the module, or in a repository function the
    module passes `variable` to: the files it opens under a folder."""
    tree = parse(module)
    names = {n.left.id for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.left, ast.Name)}
    names |= {a.id for n in ast.walk(tree) if isinstance(n, ast.Call)
              for a in [*n.args, *(k.value for k in n.keywords)] if isinstance(a, ast.Name)}
    return {var: files for var in sorted(names) if (files := files_under(module, tree, var, strict=False)) - {""}}


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
            files |= {posixpath.join(value, name) if name else value for name in under.get(option, [""])}
    return files


def path_values(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, dict):
        return [v for x in value.values() for v in path_values(x)]
    if isinstance(value, list):
        return [v for x in value for v in path_values(x)]
    return []


def value_inputs(stage: dict, params: dict, all_outputs: list[str], wdir: str = "") -> set[str]:
    """Values that name a repository path or another stage's output: those of the stage's params keys, and
    those its command overrides with `--set KEY=VALUE` (YAML values: the compare stage's models)."""
    values = [params.get(section, {}).get(field) for section, field in (k.split(".", 1) for k in stage.get("params", []))]
    _, opts = cmd_options(stage["cmd"])
    values += [yaml.safe_load(item.split("=", 1)[1]) for item in opts.get("set", [])]
    return {v for v in path_values(values) if (ROOT / wdir / v).exists() or any(overlaps(v, o) for o in all_outputs)}


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
        need |= cmd_inputs(stage, module) | value_inputs(stage, params, all_outputs, wdir)
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
    name = next(n for n, s in stages.items() if "rlhf/models.py" in entry_paths(s.get("deps")))
    broken = {**stages, name: {**stages[name], "deps": [d for d in stages[name]["deps"] if d != "rlhf/models.py"]}}
    assert f"stage '{name}': rlhf/models.py is not in its deps" in missing_deps(broken, params)

    sft = stages["sft"]
    broken = {"sft": {**sft, "deps": [d for d in sft["deps"] if d != "data/prepared/sft_val.jsonl"]}}
    assert missing_deps(broken, params) == ["stage 'sft': data/prepared/sft_val.jsonl is not in its deps"]

    evaluate = stages["evaluate"]  # one value of a repeated option (--stage-metrics) is checked like any other
    broken = {"evaluate": {**evaluate, "deps": [d for d in evaluate["deps"] if d != "metrics/ppo_noptx.json"]}}
    assert missing_deps(broken, params) == ["stage 'evaluate': metrics/ppo_noptx.json is not in its deps"]

    compare = stages["compare"]  # a model named only in a --set override of the command
    broken = {**stages, "compare": {**compare, "deps": [d for d in compare["deps"] if d != "models/dpo"]}}
    assert missing_deps(broken, params) == ["stage 'compare': models/dpo is not in its deps"]

    reward = stages["reward"]
    with_extra = {**params, "reward": {**params["reward"], "extra_pairs": "data/raw/prompts.jsonl"}}
    assert missing_deps({"reward": reward}, with_extra) == [
        "stage 'reward': data/raw/prompts.jsonl is not in its deps"]


def test_the_check_follows_library_helpers_that_open_files():
    """rloo names no file under --data: it passes the folder to rlhf.critic_free.run, which passes it on to
    rlhf.rollout.DataFiles.under, which opens three files; dropping one of them is still reported. A folder
    that a helper reads otherwise than by name (load_causal_lm reads all of models/sft) stays whole, even
    where another helper opens one named file in it (check_model_dir: config.json)."""
    stages = dvc_stages()
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert named_files("stages/rloo.py")["data"] == {"ppo.jsonl", "test.jsonl", "corpus.jsonl"}
    rloo = stages["rloo"]
    broken = {"rloo": {**rloo, "deps": [d for d in rloo["deps"] if d != "data/prepared/corpus.jsonl"]}}
    assert missing_deps(broken, params) == ["stage 'rloo': data/prepared/corpus.jsonl is not in its deps"]
    assert named_files("stages/sft.py")["base"] == {"", "config.json"}
    assert cmd_inputs(stages["sft"], "stages/sft.py") >= {"models/base", "models/base/config.json"}


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
