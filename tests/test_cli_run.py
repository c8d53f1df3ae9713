"""`afd run` with no arguments end to end, and `afd stop`'s answers when there is nothing (or too much) to stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afd import cli
from afd.cli import stop as stop_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    """A runs root of its own, so other pipelines on this machine are invisible to `afd stop` here."""
    root = tmp_path / "runs"
    monkeypatch.setenv("AFD_RUN_DIR", str(root))
    return root


def _cli(capsys, *argv: str):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _fake_run(root: Path, namespace: str, name: str, pid: int) -> dict:
    """A run directory as a launcher writes it (nothing listens on its endpoint)."""
    run_dir = root / namespace
    run_dir.mkdir(parents=True)
    info = {"pid": pid, "endpoint": f"ipc://{run_dir}/ctl.sock", "namespace": namespace, "name": name,
            "token": "00" * 16, "roles": {}}
    (run_dir / "run.json").write_text(json.dumps(info))
    return info


# -- afd run ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_default_run_finishes_and_matches_the_reference(own_runs_root):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "afd", "run"], capture_output=True, text=True, timeout=90, env=env,
                          cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60, f"the default run took {elapsed:.1f}s"
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "afd run: default" in out
    assert "completed" in out
    assert "outputs match reference" in out
    line = next(ln for ln in out.splitlines() if "outputs match reference" in ln)
    assert "yes" in line, line
    assert "all exit 0" in out
    # latency and hop rows name their unit once, in the row's name: microseconds (the samples are taken in ns)
    rows = [ln for ln in out.splitlines() if "latency " in ln or "hop " in ln]
    assert any("latency ffn (us)" in ln for ln in rows) and any("hop a2f (us)" in ln for ln in rows), out
    assert all("_ns" not in ln and " us " not in ln.split("(us)", 1)[1] for ln in rows), rows
    assert not own_runs_root.exists() or not any(own_runs_root.iterdir()), "the run directory was left"


# -- afd stop without a pipeline to stop ---------------------------------------------------------------------

def test_stop_with_nothing_running(capsys, own_runs_root):
    code, out, err = _cli(capsys, "stop")
    assert code == 1
    assert err.strip() == "afd stop: no afd pipeline and no torch job on the fake NPU is running on this machine"


def test_stop_ignores_stale_run_directories(capsys, own_runs_root):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_run(own_runs_root, "deadbeef", "gone", dead.pid)
    code, _, err = _cli(capsys, "stop")
    assert code == 1 and "no afd pipeline and no torch job" in err


def test_stop_with_two_pipelines_lists_them(capsys, own_runs_root):
    a = _fake_run(own_runs_root, "aaaa0001", "first", os.getpid())
    b = _fake_run(own_runs_root, "bbbb0002", "second", os.getppid())
    code, out, err = _cli(capsys, "stop")
    assert code == 2
    assert "2 afd pipelines are running" in err and "--endpoint" in err
    for info in (a, b):
        line = next(ln for ln in err.splitlines() if info["name"] in ln)
        assert str(info["pid"]) in line and info["endpoint"] in line


def test_stop_endpoint_without_a_local_run_is_sent_without_token(capsys, monkeypatch, own_runs_root, tmp_path):
    monkeypatch.setattr(stop_mod, "ACK_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    code, _, err = _cli(capsys, "stop", "--endpoint", f"ipc://{tmp_path}/nobody.sock")
    assert time.monotonic() - t0 < 3
    assert code == 1
    assert "sending the stop without the run's token" in err
    assert "refuses a stop without the run's token" in err


def test_stop_endpoint_of_a_run_that_does_not_answer(capsys, monkeypatch, own_runs_root):
    monkeypatch.setattr(stop_mod, "ACK_TIMEOUT_S", 0.3)
    info = _fake_run(own_runs_root, "cccc0003", "silent", os.getpid())
    _fake_run(own_runs_root, "dddd0004", "other", os.getppid())
    code, _, err = _cli(capsys, "stop", "--endpoint", info["endpoint"])
    assert code == 1
    assert "without the run's token" not in err  # the token came from the matching run.json
    assert f"no acknowledgement from {info['endpoint']} within 0.3 s" in err
