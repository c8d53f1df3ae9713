"""Real pipeline runs (these start processes): every shipped config completes and matches the reference, every role
is its own process, `afd stop` ends a run within 2 s, and nothing of a run is left behind afterwards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from afd import config as config_mod
from afd import control, device
from afd.cli.stop import request_stop
from afd.launcher.pipeline import Pipeline
from afd.runtime.memory import STATUS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    """Runs of these tests live in their own runs root, so live_runs() sees only them (not other users' runs)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("AFD_RUN_DIR", str(root))
    return root


@pytest.fixture(autouse=True)
def no_leftover_segments(recorded_namespaces):
    """No segment of this test's runs is left (see tests/conftest.py)."""
    return recorded_namespaces


def pid_running(pid: int) -> bool:
    """True while /proc shows the pid as a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_nothing_left(namespace: str, pids, run_dir: Path) -> None:
    alive = [pid for pid in pids if pid_running(pid)]
    assert not alive, f"processes of run {namespace} still alive: {alive}"
    assert device.list_segments(namespace) == [], f"shared-memory segments of run {namespace} left"
    assert not run_dir.exists(), f"run directory {run_dir} (control sockets, run.json) left"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def controller_status(endpoint: str) -> dict:
    """The controller's answer to "status" ({phase, done, total}); {} when it does not answer in 0.5 s."""
    ctx = zmq.Context()
    try:
        sock = control.socket(ctx, zmq.DEALER)
        sock.connect(endpoint)
        sock.send_multipart(control.encode("status"))
        if sock.poll(500, zmq.POLLIN):
            kind, payload = control.decode(sock.recv_multipart())
            if kind == "status_reply":
                return payload
        return {}
    finally:
        ctx.destroy(linger=0)


# -- every shipped config, as shipped --------------------------------------------------------------------

def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"minimal", "deepseek", "async", "masked", "fused", "multi", "ascend950"} <= names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_to_completion_in_separate_processes(path):
    cfg = config_mod.load(path)
    with Pipeline(cfg) as p:
        namespace, run_dir = p.device.namespace, p.run_dir
        assert run_dir.is_dir() and (run_dir / "run.json").is_file()
        roles = p.roles
        assert set(roles) == set(cfg.role_ids())
        pids = [r["pid"] for r in roles.values()]
        assert len(set(pids)) == len(pids), f"roles share a process: {roles}"
        assert os.getpid() not in pids
        result = p.wait(60)
    assert result.outcome == "completed", (result.reason, result.failure)
    assert result.exit_code == 0
    assert result.outputs_match_reference is True
    assert result.steps == cfg.steps
    assert result.compared == cfg.steps * cfg.sessions * cfg.micro_batch_num
    assert all(r["exit_code"] == 0 for r in result.roles.values()), result.roles
    assert_nothing_left(namespace, pids, run_dir)


@pytest.mark.timeout(120)
def test_scheduler_reads_flags_written_by_another_process():
    """sched0 and ffn0 are different processes (each writes its own pid into the shared status table), and the
    scheduler measured the hop from ffn0's F2A flag stores to its own poll seeing them."""
    with Pipeline(ROOT / "configs" / "minimal.yaml") as p:
        namespace, run_dir = p.device.namespace, p.run_dir
        roles = p.roles
        sched, ffn = roles["sched0"]["pid"], roles["ffn0"]["pid"]
        assert sched != ffn
        status = p.mem.status()
        idx = p.mem.role_index
        # each role writes os.getpid() into its status row once it runs: the processes are who Pipeline says
        wait_until(lambda: all(status[idx[r]][STATUS["pid"]] != 0 for r in ("sched0", "ffn0")), 30,
                   "sched0 and ffn0 to write their status rows")
        assert int(status[idx["sched0"]][STATUS["pid"]]) == sched
        assert int(status[idx["ffn0"]][STATUS["pid"]]) == ffn
        result = p.wait(60)
    assert result.outcome == "completed" and result.exit_code == 0
    assert result.outputs_match_reference is True
    hop = result.hops_us.get("flag_hop_ns")
    cfg = result.config
    assert hop and hop["n"] >= cfg.steps * cfg.layers * cfg.micro_batch_num, result.hops_us
    assert result.hops_us.get("ffn_ns"), result.hops_us
    assert_nothing_left(namespace, [r["pid"] for r in roles.values()], run_dir)


@pytest.mark.timeout(120)
def test_overrides_and_a_short_run():
    """--set style overrides reach the processes (steps, micro-batches, tcp control plane)."""
    with Pipeline(ROOT / "configs" / "multi.yaml", ["steps=1", "micro_batch_num=2", "control.transport=tcp"]) as p:
        assert p.endpoint.startswith("tcp://127.0.0.1:")
        namespace, run_dir, pids = p.device.namespace, p.run_dir, [r["pid"] for r in p.roles.values()]
        result = p.wait(60)
    assert result.outcome == "completed" and result.exit_code == 0 and result.outputs_match_reference is True
    assert result.steps == 1 and result.compared == 1 * 2 * 2
    assert_nothing_left(namespace, pids, run_dir)


# -- afd stop during a run -------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_afd_stop_ends_a_running_pipeline(tmp_path, own_runs_root, no_leftover_segments):
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.Popen([sys.executable, "-m", "afd", "run", str(ROOT / "configs" / "minimal.yaml"),
                            "--steps", "100000", "--report", str(report), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        info = wait_until(lambda: control.live_runs(), 30, "the run to appear in live_runs()")
        assert len(info) == 1
        info = info[0]
        no_leftover_segments.append(info["namespace"])
        assert info["pid"] == run.pid and info["name"] == "minimal"
        run_dir = own_runs_root / info["namespace"]
        pids = list(info["roles"].values())
        wait_until(lambda: controller_status(info["endpoint"]).get("phase") == "running", 30, "the run to start")

        # a stop without the run's token is refused: no ack, the run goes on
        assert request_stop(info["endpoint"], None, timeout_s=0.3) is None
        # stop in the middle: once the first step is done (done counts micro-batch layers of combine)
        wait_until(lambda: controller_status(info["endpoint"]).get("done", 0) >= 2 * 2, 30, "the first step")
        assert controller_status(info["endpoint"]).get("phase") == "running"

        stop = subprocess.run([sys.executable, "-m", "afd", "stop", "--wait", "0"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=30)
        acked = time.monotonic()
        assert stop.returncode == 0, stop.stderr
        assert "acknowledged" in stop.stdout and str(run.pid) in stop.stdout
        wait_until(lambda: not any(pid_running(p) for p in pids), 2.0, "every role process to exit")
        roles_exited_s = time.monotonic() - acked
        out, err = run.communicate(timeout=30)
        launcher_exited_s = time.monotonic() - acked
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert roles_exited_s < 2.0, f"role processes exited {roles_exited_s:.2f}s after the acknowledged stop"
    # after its roles are gone the launcher still checks the steps done against the in-process reference
    # model (about 20 ms a step on 2 cores) and writes the report: a looser bound for it
    assert launcher_exited_s < 10.0, f"the launcher exited {launcher_exited_s:.2f}s after the acknowledged stop"
    assert run.returncode == 0, err
    rep = json.loads(report.read_text())
    assert rep["outcome"] == "stopped", rep["reason"]
    assert rep["exit_code"] == 0
    assert 0 < rep["counts"]["steps"] < 100000
    assert rep["outputs_match_reference"] is True
    assert all(r["exit_code"] == 0 for r in rep["roles"].values()), rep["roles"]
    assert "stopped" in out
    assert_nothing_left(info["namespace"], pids + [run.pid], run_dir)
    assert control.live_runs() == []


@pytest.mark.timeout(120)
def test_afd_stop_over_tcp_with_curve_keys(capsys, tmp_path):
    """A TCP control plane admits only the run's CURVE client key: `afd stop --endpoint` reads it from the run dir."""
    with Pipeline(ROOT / "configs" / "minimal.yaml", ["steps=100000", "control.transport=tcp"]) as p:
        namespace, run_dir, pids = p.device.namespace, p.run_dir, [r["pid"] for r in p.roles.values()]
        assert p.endpoint.startswith("tcp://")
        wait_until(lambda: p.step_count >= 1, 30, "the first step")
        from afd.cli import main
        code = main(["stop", "--endpoint", p.endpoint, "--wait", "0"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "acknowledged" in out
        t0 = time.monotonic()
        result = p.wait(30)
        assert time.monotonic() - t0 < 2.0
    assert result.outcome == "stopped" and result.exit_code == 0, result.reason
    assert "afd stop" in result.reason
    assert result.outputs_match_reference is True and 0 < result.steps < 100000
    assert_nothing_left(namespace, pids, run_dir)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.timeout(120)
def test_roles_are_forked_from_one_server_that_loaded_the_kernels():
    """Every role of a run is a child of the same fork server, a child of the launcher, which imported the roles and
    loaded numba's compiled kernels (llvmlite is mapped in it) before forking any of them."""
    with Pipeline(ROOT / "configs" / "minimal.yaml") as p:
        pids = [r["pid"] for r in p.roles.values()]
        parents = {_parent_of(pid) for pid in pids}
        assert len(parents) == 1, parents
        server = parents.pop()
        assert server != os.getpid() and _parent_of(server) == os.getpid()
        with open(f"/proc/{server}/cmdline", "rb") as f:
            assert b"afd.launcher.preload" in f.read()
        with open(f"/proc/{server}/maps") as f:
            assert "llvmlite" in f.read()
        result = p.wait(60)
    assert result.outcome == "completed" and result.outputs_match_reference is True


@pytest.mark.timeout(120)
def test_the_fork_server_loads_cached_kernels_and_never_compiles(tmp_path):
    """With an empty numba cache the server's preload loads no kernel and compiles none (the roles compile their own,
    in parallel): the cache directory stays empty."""
    cache = tmp_path / "numba-cache"
    code = ("import afd.launcher.preload as p, afd.ops._kernels as k; "
            "print(p._load_cached_kernels(), len(k.warm_ups()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110,
                         env=dict(os.environ, NUMBA_CACHE_DIR=str(cache)))
    assert out.returncode == 0, out.stderr
    loaded, total = map(int, out.stdout.split())
    assert (loaded, total) == (0, 10)
    assert not cache.exists() or not any(cache.rglob("*.nbi"))


@pytest.mark.timeout(120)
def test_a_forked_role_sees_the_launchers_environment_of_its_run(tmp_path, monkeypatch):
    """The fork server keeps the environment it started with; a role takes the launcher's as it is at the run's start
    (here AFD_HEALTH_DIR, set after the server is up: every role writes its heartbeat file there)."""
    from afd.launcher.forkserver import role_context
    role_context()  # the server is up (started by this test or an earlier one) before the variable is set
    health = tmp_path / "health"
    monkeypatch.setenv("AFD_HEALTH_DIR", str(health))
    with Pipeline(ROOT / "configs" / "minimal.yaml") as p:
        roles = set(p.roles)
        result = p.wait(60)
    assert result.outcome == "completed"
    assert roles <= {f.name for f in health.iterdir()}


@pytest.mark.timeout(120)
def test_a_role_process_loads_its_kernels_without_importing_scipy_linalg():
    """numba's BLAS probe imports scipy.linalg (0.35 s per process); a role process skips it and its kernels still
    load and run."""
    pytest.importorskip("scipy")
    code = ("import sys, numpy as np; from afd.runtime.role import _no_numba_blas_probe; _no_numba_blas_probe(); "
            "from afd.ops import _kernels as k; k.warm_up_copy_rows(); d = np.zeros((2, 8), np.uint8); "
            "k.copy_rows(d, np.array([1]), np.full((1, 8), 7, np.uint8), np.array([0]), 8); "
            "print('scipy.linalg' in sys.modules, int(d.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "56"]
