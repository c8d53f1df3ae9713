"""What the fork server loads once before it forks a run's roles: every role module and every cached kernel.

Spawned, each role process imported numpy, pydantic, numba and the roles, then loaded its kernels: ~1 s of CPU per
role per run, most of a short run on 2 cores. Forked from a server that did it once, a role starts with all of it
in place. Imported only by the fork server (multiprocess's forkserver preload), never by the launcher.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import sys
import time

from ..runtime.role import _no_numba_blas_probe

_no_numba_blas_probe()  # before a kernel first loads: the probe would import scipy.linalg into every role

for _module in ("agent", "attention_combine", "attention_scheduler", "attention_worker", "controller", "ffn_worker"):
    importlib.import_module(f"afd.roles.{_module}")


class _NotCached(Exception):
    """A kernel is not in numba's cache: the server does not compile it."""


def _load_cached_kernels() -> int:
    """Load every kernel that numba's on-disk cache holds; returns how many warm-ups found theirs. A kernel that is
    not cached is left to the roles' own prepare(): they compile only their own, for their dtype, in parallel
    (serially here, every kernel for both dtypes took 48 s against 19 s on a fresh machine)."""
    from numba.core import event

    from ..ops._kernels import warm_ups

    class LoadOnly(event.Listener):
        def on_start(self, ev):  # numba announces a compile only after its cache had no entry
            raise _NotCached

        def on_end(self, ev):
            pass

    loaded = 0
    with event.install_listener("numba:compile", LoadOnly()):
        for warm_up in warm_ups():
            try:
                warm_up()
                loaded += 1
            except _NotCached:
                pass
    return loaded


try:
    _load_cached_kernels()
except Exception:  # noqa: BLE001 - the roles' prepare() loads what they need; the server must start regardless
    logging.getLogger("afd.launcher.preload").warning("loading the cached kernels in the fork server failed",
                                                     exc_info=True)


def _reap_then_leave() -> None:
    """The server's last act: reap every role it forked, so none is handed to init as a zombie, then leave at once
    (its interpreter's teardown of numba and the kernels would cost the launcher, which waits for it, ~0.3 s). It
    exits when its pipe from the launcher reads EOF, that is when every role (which holds that pipe too) has closed
    it: they are gone or leaving. Only in the server: an importer of this module (a test) exits as usual."""
    server = getattr(sys.modules.get("multiprocess.forkserver"), "_forkserver", None)
    if server is None or server._forkserver_address is None or server._forkserver_pid is not None:
        return  # not the fork server (the launcher has the server's pid; any other process has no address)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


atexit.register(_reap_then_leave)  # (forked roles inherit it but leave by os._exit: it never runs in them)

# What is loaded now stays out of the collector's reach: a role's full collection would otherwise write the GC
# header of every inherited object, and each page it writes stops being shared with the server and the other roles.
gc.freeze()
