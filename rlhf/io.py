"""Artifact I/O: validated JSONL reading, atomic writes of files and whole directories.

Every stage reads its inputs through `read_jsonl(path, schema)`, which names the file, line and field
of the first bad record, and writes its outputs through the `atomic_*` helpers, so a crash never
leaves a half-written file or model folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import StageError

# A schema maps a field name to (expected python type or tuple of types, required?).
Schema = dict[str, tuple[Any, bool]]

# Public record formats (documented in docs/formats.md).
PROMPT_SCHEMA: Schema = {"id": (str, True), "prompt": (str, True)}
DEMONSTRATION_SCHEMA: Schema = {"prompt": (str, True), "response": (str, True)}
CORPUS_SCHEMA: Schema = {"text": (str, True)}
RANKING_SCHEMA: Schema = {
    "prompt_id": (str, True),
    "prompt": (str, True),
    "responses": (list, True),
    "ranking": (list, True),
    "labeler": (str, True),
}
PAIRWISE_SCHEMA: Schema = {"prompt": (str, True), "chosen": (str, True), "rejected": (str, True)}
HH_SCHEMA: Schema = {"chosen": (str, True), "rejected": (str, True)}


def _type_label(tp: Any) -> str:
    if isinstance(tp, tuple):
        return " or ".join(t.__name__ for t in tp)
    return {str: "string", list: "list", int: "integer", float: "number", dict: "object"}.get(tp, tp.__name__)


def check_record(record: Any, schema: Schema, where: str) -> dict[str, Any]:
    """Validate one decoded record; `where` is 'file:line' for the message."""
    if not isinstance(record, dict):
        raise StageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, (tp, required) in schema.items():
        if field not in record:
            if required:
                raise StageError(f"{where}: missing field '{field}'")
            continue
        value = record[field]
        if tp in (int, float) and isinstance(value, bool):
            raise StageError(f"{where}: field '{field}' must be a {_type_label(tp)}, got {value!r}")
        if not isinstance(value, tp):
            raise StageError(
                f"{where}: field '{field}' must be a {_type_label(tp)}, got {type(value).__name__}"
            )
        if tp is str and required and not value.strip():
            raise StageError(f"{where}: field '{field}' is empty")
    return record


def iter_jsonl(path: str | Path, schema: Schema | None = None) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StageError(f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{where}: broken JSON ({exc.msg} at column {exc.colno})") from None
            yield check_record(record, schema, where) if schema else record


def read_jsonl(path: str | Path, schema: Schema | None = None, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    records = list(iter_jsonl(path, schema))
    if not records and not allow_empty:
        raise StageError(f"{path}: file is empty; expected one JSON record per line")
    return records


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise StageError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: broken JSON ({exc.msg} at line {exc.lineno})") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Pretty JSON; keys sorted by default so metrics files diff cleanly (pass False where order matters)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success it replaces `path` whole.

    A stage that dies inside the block leaves the previous `path` (or nothing) in place, never a
    half-written folder under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are ordinary readable folders
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_outputs(*paths: str | Path) -> None:
    """Delete stale outputs before a run so a failure cannot leave an old result that looks new."""
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
