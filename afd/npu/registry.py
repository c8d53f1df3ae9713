"""Where `afd stop` finds the schedule contexts of torch jobs on the fake NPU: a file per process (0600).

`<runs root>/npu/<pid>.json` lists the memfd and offset of each live context of that process; another process
reaches the bytes through /proc/<pid>/fd/<fd>. The file goes when the process exits; a SIGKILLed process's file
is swept by the next process that writes here or by `afd stop`.
"""
from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path

from ..layout import RUN_FLAG_OFFSET

_lock = threading.Lock()
_contexts: dict[int, tuple[int, int]] = {}  # address -> (fd, offset)
_gone: list[int] = []  # removals asked for by a finalizer (which may run while this module holds the lock)
_swept = False


def root() -> Path:
    from ..control import runs_root
    return runs_root() / "npu"


def _path(pid: int | None = None) -> Path:
    return root() / f"{pid or os.getpid()}.json"


def _write() -> None:
    path = _path()
    if not _contexts:
        path.unlink(missing_ok=True)
        _remove_empty_root()
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "rank": os.environ.get("RANK"),
                   "contexts": [{"address": a, "fd": fd_, "offset": off} for a, (fd_, off) in _contexts.items()]}, f)
    os.replace(tmp, path)


def add_context(address: int) -> None:
    global _swept
    from .memory import memory
    with _lock:
        _apply_gone()
        _contexts[address] = memory.locate(address, field="schedule_context")
        if not _swept:
            _swept = True
            sweep()
        _write()


def remove_context(address: int) -> None:
    """A holder went away: its context leaves the listing (now, or when the lock is next free)."""
    _gone.append(address)
    if _lock.acquire(blocking=False):
        try:
            _apply_gone()
        finally:
            _lock.release()


def _apply_gone() -> None:
    changed = False
    while _gone:
        changed |= _contexts.pop(_gone.pop(), None) is not None
    if changed:
        _write()


def clear() -> None:
    """This process's listing goes (at exit, or when a signal ends it)."""
    with _lock:
        _contexts.clear()
        _path().unlink(missing_ok=True)
        _remove_empty_root()


def _remove_empty_root() -> None:
    try:
        root().rmdir()  # only when empty: another job's listing keeps it
    except OSError:
        pass


def _alive(pid: int) -> bool:
    from .watchdog import alive
    return alive(pid)


def sweep() -> list[int]:
    """Remove the files of processes that are gone; their pids."""
    gone = []
    for path in root().glob("*.json") if root().is_dir() else ():
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            gone.append(pid)
    return gone


def jobs() -> list[dict]:
    """The live processes with schedule contexts on this machine (dead ones swept)."""
    sweep()
    out = []
    for path in sorted(root().glob("*.json")) if root().is_dir() else ():
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def stop(job: dict) -> int:
    """run_flag = 0 in every context of one process, through its memfds; how many were stopped."""
    done = 0
    for c in job.get("contexts", []):
        try:
            fd = os.open(f"/proc/{job['pid']}/fd/{c['fd']}", os.O_RDWR)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            with mmap.mmap(fd, size) as mm:
                at = c["offset"] + RUN_FLAG_OFFSET
                mm[at:at + 4] = (0).to_bytes(4, "little")
                done += 1
        finally:
            os.close(fd)
    return done
