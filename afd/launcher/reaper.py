"""The reaper: a tiny process that removes a run's segments and run directory once its launcher is gone, however.

It holds the read end of a pipe from the launcher. When the pipe closes (the launcher finished, or was SIGKILLed and
the kernel closed it), it removes the run's segments and run directory, so nothing outlives a launcher that died
after its roles were gone. A launcher that closes normally says so first; one that died says nothing, and then its
multiprocess temp directory (the fork server's socket, which only the launcher's normal exit removes) goes too."""
from __future__ import annotations

import subprocess
import sys

from .signals import blocked_stop_signals

_SCRIPT = """
import glob, os, shutil, sys
said = sys.stdin.buffer.read()
for path in glob.glob(os.path.join(sys.argv[1], "afd-" + sys.argv[2] + "-*")):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
shutil.rmtree(sys.argv[3], ignore_errors=True)
if not said:
    shutil.rmtree(sys.argv[4], ignore_errors=True)
"""


class Reaper:
    """Start it once the run's namespace and run directory exist; close() when the launcher has removed them."""

    def __init__(self, namespace: str, run_dir: str):
        from multiprocess import util as mp_util

        from ..device import SHM_DIR
        with blocked_stop_signals():  # (the reaper keeps them blocked: only its pipe's end ends it)
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _SCRIPT, SHM_DIR, namespace, run_dir,
                                          mp_util.get_temp_dir()], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        """A normal end: everything is already removed; the reaper checks once more and exits (reaped here)."""
        try:
            self.proc.stdin.write(b"closed")  # the multiprocess temp directory stays (other runs use it)
        except OSError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
