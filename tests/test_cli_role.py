"""`afd role`: every role, each host's agent and the controller as separate commands (as containers run them), joined
over TCP with the run's CURVE keys; a completed run prints the summary and exits 0, `afd stop` stops a long one."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afd import device
from afd.cli import main

CONFIG = """\
name: t-role-two-hosts
sessions: 1
ffn_ranks: 2
micro_batch_num: 2
steps: 3
control: {transport: tcp}
hosts:
  attn: {roles: [attn0, sched0, combine0]}
  ffn: {roles: [ffn0, ffn1]}
"""
ROLES = [["agent", "--host", "attn"], ["agent", "--host", "ffn"], ["attn", "--rank", "0"], ["sched", "--rank", "0"],
         ["combine", "--rank", "0"], ["ffn", "--rank", "0"], ["ffn", "--rank", "1"]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:  # and the one above it (the controller publishes on PORT+1)
        try:
            s.bind(("127.0.0.1", port + 1))
        except OSError:
            return _port()
    return port


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, AFD_RUN_DIR=str(tmp_path / "runs"), AFD_HEALTH_DIR=str(tmp_path / "health"))
    (tmp_path / "two.yaml").write_text(CONFIG)
    return e


# `afd role ...` whose RunMemory.attach (after the welcome) first creates the file argv[2], then waits argv[1]
# seconds: a role still joining (as on a loaded machine) after the others are ready
SLOW_ATTACH = """
import sys, time
from afd.cli import main
from afd.runtime.memory import RunMemory
attach, delay, mark = RunMemory.attach, float(sys.argv[1]), sys.argv[2]
RunMemory.attach = lambda *a, **k: (open(mark, "w").close(), time.sleep(delay), attach(*a, **k))[2]
sys.exit(main(sys.argv[3:]))
"""


def _start(tmp_path, env, steps=None, slow: dict[str, float] | None = None):
    port = _port()
    keys = str(tmp_path / "keys" / "curve.json")
    ctl = [sys.executable, "-m", "afd", "role", "controller", "--config", str(tmp_path / "two.yaml"),
           "--controller", f"tcp://0.0.0.0:{port}", "--keys", keys] + (["--steps", str(steps)] if steps else [])
    procs = {"controller": subprocess.Popen(ctl, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    for args in ROLES:
        name = args[0] + args[-1]
        head = [sys.executable, "-c", SLOW_ATTACH, str(slow[name]), str(tmp_path / f"{name}.attaching")] \
            if name in (slow or {}) else \
            [sys.executable, "-m", "afd"]
        procs[name] = subprocess.Popen([*head, "role", *args, "--controller",
                                        f"tcp://127.0.0.1:{port}", "--keys", keys], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return procs


def _finish(procs, timeout=60):
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            out[name] = (p.returncode, stdout + (stderr or ""))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return out


def _segments_of(text: str) -> list[str]:
    names = [w for line in text.splitlines() if "memory namespace" in line
             for w in line.replace(";", " ").split() if len(w) == 8 and all(c in "0123456789abcdef" for c in w)]
    return [s for ns in names for s in device.list_segments(ns)]


@pytest.mark.timeout(120)
def test_roles_started_one_by_one_complete_and_match(tmp_path, env):
    out = _finish(_start(tmp_path, env))
    code, text = out["controller"]
    assert code == 0, text
    assert "outputs match reference: yes" in text and "outcome: completed" in text
    assert "host attn: memory namespace" in text and "from ffn0" in text and "from attn0" in text
    assert all(c == 0 for c, _ in out.values()), {k: v for k, v in out.items() if v[0]}
    assert _segments_of(text) == []  # the agents unlinked their hosts' memory
    health = Path(env["AFD_HEALTH_DIR"])
    assert {"controller", "agent-attn", "agent-ffn", "sched0", "ffn1"} <= {p.name for p in health.iterdir()}
    assert (health / "sched0").read_text() == "completed"


@pytest.mark.timeout(120)
def test_the_run_starts_only_once_every_role_is_ready(tmp_path, env):
    """sched0 attaches its memory 3 s after the welcome, long after the others are ready: the run waits for it
    (a role subscribes only once ready) instead of starting and finding it silent past the 1 s hang bound."""
    out = _finish(_start(tmp_path, env, slow={"sched0": 3.0}))
    code, text = out["controller"]
    assert code == 0 and "outcome: completed" in text and "outputs match reference: yes" in text, text
    assert all(c == 0 for c, _ in out.values()), {k: v for k, v in out.items() if v[0]}


@pytest.mark.timeout(120)
def test_a_stop_while_joining_reaches_a_role_not_yet_ready(tmp_path, env, monkeypatch, capsys):
    """`afd stop` while sched0 is still attaching (welcomed, not yet subscribed, so deaf to the broadcast): the
    controller tells each registered role directly, and every process ends stopped at once, not after sched0's
    start timeout (60 s)."""
    procs = _start(tmp_path, env, steps=100000, slow={"sched0": 1.2})
    try:
        end = time.monotonic() + 60
        while not (tmp_path / "sched0.attaching").exists() and time.monotonic() < end:
            time.sleep(0.02)
        monkeypatch.setenv("AFD_RUN_DIR", env["AFD_RUN_DIR"])
        t0 = time.monotonic()
        assert main(["stop", "--wait", "0"]) == 0  # (in this process: within sched0's 1.2 s attach)
        assert "(phase joining)" in capsys.readouterr().out
    finally:
        out = _finish(procs, timeout=30)
    assert time.monotonic() - t0 < 15, "the processes took their start timeout to end"
    code, text = out["controller"]
    assert code == 0 and "outcome: stopped" in text, text
    assert all(c == 0 for c, _ in out.values()), {k: v for k, v in out.items() if v[0]}
    assert "stopped" in out["sched0"][1]


def _wait_running(env, within: float = 60.0) -> None:
    """Until combine0's health file says running (the run has started), at most `within` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        probe = subprocess.run([sys.executable, "-m", "afd.health", "combine0", "--phase", "running"], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    assert probe.returncode == 0, probe.stdout


@pytest.mark.timeout(120)
def test_afd_stop_ends_a_run_of_separately_started_roles(tmp_path, env):
    procs = _start(tmp_path, env, steps=100000)
    try:
        health = Path(env["AFD_HEALTH_DIR"])
        _wait_running(env)
        time.sleep(0.5)
        stop = subprocess.run([sys.executable, "-m", "afd", "stop"], env=env, capture_output=True, text=True,
                              timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert "stop acknowledged" in stop.stdout
    finally:
        out = _finish(procs, timeout=30)
    code, text = out["controller"]
    assert code == 0 and "outcome: stopped" in text and "outputs match reference: yes" in text, text
    assert all(c == 0 for c, _ in out.values()), {k: v for k, v in out.items() if v[0]}
    assert (health / "ffn0").read_text() in ("completed", "stopped")


@pytest.mark.timeout(120)
def test_a_controller_silent_after_its_stop_is_an_orderly_end_not_a_lost_controller(tmp_path, env, monkeypatch,
                                                                                        capsys):
    """The controller frozen for 2.5 s at once after it broadcast the stop (as a starved controller on a loaded
    machine is), past the 1 s silence bound of roles started alone: every role and agent still ends stopped,
    exit 0, and none says the controller was lost."""
    procs = _start(tmp_path, env, steps=100000)
    ctl = procs["controller"]
    try:
        _wait_running(env)
        monkeypatch.setenv("AFD_RUN_DIR", env["AFD_RUN_DIR"])
        assert main(["stop", "--wait", "0"]) == 0  # (in this process: the freeze follows the ack within ms)
        os.kill(ctl.pid, signal.SIGSTOP)
        assert "stop acknowledged" in capsys.readouterr().out
        time.sleep(2.5)
    finally:
        os.kill(ctl.pid, signal.SIGCONT)
        out = _finish(procs, timeout=30)
    assert all(c == 0 for c, _ in out.values()), {k: v for k, v in out.items() if v[0]}
    assert not [k for k, (_, text) in out.items() if "controller silent" in text or "ControllerLost" in text]
    assert "outcome: stopped" in out["controller"][1], out["controller"][1]


@pytest.mark.parametrize("argv,words", [
    (["role", "attn", "--controller", "tcp://127.0.0.1:5555", "--keys", "k.json"], ["--rank"]),
    (["role", "sched", "--rank", "0", "--controller", "tcp://127.0.0.1:5555"], ["--keys", "CURVE"]),
    (["role", "agent", "--controller", "tcp://127.0.0.1:5555"], ["--host"]),
    (["role", "controller", "--controller", "tcp://0.0.0.0:0", "--keys", "KEYS"], ["fixed port"]),
])
def test_role_usage_errors(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("KEYS", str(tmp_path / "k.json")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
