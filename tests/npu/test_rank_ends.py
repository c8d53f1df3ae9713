"""A fake-NPU rank blocked in native code still ends at once: on SIGTERM (dying of it, its cleanups done) and when
its launcher is SIGKILLed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afd.npu.watchdog import alive

SCRIPT = Path(__file__).parent / "scripts" / "blocked_rank.py"


def _start(args, env):
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, text=True)


def _read_json(proc) -> dict:
    line = proc.stdout.readline()
    assert line, f"the script ended before it said anything (exit {proc.wait()})"
    return json.loads(line)


def _wait_listed(listing: Path) -> None:
    deadline = time.monotonic() + 10
    while not listing.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listing.exists(), "the rank lists its schedule context for `afd stop`"
    time.sleep(0.5)  # inside the connect by now


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "AFD_RUN_DIR": str(tmp_path / "runs")}


@pytest.mark.timeout(90)
def test_a_rank_blocked_in_a_tcpstore_connect_dies_of_sigterm_within_1s_with_its_cleanups_done(env):
    proc = _start([], {**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    try:
        info = _read_json(proc)
        listing = Path(info["listing"])
        _wait_listed(listing)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert code == -signal.SIGTERM, f"dies of the signal, exit status {code}"
    assert took < 1.0, f"took {took:.2f} s"
    assert not listing.exists(), "its `afd stop` listing is gone"


@pytest.mark.timeout(90)
def test_a_rank_blocked_in_a_tcpstore_connect_ends_within_1s_when_its_launcher_is_sigkilled(env):
    parent = _start(["--parent"], env)
    child = None
    try:
        child = _read_json(parent)["child"]
        info = _read_json(parent)  # the rank writes to the same pipe
        assert info["pid"] == child
        listing = Path(info["listing"])
        _wait_listed(listing)
        t0 = time.monotonic()
        parent.kill()
        parent.wait()
        while alive(child) and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        took = time.monotonic() - t0
        gone = not alive(child)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
    assert gone and took < 1.0, f"the rank still ran {took:.2f} s after its launcher's end"
    assert not listing.exists(), "its `afd stop` listing is gone"
