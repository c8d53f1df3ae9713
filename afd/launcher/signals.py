"""The stop signals: the launcher turns them into a stop through run_flag; the processes it starts ignore them."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_stop_signals() -> None:
    """In a role process: ignore them, then take them off the mask it was born with (blocked_stop_signals)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class blocked_stop_signals:
    """Children are started with the stop signals blocked: a signal sent to the whole process group (`timeout`,
    a terminal) while a child is still importing must not kill it before it can ignore them; the launcher,
    which gets the same signal, stops everyone through run_flag."""

    def __enter__(self):
        # multiprocess starts its resource tracker on the first spawn and then *unblocks* SIGINT and SIGTERM
        # (not restoring the mask it found): start it before blocking, so that cannot undo the block.
        from multiprocess import resource_tracker
        resource_tracker.ensure_running()
        self.before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.before)  # a signal that came meanwhile is delivered now


class Signalled(Exception):
    """SIGTERM or SIGHUP reached the launcher: the run stops as Ctrl-C stops it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signal.Signals(signum).name}")
