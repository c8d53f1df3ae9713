"""The processes on this machine as /proc lists them: one scan, for whoever asks who is in a group or a session."""
from __future__ import annotations

import os
from typing import NamedTuple


class Proc(NamedTuple):
    pid: int
    state: str  # R, S, D, Z (a zombie: exited, not yet reaped), ...
    ppid: int
    pgid: int
    sid: int


def processes():
    """Every process /proc shows now (zombies included); one that ends while it is read is skipped."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # (the command name before it may hold anything)
        except (OSError, IndexError):
            continue
        yield Proc(int(entry), fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def group(pgid: int) -> list[Proc]:
    """The processes of process group pgid, zombies included."""
    return [p for p in processes() if p.pgid == pgid]


def session(sid: int) -> list[Proc]:
    """The processes of session sid, zombies included."""
    return [p for p in processes() if p.sid == sid]
