"""What a process must undo when it ends, however it ends short of SIGKILL: at exit, and on a SIGTERM or SIGHUP that
nobody else handles (the cleanups run, then the process dies of the signal as it would have)."""
from __future__ import annotations

import atexit
import os
import signal
import threading

_cleanups: list = []
_lock = threading.Lock()
_installed = False


def run_all() -> None:
    """Run the cleanups now, once: at exit, on a signal, or before a process leaves by os._exit (a forked child)."""
    with _lock:
        todo = list(_cleanups)
        _cleanups.clear()
    for fn in todo:
        try:
            fn()
        except Exception:  # one failed cleanup must not keep the others from running
            pass


def _on_signal(signum, frame) -> None:
    run_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def register(fn) -> None:
    """Run fn once when this process ends (normally, by an exception, or by an unhandled SIGTERM / SIGHUP)."""
    global _installed
    with _lock:
        _cleanups.append(fn)
        if _installed:
            return
        _installed = True
    atexit.register(run_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:  # never over someone's own handler
                signal.signal(sig, _on_signal)
