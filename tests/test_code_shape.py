"""Code shape: no function in stages/ or rlhf/ is longer than MAX_LINES lines.

Parses every module with `ast` (importing nothing) and measures each function, nested ones
included, from its `def` line (decorators excluded) to its last line. A long function is split
into named steps that read like the recipe (see stages/ppo.py and stages/evaluate.py: a state
object and module-level steps).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "rlhf")
MAX_LINES = 80

# Known offenders owned by someone else right now: "path::qualified.name". Remove an entry when the
# function is split (test_allow_list_is_current fails when an entry no longer applies).
ALLOWED: set[str] = set()


def function_lengths(path: Path) -> dict[str, int]:
    """Qualified name ("Class.method", "outer.inner") -> number of lines, for every function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


def long_functions() -> dict[str, int]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name, n in function_lengths(path).items():
                if n > MAX_LINES:
                    found[f"{rel}::{name}"] = n
    return found


def test_no_function_is_longer_than_the_limit():
    offenders = {k: n for k, n in long_functions().items() if k not in ALLOWED}
    listing = "\n".join(f"  {k}: {n} lines" for k, n in sorted(offenders.items()))
    assert not offenders, f"functions longer than {MAX_LINES} lines (split them into steps):\n{listing}"


def test_allow_list_is_current():
    stale = ALLOWED - set(long_functions())
    assert not stale, f"allowed long functions that are now short or gone, drop them: {sorted(stale)}"


def test_lengths_are_measured_from_def_to_last_line(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("@dec\ndef f():\n    x = 1\n\n    return x\n\nclass C:\n    def g(self):\n        pass\n")
    assert function_lengths(module) == {"f": 4, "C.g": 2}
