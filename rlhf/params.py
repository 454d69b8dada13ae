"""Strict loading of params.yaml sections into frozen dataclasses.

Each stage module defines `Params`, a frozen dataclass whose fields carry a docstring-style comment.
`load_section(path, name, cls)` rejects unknown keys, missing keys and wrong types with a message that
names the key, so a typo in `dvc exp run -S sft.lr=...` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import StageError


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: params file not found; pass --params PATH or run from the repository root")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        # One line: where and what (PyYAML's own message spans several lines with a code excerpt).
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StageError(f"{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a mapping of stage sections at the top level")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except StageError as exc:
                errors.append(str(exc))
        raise StageError(f"params key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise StageError(f"params key '{key}': expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise StageError(f"params key '{key}': expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise StageError(f"params key '{key}': expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _check(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise StageError(f"params key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StageError(f"params key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StageError(f"params key '{key}': expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise StageError(f"params key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise StageError(f"params key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp!r} for key {key}")


def from_dict(cls: type, data: Any, section: str) -> Any:
    """Build dataclass `cls` from `data`; every key must be known, present and of the declared type."""
    if not isinstance(data, dict):
        raise StageError(f"params section '{section}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise StageError(
            f"params key '{section}.{unknown[0]}' is unknown; known keys: {', '.join(sorted(fields))}"
        )
    missing = [name for name in fields if name not in data]
    if missing:
        raise StageError(f"params key '{section}.{missing[0]}' is missing; add it to the '{section}:' section")
    values = {name: _check(data[name], hints[name], f"{section}.{name}") for name in fields}
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def load_section(path: str | Path, section: str, cls: type) -> Any:
    data = read_yaml(path)
    if section not in data:
        raise StageError(f"{path}: no '{section}:' section; copy it from the repository's params.yaml")
    return from_dict(cls, data[section], section)


def override(params: Any, assignments: Sequence[str], section: str) -> Any:
    """`params` with `KEY=VALUE` assignments applied (values read as YAML scalars, typed and validated like
    the file's). DVC variant stages of one command use it: `rlhf ppo --set ptx_coef=0` in dvc.yaml."""
    fields = {f.name for f in dataclasses.fields(params)}
    hints = typing.get_type_hints(type(params))
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise StageError(f"--set {item!r}: expected KEY=VALUE with KEY one of the '{section}:' keys "
                             f"({', '.join(sorted(fields))})")
        changes[key] = _check(yaml.safe_load(text), hints[key], f"{section}.{key}")
    obj = dataclasses.replace(params, **changes)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def require(condition: bool, key: str, message: str) -> None:
    """Range checks used by `Params.validate`: raise a StageError naming the params key."""
    if not condition:
        raise StageError(f"params key '{key}': {message}")


def to_dict(params: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
