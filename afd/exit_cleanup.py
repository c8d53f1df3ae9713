"""What a process must undo when it ends, however it ends short of SIGKILL: at exit, and on a SIGTERM or SIGHUP that
nobody else handles (the cleanups run, then the process dies of the signal as it would have), and, where asked, when
the process that started it is gone.

Python runs a signal handler only when the main thread comes back to the interpreter, so a process blocked in
native code (a TCPStore connect, a gloo collective) would never run it. The C-level handler Python installs does
run at once, and writes the signal number to the wakeup fd (signal.set_wakeup_fd): a watcher thread reads it from
there (and the parent's pidfd, when asked to end with the parent), runs the cleanups and re-raises the signal with
its default action, whatever the main thread is doing.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
CLEANUP_BOUND_S = 0.8  # a cleanup stuck on a lock the blocked main thread holds must not keep the process alive
PARENT_POLL_S = 0.2  # without a pidfd (old kernel) the parent is polled at this interval

_cleanups: list = []
_lock = threading.Lock()
_dying = threading.Lock()  # the first path to end the process holds it; any other waits for the end
_installed = False
_watch = None  # the watcher of this process (_Watcher), if any
_parent: tuple[int, str] | None = None  # (pid, what to say) when this process ends with its parent


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


def _default_action(signum: int) -> None:
    """Die of signum now, as with no handler (from any thread: the C disposition is reset through libc, since
    signal.signal works only in the main thread)."""
    try:
        ctypes.CDLL(None, use_errno=True).signal(signum, ctypes.c_void_p(0))  # SIG_DFL
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.pthread_kill(threading.get_ident(), signum)
    finally:
        os._exit(128 + signum)  # not reached unless the signal could not be raised


def die(signum: int, message: str | None = None) -> None:
    """Run the cleanups (at most CLEANUP_BOUND_S), then die of signum. Never returns."""
    if not _dying.acquire(blocking=False):
        _dying.acquire()  # another thread is ending the process; it dies with us in it
    timer = threading.Timer(CLEANUP_BOUND_S, _default_action, (signum,))
    timer.daemon = True
    timer.start()
    if message:
        try:
            print(message, file=sys.stderr, flush=True)
        except Exception:  # (a closed pipe: whoever read it is gone)
            pass
    run_all()
    _default_action(signum)


def _on_signal(signum, frame) -> None:
    die(signum)


class _Watcher:
    """The thread that ends the process on a signal or on its parent's end, wherever the main thread is."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()  # (not inherited by exec'd children)
        os.set_blocking(self.write_fd, False)
        self.pidfd = None
        self.thread = threading.Thread(target=self._run, name="afd-exit-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def watch_parent(self) -> None:
        """Open the parent's pidfd (readable once it ends); without one, the thread polls getppid."""
        pid = _parent[0]
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        os.write(self.write_fd, b"\0")  # wake the thread so it selects on the new fd

    def orphaned(self) -> bool:
        return _parent is not None and os.getppid() != _parent[0]

    def _run(self) -> None:
        while True:
            fds = [self.read_fd] + ([self.pidfd] if self.pidfd is not None else [])
            timeout = PARENT_POLL_S if _parent is not None and self.pidfd is None else None
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except (OSError, ValueError):  # an fd closed under us (the process is forking or ending)
                return
            if self.read_fd in ready:
                try:
                    data = os.read(self.read_fd, 512)
                except OSError:
                    return
                for signum in data:
                    # only a signal whose handler is still ours: whoever installed their own handles it themselves
                    if signum in SIGNALS and signal.getsignal(signum) is _on_signal:
                        die(signum)
            if (self.pidfd is not None and self.pidfd in ready) or self.orphaned():
                die(signal.SIGTERM, _parent[1])


def _start_watcher() -> None:
    """Install the handlers and the watcher (main thread only; never over someone's handler or wakeup fd)."""
    global _watch
    ours = [sig for sig in SIGNALS if signal.getsignal(sig) in (signal.SIG_DFL, _on_signal)]
    for sig in ours:
        signal.signal(sig, _on_signal)
    if not ours and _parent is None:
        return  # (a role process, which ignores them): nothing to watch
    watch = _Watcher()
    if ours:
        previous = signal.set_wakeup_fd(watch.write_fd, warn_on_full_buffer=False)
        if previous != -1:  # someone else's (asyncio's): theirs stays, and our handlers run in Python only
            signal.set_wakeup_fd(previous)
    _watch = watch
    if _parent is not None:
        watch.watch_parent()
    watch.start()
    if watch.orphaned():  # the parent was gone before the watch began
        die(signal.SIGTERM, _parent[1])


def _after_fork_in_child() -> None:
    """A forked child has no watcher thread, and its wakeup fd is its parent's pipe: a signal to the child would
    end the parent. It gets a watcher of its own (and ends with the process that forked it, if its parent asked)."""
    global _watch, _parent
    if _watch is None:
        return
    old, _watch = _watch, None
    try:
        current = signal.set_wakeup_fd(-1)
        if current != old.write_fd:  # someone else's: it stays
            signal.set_wakeup_fd(current)
    except ValueError:
        pass
    old.close()
    if _parent is not None:
        _parent = (os.getppid(), _parent[1])
    _start_watcher()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register(fn) -> None:
    """Run fn once when this process ends (normally, by an exception, or by an unhandled SIGTERM / SIGHUP, even one
    that arrives while the main thread is blocked in native code)."""
    global _installed
    with _lock:
        _cleanups.append(fn)
        if _installed:
            return
        _installed = True
    atexit.register(run_all)
    if threading.current_thread() is threading.main_thread():
        _start_watcher()


def end_with_parent(message: str) -> None:
    """End this process (cleanups, then SIGTERM's default action) within a fraction of a second of its parent's
    end, wherever its main thread is blocked; `message` goes to stderr first. Main thread only."""
    global _parent
    pid = os.getppid()
    if pid <= 1 or _parent is not None:
        return  # already orphaned (or started by init): nothing to watch
    _parent = (pid, message)
    if _watch is not None:
        _watch.watch_parent()
    elif threading.current_thread() is threading.main_thread():
        _start_watcher()
