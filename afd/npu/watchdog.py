"""The fake NPU's waits: afd's wait policy without a controller, bounded by AFD_NPU_STALL_TIMEOUT_S, with liveness.

Every spin of an operator (and every event wait of a stream) runs afd.waiting.WaitPolicy: it spins, then naps in
bounded slices, and past the stall bound raises afd.waiting.Stall naming the operator, the micro-batch and, where
the operator knows them, the flags still missing and the rank that owed them. Between slices it checks that the
ranks owing the flags are still alive and that this process still has its parent (torchrun), so a killed peer
or a killed launcher ends the wait within a slice instead of the stall bound.
"""
from __future__ import annotations

import os
import sys
import threading

from ..errors import AfdError
from ..waiting import WaitPolicy

STALL_ENV = "AFD_NPU_STALL_TIMEOUT_S"
DEFAULT_STALL_TIMEOUT_S = 30.0  # long enough for a real job's first step, short enough that CI never waits long
# FFN-side waits starve whenever the attention side is stuck; they get twice the bound so the first error names
# the cause (the attention rank's missing flags).
DOWNSTREAM_OPS = frozenset({"ffn_worker_batching", "ffn_worker_scheduler_"})

_local = threading.local()
current_stream_of_thread = threading.local()
_parent = os.getppid()


class PeerGone(AfdError):
    """A rank this wait depends on is dead: what it owed will never arrive."""


class Orphaned(AfdError):
    """The process that started this one (torchrun) is gone."""


def stall_timeout_s(text: str | None = None) -> float:
    """The stall bound: AFD_NPU_STALL_TIMEOUT_S (or `text`), default 30 s; a bad value names the variable."""
    text = (os.environ.get(STALL_ENV, "") if text is None else text).strip()
    if not text:
        return DEFAULT_STALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise AfdError(STALL_ENV, f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise AfdError(STALL_ENV, f"must be > 0, got {value}")
    return value


def rank() -> int:
    """This process's rank in its torch job (torchrun's RANK; 0 when started alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def who() -> str:
    rank = os.environ.get("RANK")
    return f"rank{rank}" if rank is not None else f"pid {os.getpid()}"


def announce(message: str) -> None:
    """Say it now, on stderr: the host may be blocked elsewhere and only see the error at its next sync."""
    print(f"[afd npu {who()}] {message}", file=sys.stderr, flush=True)


def check_parent() -> None:
    if _parent > 1 and os.getppid() != _parent:
        raise Orphaned("parent", f"the process that started {who()} (pid {_parent}) is gone; this rank ends too")


def end_with_launcher() -> None:
    """A rank (RANK or LOCAL_RANK set: started by torchrun or another launcher) ends, its cleanups done, within a
    fraction of a second of its parent's end, wherever it is blocked (a native call included), not only inside
    afd-sim's own waits (check_parent). Other processes (a script, pytest) may outlive whoever started them."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        from .. import exit_cleanup
        exit_cleanup.end_with_parent(f"[afd npu {who()}] the process that started {who()} (pid {os.getppid()}) is "
                                     "gone; this rank ends too")


def alive(pid: int) -> bool:
    """True while pid runs (a zombie, killed but not yet reaped, is dead)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def set_context(explain=None, owed_by=None) -> None:
    """What the operator about to wait on this thread can say about a stall: explain(waiting) -> details, and
    owed_by() -> the (rank, pid) pairs that owe what it waits for (asked only once it waits)."""
    _local.explain, _local.owed_by, _local.owed = explain, owed_by, None


def _owed() -> tuple:
    owed = getattr(_local, "owed", None)
    if owed is None:
        fn = getattr(_local, "owed_by", None)
        owed = _local.owed = tuple(fn()) if fn is not None else ()
    return owed


def _service(_now: int) -> None:
    check_parent()
    for rank, pid in _owed():
        if pid and not alive(pid):
            raise PeerGone(f"rank {rank}", f"(pid {pid}) is dead; the flags it owes will never arrive")


def _explain(waiting):
    explain = getattr(_local, "explain", None)
    return explain(waiting) if explain is not None else None


def policy() -> WaitPolicy:
    """This thread's wait policy (state per wait, so one per thread; made again if the stall bound changed)."""
    p = getattr(_local, "policy", None)
    setting = os.environ.get(STALL_ENV, "")
    if p is None or getattr(_local, "setting", None) != setting:
        _local.setting = setting
        p = _local.policy = WaitPolicy(
            who(), spin_us=50.0, stall_timeout_s=stall_timeout_s(), service_interval_s=0.05, service=_service,
            stall_factor=lambda w: 2.0 if w.op in DOWNSTREAM_OPS or w.op.endswith("event wait") else 1.0,
            explain=_explain)
    return p
