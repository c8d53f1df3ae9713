"""SIGTERM and SIGHUP (what timeout, docker stop, systemd and a cancelled CI job send) stop `afd run` as Ctrl-C
does: run_flag = 0, outcome `stopped` naming the signal, the report written, exit 0 (a stop that was asked for,
as `afd stop`), every process, segment and run directory gone; a second signal does not cut the clean-up."""
import json
import signal
import subprocess
import sys
import time

import pytest

from afd import control, device


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("AFD_RUN_DIR", str(root))
    return root


def _start(tmp_path, *argv, prefix=()):
    report = tmp_path / "report.json"
    cmd = [*prefix, sys.executable, "-m", "afd", "run", "--quiet", "--steps", "100000", "--report", str(report),
           *argv]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), report


def _await_run(proc, registered: bool, timeout=30.0) -> dict:
    """The run's run.json once it is there (roles may still be joining), or once it has done a step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in control.live_runs() if r["pid"] == proc.pid]
        if runs:
            if not registered:
                return runs[0]
            time.sleep(1.5)  # well under way
            return runs[0]
        time.sleep(0.02)
    raise AssertionError("the run never published its run.json")


def _nothing_left(run: dict, runs_root) -> None:
    assert device.list_segments(run["namespace"]) == []
    assert not (runs_root / run["namespace"]).exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGHUP: in the start-up test below
def test_a_signal_mid_run_stops_writes_the_report_and_leaves_nothing(sig, tmp_path, runs_root):
    proc, report = _start(tmp_path)
    run = _await_run(proc, registered=True)
    proc.send_signal(sig)
    assert proc.wait(30) == 0, proc.stderr.read()
    r = json.loads(report.read_text())
    assert (r["outcome"], r["reason"]) == ("stopped", f"signal {sig.name}")
    assert all(v["exit_code"] == 0 for v in r["roles"].values())
    _nothing_left(run, runs_root)


@pytest.mark.timeout(90)
def test_a_signal_during_start_up_and_a_second_one_during_the_clean_up(tmp_path, runs_root):
    proc, report = _start(tmp_path)
    run = _await_run(proc, registered=False)  # run.json is written while the roles still join
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the clean-up goes on
    assert proc.wait(30) == 0, proc.stderr.read()
    r = json.loads(report.read_text())
    assert (r["outcome"], r["reason"]) == ("stopped", "signal SIGHUP")
    _nothing_left(run, runs_root)


@pytest.mark.timeout(90)
def test_timeout_signals_the_whole_process_group_and_nothing_is_left(tmp_path, runs_root):
    proc, report = _start(tmp_path, prefix=("timeout", "-s", "TERM", "3"))
    assert proc.wait(60) == 124  # timeout's own code for "the time ran out"
    r = json.loads(report.read_text())
    assert (r["outcome"], r["reason"]) == ("stopped", "signal SIGTERM")
    assert all(v["exit_code"] == 0 for v in r["roles"].values())  # roles got it too and kept going until the stop
    assert not list(runs_root.glob("*/run.json"))
    assert device.list_segments(r.get("namespace")) == [] if r.get("namespace") else True


@pytest.mark.timeout(120)
def test_a_campaign_stopped_by_sigterm_prints_its_partial_table(tmp_path, runs_root):
    proc = subprocess.Popen([sys.executable, "-m", "afd", "faults", "campaign", "--runs", "50", "--seed", "5",
                             "--set", "steps=3", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + 60, set()
    while time.monotonic() < deadline and len(seen) < 2:  # a second run started: the first one is done
        seen.update(path.parent.name for path in runs_root.glob("*/run.json"))
        time.sleep(0.05)
    time.sleep(0.5)  # and the second one in flight
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 1), err
    report = json.loads(out)
    assert report["interrupted"] == "SIGTERM"
    assert 0 < len(report["runs"]) < 50 and sum(r["runs"] for r in report["rows"]) == len(report["runs"])
    assert not list(runs_root.glob("*/run.json"))  # the run in flight was cleaned up too
    assert all(r["leftover_processes"] == 0 and r["leftover_segments"] == 0 for r in report["runs"])
