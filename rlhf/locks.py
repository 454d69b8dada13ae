"""Lock files that keep two processes from writing the same output at once.

The lock of an output `models/sft` is the file `models/.sft.lock` beside it. It holds a JSON note of
its owner (pid, host, command, start time) for the error message, and it is locked with flock(2):
the kernel drops a flock when its process ends, however it ends (SIGKILL included). A lock file left
behind by a killed run is therefore stale by construction: the next run locks it, says so, and takes
it over. The owner removes the file when it is done.

Two kinds of holders use it:
- `output_locks`: a stage run holds the locks of all its outputs for the whole run and refuses to
  start (StageError, one line) when another live process holds one of them;
- `locked`: short critical sections (the labeling tool's reload-merge-write of a shared labels file)
  wait for their turn, and may keep shared state in the lock file itself (`LockedFile.state`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import StageError


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dataclass
class LockedFile:
    """A held lock: its path, open descriptor, and the JSON state found in it when it was taken."""

    path: Path
    fd: int
    state: dict[str, Any]

    def write(self, state: dict[str, Any]) -> None:
        data = json.dumps(state, sort_keys=True).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        self.state = state


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 20, 0)
        state = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # a holder killed mid-write: no note
        return {}
    return state if isinstance(state, dict) else {}


def _try_lock(lock: Path, output: Path) -> tuple[LockedFile | None, dict[str, Any]]:
    """(held lock, its state) or (None, the owner's note) when another process holds it."""
    from rlhf.io import write_failure

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # an output folder that cannot be written fails now, not after training
            raise write_failure(exc, output) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None, owner
            raise
        # The previous owner may have removed the file between our open and our flock; then we hold
        # a lock on a file nobody else will open: start again on the file now at that path.
        try:
            st = os.stat(lock)
            same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        except FileNotFoundError:
            same = False
        if same:
            return LockedFile(lock, fd, _read(fd)), {}
        os.close(fd)


def _release(held: LockedFile, *, remove: bool = True) -> None:
    try:
        if remove:
            held.path.unlink(missing_ok=True)  # while still locked: nobody can take it in between
    finally:
        os.close(held.fd)


@contextlib.contextmanager
def locked(path: str | Path, *, timeout: float = 60.0, keep=lambda state: False) -> Iterator[LockedFile]:
    """Wait (up to `timeout` s) for the lock of `path` and hold it for the block.

    The lock file is removed on exit unless `keep(state)` says its state is still needed.
    """
    lock = lock_path(path)
    deadline = time.monotonic() + timeout
    while True:
        held, owner = _try_lock(lock, path)
        if held is not None:
            break
        if time.monotonic() > deadline:
            raise StageError(f"{path}: still locked after {timeout:.0f} s by {describe(owner)}; "
                             f"if no such process runs, delete {lock}")
        time.sleep(0.02)
    try:
        yield held
    finally:
        _release(held, remove=not keep(held.state))


def describe(owner: dict[str, Any]) -> str:
    """'rlhf sft, pid 4242, since 07:12:03 UTC' from an owner note (or 'another process')."""
    if not owner.get("pid"):
        return "another process"
    where = "" if owner.get("host") in (None, socket.gethostname()) else f" on {owner['host']}"
    since = f", since {owner['since']}" if owner.get("since") else ""
    return f"{owner.get('command', 'another process')}, pid {owner['pid']}{where}{since}"


def owner_note(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


@contextlib.contextmanager
def output_locks(outputs: dict[str, Path], command: str, *, on_stale=None) -> Iterator[None]:
    """Hold the lock of every output (option name -> path) for the block, or fail at once.

    Raises StageError naming the output, the owner and the option when a live process holds one.
    `on_stale(path, note)` is called for each lock file taken over from a process that has ended.
    """
    held: list[LockedFile] = []
    try:
        for option, path in sorted(outputs.items(), key=lambda kv: str(kv[1])):
            lock, owner = _try_lock(lock_path(path), path)
            if lock is None:
                raise StageError(f"{path} is being written by another run ({describe(owner)}); wait for it to "
                                 f"finish, or point --{option.replace('_', '-')} elsewhere")
            held.append(lock)
            if lock.state.get("pid") and on_stale is not None:
                on_stale(path, lock.state)
            try:
                lock.write(owner_note(command))
            except OSError as exc:
                from rlhf.io import write_failure

                raise write_failure(exc, path) from exc
        yield
    finally:
        for lock in reversed(held):
            _release(lock)
