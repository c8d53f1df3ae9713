"""The fork server roles start from, what a forked role takes from its launcher, and the launcher's children at exit.

The server (multiprocess's forkserver) has imported the roles and loaded the kernels once (afd.launcher.preload);
each role is a fork of it. It and multiprocess's resource tracker are children of the launcher that live as long as
the launcher: at its exit the launcher ends and reaps both (stop_servers), so none is left to init, not even as a
zombie; the server reaps its own children before it exits (preload)."""
from __future__ import annotations

import atexit
import os
import signal
import time

import multiprocess

from .signals import blocked_stop_signals

_stopping_registered = False


def role_context():
    """The multiprocess context roles start from: a fork server that loaded the roles and kernels once
    (afd.launcher.preload), started with the stop signals blocked, so it and every role it forks are born with them
    blocked (blocked_stop_signals). It ends when this process does (stop_servers)."""
    global _stopping_registered
    from multiprocess import forkserver

    ctx = multiprocess.get_context("forkserver")
    ctx.set_forkserver_preload(["afd.launcher.preload"])
    with blocked_stop_signals():
        forkserver.ensure_running()
    if not _stopping_registered:
        _stopping_registered = True
        atexit.register(stop_servers)
    return ctx


def launcher_state() -> dict:
    """What a role takes from its launcher: a forked role gets the fork server's environment and working directory,
    which are the launcher's as they were when the server started (an earlier run's, in a long-lived process)."""
    return {"environ": dict(os.environ), "cwd": os.getcwd()}


def adopt(launcher: dict) -> None:
    """In a forked role: the launcher's environment and working directory of this run (launcher_state)."""
    import tempfile

    os.environ.clear()
    os.environ.update(launcher["environ"])
    os.chdir(launcher["cwd"])
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def stop_servers(timeout_s: float = 2.0) -> None:
    """End and reap the fork server and the resource tracker (at this process's exit; every run is closed by then,
    so no role holds them). Each ends when its pipe closes: the server once every role it forked is gone, which it
    reaps first. Bounded: a server still held after timeout_s (a role of a run that was never closed) is killed."""
    from multiprocess import forkserver, resource_tracker

    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    pids, address = [], None
    with server._lock:
        if server._forkserver_pid is not None:
            os.close(server._forkserver_alive_fd)  # its end of the pipe: EOF once every other holder is gone
            pids.append(server._forkserver_pid)
            address = server._forkserver_address
            server._forkserver_alive_fd = server._forkserver_pid = server._forkserver_address = None
    with tracker._lock:
        if tracker._pid is not None and tracker._fd is not None:
            os.close(tracker._fd)
            pids.append(tracker._pid)
            tracker._fd = tracker._pid = None
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        reap(pid, deadline)
    if address and isinstance(address, str):
        try:
            os.unlink(address)
        except OSError:
            pass


def reap(pid: int, deadline: float) -> None:
    """waitpid(pid), polling until `deadline`, then SIGKILL and wait."""
    pause = 0.0005
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
