"""Artifact I/O: validated JSONL reading, atomic writes of files and whole directories.

Every stage reads its inputs through `read_jsonl(path, schema)`, which names the file, line and field
of the first bad record, and writes its outputs through the `atomic_*` helpers, so a crash never
leaves a half-written file or model folder that looks complete, and a write that fails for an outside
reason (a full disk, a permission, a read-only file system) is one line naming the path and the fix
(docs/bad_inputs.md), with the temporary file or folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import OutputError, StageError

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
    """One JSON document (a metrics file); a missing or broken file is a one-line StageError."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise StageError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: broken JSON ({exc.msg} at line {exc.lineno})") from None


# ----------------------------------------------------------------------------------------------
# Writes: atomic, and a failed one is one line naming the path and the fix

_MB = 1_000_000


def write_errno(exc: BaseException, path: Path | None = None, need: int | None = None) -> int | None:
    """The OS error number behind a failed write, or None if `exc` is no write failure.

    Besides OSError: torch.save to a path reports a short write as RuntimeError ("unexpected pos";
    a disk that filled up), and safetensors reports I/O errors as SafetensorError ("(os error 28)").
    """
    if isinstance(exc, OSError):
        return exc.errno  # None for a library's OSError that is no OS error ("Can't load tokenizer")
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        match = re.search(r"os error (\d+)", text)
        return int(match.group(1)) if match else None
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed writing" in text):
        free = _free_bytes(path) if path is not None else None
        return errno.ENOSPC if free is not None and free < max(need or 0, _MB) else errno.EIO
    return None


def _existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def write_failure(exc: BaseException, path: str | Path, need: int | None = None) -> OutputError | None:
    """The one-line error for writing `path` (about `need` bytes) that failed with `exc`; None if no write failure."""
    code = write_errno(exc, Path(path), need)
    if code is None:
        return None
    path = Path(path)
    if code in (errno.ENOSPC, errno.EDQUOT):
        problem = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        free = _free_bytes(path)
        short = need - free if need is not None and free is not None else 0
        amount = f"{math.ceil(short / _MB)} MB" if short > 0 else "space"
        return OutputError(path, problem, f"free {amount} on that disk or {{elsewhere}}")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(path, "permission denied", f"make {_existing(path.parent)} writable or {{elsewhere}}")
    if code == errno.EROFS:
        return OutputError(path, "read-only file system", "{elsewhere}, on a writable disk")
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path.parent)
        return OutputError(path, f"{blocker} is a file, not a folder,", f"move {blocker} away or {{elsewhere}}")
    if code == errno.EISDIR:
        return OutputError(path, "a folder stands in the way", f"move the folder {path} away or {{elsewhere}}")
    if code == errno.ENOENT:
        return OutputError(path, "its folder disappeared", "rerun (was it deleted while the stage ran?) or {elsewhere}")
    return OutputError(path, os.strerror(code).lower(), "check the disk, then rerun, or {elsewhere}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on error it is removed.

    A write that fails for an outside reason (a full disk, a permission, a read-only disk) becomes an
    OutputError naming `path` and the fix; `need`, the size about to be written, if known, lets it
    say how much space to free.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)  # before measuring free space: it held the partial write
        error = write_failure(exc, path, need)
        if error is None:
            raise
        raise error from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_path(path, need=len(data)) as tmp:
        tmp.write_bytes(data)


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


def timing(t0: float, *, train_s: float | None = None, done: float = 0, unit: str = "", resumed_from: int = 0) -> dict[str, Any]:
    """The `timing` block of a stage's metrics file: one convention for the stages of the report's cost table
    (every stage that trains, and best-of-n).

    `wall_s`: the whole stage since `t0` (loading and held-out evaluation included); `train_s`: the
    training loop alone; `<unit>_per_s`: `done` units (episodes, pairs, tokens, ...) of this invocation
    over `train_s`; `resumed_from`: the step a resumed run started at (0 for a whole run). Timings vary
    from run to run and machine to machine: everything else in a metrics file is byte-stable, and the
    tests that compare runs compare them without this block (tests/conftest.py `without_timing`).
    """
    import time

    block: dict[str, Any] = {"wall_s": round(time.time() - t0, 1)}
    if train_s is not None:
        block["train_s"] = round(train_s, 1)
        if unit:
            block[f"{unit}_per_s"] = round(done / max(train_s, 1e-9), 1)
    block["resumed_from"] = resumed_from
    return block


def write_metrics(path: str | Path, result: dict[str, Any], *, settings: Iterable[str] = ()) -> None:
    """A stage's metrics file: `result` without its `settings` keys. A setting (pretrain's or rank's
    `source`) is in params.yaml already and belongs in the summary line, not among the measurements
    that `dvc metrics diff` compares."""
    skip = set(settings)
    write_json(path, {k: v for k, v in result.items() if k not in skip})


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, need: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success it replaces `path` whole.

    A stage that dies inside the block leaves the previous `path` (or nothing) in place, never a
    half-written folder under the final name. A failed write inside is reported under the file's
    final name (`models/sft/model.safetensors`, not the temporary folder's).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are ordinary readable folders
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
    except BaseException as exc:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

        def final(p: str | Path) -> Path:
            if tmp is not None:
                full, root = Path(os.path.abspath(p)), Path(os.path.abspath(tmp))
                if full.is_relative_to(root):
                    return path / full.relative_to(root)
            return Path(p)

        if isinstance(exc, OutputError):
            raise exc.moved(final(exc.path)) from exc.__cause__
        filename = getattr(exc, "filename", None)
        error = write_failure(exc, final(filename) if filename else path, need)
        if error is None:
            raise
        raise error from exc


def remove_outputs(*paths: str | Path) -> None:
    """Delete stale outputs before a run so a failure cannot leave an old result that looks new."""
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
