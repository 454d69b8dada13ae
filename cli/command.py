"""The command class every `rlhf` command uses: help that survives markdown, a stage's params in its
--help, and the fix for the likeliest first mistake (a hyperparameter given as a flag).

Hyperparameters are not flags (they live in params.yaml, changed with `dvc exp run -S`), so `rlhf sft
--lr 0.001` is bad usage; instead of click's "No such option" it answers with the command that does it.
Both the hint and the help read a stage's Params fields from stages/<name>.py with `ast` and the values
with yaml: importing the stage would import torch, and help must stay instant.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import NoSuchOption
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import NoSuchOption

ARGS = "rlhf.args"  # ctx.meta key: the command's raw arguments, for --help and usage errors
MISSING = object()  # a field with no value in the params file

# ----------------------------------------------------------------------------------------------
# Help text in typer's markdown mode


def markdown_safe(text: str | None) -> str | None:
    """Help text whose angle brackets and example lines survive markdown rendering.

    Markdown joins the lines of a paragraph and drops `<stage>` as an HTML tag; so `<` is escaped
    outside backticks, and a line starting with "Example" starts a new line (a hard break before it).
    """
    if not text:
        return text
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        parts = re.split(r"(`[^`]*`)", line)  # odd items are code spans, shown verbatim
        line = "".join(p if k % 2 else p.replace("<", "\\<") for k, p in enumerate(parts))
        if re.match(r"\s*>", line):
            line = line.replace(">", "\\>", 1)  # not a block quote
        if i and line.lstrip().startswith("Example") and out[-1].strip():
            out[-1] += "\\"  # markdown hard line break
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# A stage's params, read without importing the stage


@dataclass(frozen=True)
class Field:
    key: str
    doc: str
    value: Any = MISSING


def _stages_dir() -> Path | None:
    spec = importlib.util.find_spec("stages")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def stage_names() -> list[str]:
    folder = _stages_dir()
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") if folder else []


def params_fields(stage: str) -> list[tuple[str, str]] | None:
    """(field, docstring) of `class Params` in stages/<stage>.py, in order; None if there is none."""
    folder = _stages_dir()
    path = folder / f"{stage}.py" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None  # help still works while a stage file is being edited
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Params":
            fields: list[tuple[str, str]] = []
            for stmt, after in zip(node.body, [*node.body[1:], None]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    doc = ""
                    if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                        doc = " ".join(str(after.value.value).split())
                    fields.append((stmt.target.id, doc))
            return fields
    return None


def read_section(params_file: Path, stage: str) -> dict[str, Any] | None:
    """The stage's section of a params file; None when the file or the section is absent or unreadable."""
    import yaml

    try:
        data = yaml.load(params_file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = data.get(stage) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else None


def stage_params(stage: str, params_file: Path) -> tuple[list[Field], bool] | None:
    """The stage's params with their values from `params_file`, and whether the file had its section.

    Keys in the file that the stage does not know are listed last (the stage refuses them at run time).
    """
    fields = params_fields(stage)
    if fields is None:
        return None
    section = read_section(params_file, stage)
    values = section or {}
    known = {key for key, _ in fields}
    listed = [Field(key, doc, values.get(key, MISSING)) for key, doc in fields]
    listed += [Field(key, f"not a parameter of {stage}: the stage refuses unknown keys", value)
               for key, value in values.items() if key not in known]
    return listed, section is not None


def format_value(value: Any) -> str:
    if value is MISSING:
        return "-"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if value == "":
        return '""'
    if isinstance(value, (dict, list)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return str(value)


# ----------------------------------------------------------------------------------------------
# Reading the raw arguments (parsing failed or has not finished when these are needed)


def option_value(args: list[str], option: str) -> str | None:
    """The value given to `option` in `args` (`--opt value` or `--opt=value`), else None."""
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and i + 1 < len(args):
            nxt = args[i + 1]
            if not nxt.startswith("-") or re.fullmatch(r"-[0-9.][0-9.eE+-]*", nxt):
                return nxt
    return None


def params_hint(stage: str, option: str, args: list[str], params_file: str) -> str | None:
    """One line for an unknown option that names a params key, else None (typer's message stands).

    `--lr`, `--warmup-steps`, `--sft.lr` name `sft.lr` for `rlhf sft`; a key of one other stage is named
    with its stage (`rlhf sft --ptx-coef` -> ppo.ptx_coef), a key of several gets `--help`'s pointer;
    `-S` gets the `dvc exp run` it belongs to.
    """
    own = params_fields(stage)
    if own is None:
        return None  # a tool outside the DAG (e.g. `rlhf label`) has no params
    value = option_value(args, option)
    if option in ("-S", "--set-param"):  # dvc exp run's flag given to rlhf
        return f"no option {option}: {option} belongs to dvc exp run; run  dvc exp run {option} {value or 'KEY=VALUE'}"
    key = option.lstrip("-").replace("-", "_")
    if key.startswith(f"{stage}."):
        key = key[len(stage) + 1:]
    if any(key == k for k, _ in own):
        owner, where = stage, "a parameter"
    else:
        owners = [s for s in stage_names() if s != stage and any(key == k for k, _ in params_fields(s) or [])]
        if len(owners) > 1:
            others = ", ".join(f"{s}.{key}" for s in owners)
            return (f"no option {option}: {stage} has no parameter {key} ({others} belong to other stages); "
                    f"`rlhf {stage} --help` lists {stage}'s parameters")
        if not owners:
            return None
        owner, where = owners[0], f"a parameter of the {owners[0]} stage, not of {stage}"
    assignment = shlex.quote(f"{owner}.{key}={value if value is not None else 'VALUE'}")
    return (f"no option {option}: {owner}.{key} is {where}; change it with  dvc exp run -S {assignment}  "
            f"or in {params_file}")


# ----------------------------------------------------------------------------------------------
# The command class


class Command(TyperCommand):
    """A typer command with markdown-safe help; a stage's command also lists its params in --help and
    answers a hyperparameter given as a flag with the `dvc exp run -S` that sets it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.rich_markup_mode == "markdown":
            self.help = markdown_safe(self.help)
            for param in self.params:
                if getattr(param, "help", None):
                    param.help = markdown_safe(param.help)

    def params_file(self, ctx: typer.Context) -> str:
        """The --params value on the command line, else the option's default (params.yaml)."""
        given = option_value(ctx.meta.get(ARGS, []), "--params")
        if given is not None:
            return given
        default = next((p.default for p in self.params if p.name == "params"), None)
        return str(default) if default is not None else "params.yaml"

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGS] = list(args)  # a copy: click's parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            hint = params_hint(self.name or "", exc.option_name, ctx.meta[ARGS], self.params_file(ctx))
            if hint is None:
                raise  # typer's message, with its suggestions of real options
            from cli.runner import fail

            typer.echo(ctx.get_usage(), err=True)
            fail(hint, code=2)
            raise  # unreachable: fail exits

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        if self.rich_markup_mode is not None and self.name:
            self.print_params(ctx)

    def print_params(self, ctx: typer.Context) -> None:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        params_file = self.params_file(ctx)
        found = stage_params(self.name, Path(params_file))
        if found is None:
            return
        fields, has_section = found
        table = Table(show_header=False, expand=True, box=None, padding=(0, 1), pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(style="green", overflow="fold", max_width=20)
        table.add_column(ratio=1, min_width=30)
        for field in fields:  # Text cells: values such as [sft, base] are not rich markup
            table.add_row(Text(field.key), Text(format_value(field.value) if has_section else ""), Text(field.doc))
        where = f"in {params_file}" if has_section else f"not found in {params_file}; fields only"
        Console().print(Panel(
            table, border_style="dim", title_align="left", subtitle_align="left",
            title=Text(f"Params · {self.name}: {where}"),
            subtitle=Text(f"change one: dvc exp run -S {self.name}.KEY=VALUE"),
        ))
