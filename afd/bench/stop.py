"""How fast a stop is over: run_flag = 0 to the launcher's exit with its process group empty, per config; `afd stop`.

Each run is a real `afd run CONFIG` in a session of its own (its process group: the launcher, the fork server, the
roles, the resource tracker, the reaper), stopped once it is running (the controller says so and a micro-batch layer
is done). Stop latency: from the SIGTERM that makes the launcher write run_flag = 0 to the moment the launcher has
exited and its process group holds no process, zombies included; the run's segments must be gone by then and its
report written (a stop that loses them does not count as one: the run is reported `not clean`). `afd stop` end to
end: from starting `afd stop` (its own start included) until it has exited and the pipeline too. Rounds run every
config once, so load that comes and goes weighs on all of them alike.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import procfs

TARGET_STOP_S = 0.5  # issue 20: run_flag = 0 -> the launcher's exit, every process reaped, every segment gone
TARGET_AFD_STOP_S = 1.0  # issue 20: `afd stop` end to end, its own start included
START_TIMEOUT_S = 120.0


def configs() -> list[Path]:
    """The shipped configs (configs/ beside the package)."""
    return sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def group(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group pgid, zombies included."""
    return [(p.pid, p.state) for p in procfs.group(pgid)]


def wait_running(run: dict, timeout_s: float) -> None:
    """Return once the run's controller says it runs and a micro-batch layer is done."""
    import zmq

    from .. import control
    ctx = zmq.Context()
    try:
        sock = control.socket(ctx, zmq.DEALER, identity=f"afd-bench-{os.getpid()}".encode())
        control.curve_client(sock, control.read_curve_keys(control.runs_root() / run["namespace"]))
        sock.connect(run["endpoint"])
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            sock.send_multipart(control.encode("status", {}))
            if sock.poll(200):
                kind, reply = control.decode(sock.recv_multipart())
                if kind == "status_reply" and reply.get("phase") == "running" and reply.get("done", 0) > 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{run.get('name')}: not running after {timeout_s:g} s")
    finally:
        ctx.destroy(linger=0)


def _start(afd: list[str], config: Path, work: str, env: dict) -> tuple[subprocess.Popen, dict, str]:
    """An `afd run` of `config` in a session of its own, running; (process, its run.json, its report path)."""
    from .. import control
    report = os.path.join(work, f"{config.stem}.json")
    proc = subprocess.Popen(afd + ["run", str(config), "--quiet", "--steps", "100000000", "--report", report],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        run = next((r for r in control.live_runs() if r.get("pid") == proc.pid), None)
        if run is not None:
            wait_running(run, end - time.monotonic())
            return proc, run, report
        if proc.poll() is not None:
            raise RuntimeError(f"{config.name}: afd run exited {proc.returncode} before it ran")
        time.sleep(0.02)
    raise TimeoutError(f"{config.name}: no run after {START_TIMEOUT_S:g} s")


def _over(proc: subprocess.Popen, t0: float, timeout_s: float = 30.0) -> float:
    """Seconds from t0 until the launcher has exited (reaped here) and its process group is empty."""
    deadline = t0 + timeout_s
    _exited(proc, timeout_s)
    while group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    return time.monotonic() - t0


def _exited(proc: subprocess.Popen, timeout_s: float) -> None:
    """proc.wait(timeout_s), woken by the exit itself: Popen.wait(timeout) sleeps up to 50 ms between looks, which
    made every figure a multiple of 50 ms."""
    fd = os.pidfd_open(proc.pid)
    try:
        select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    proc.wait(0)  # (reaps it; TimeoutExpired if it is still running)


def _clean(run: dict, report: str) -> bool:
    """Nothing of the run is left (segments, run directory, processes) and its report was written."""
    from .. import control, device
    try:
        written = json.loads(Path(report).read_text())["outcome"] == "stopped"
    except (OSError, ValueError, KeyError):
        written = False
    return (written and not device.list_segments(run["namespace"])
            and not (control.runs_root() / run["namespace"]).exists() and not group(run["pid"]))


def _stop_once(afd: list[str], config: Path, work: str, env: dict, by_afd_stop: bool) -> tuple[float, bool]:
    proc, run, report = _start(afd, config, work, env)
    try:
        t0 = time.monotonic()
        if by_afd_stop:
            subprocess.run(afd + ["stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        else:
            proc.send_signal(signal.SIGTERM)  # the launcher writes run_flag = 0 into every context at once
        seconds = _over(proc, t0)
        return seconds, _clean(run, report)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(quick: bool = False, runs: int | None = None, progress=None) -> dict:
    """Median and max stop latency per config over `runs` rounds, and `afd stop` end to end (minimal config);
    quick: one round of the minimal config only."""
    from .startup import afd_command
    runs = runs or (1 if quick else 10)
    work = tempfile.mkdtemp(prefix="afd-bench-stop-")
    env = dict(os.environ, AFD_RUN_DIR=os.path.join(work, "runs"))  # `afd stop` finds only the run it stops
    before = os.environ.get("AFD_RUN_DIR")
    os.environ["AFD_RUN_DIR"] = env["AFD_RUN_DIR"]  # (and this process looks there for the runs it starts)
    afd = afd_command()
    paths = [p for p in configs() if p.stem == "minimal"] if quick else configs()  # (quick: a smoke test)
    times: dict[str, list[float]] = {p.stem: [] for p in paths}
    unclean: dict[str, int] = {p.stem: 0 for p in paths}
    afd_stop, afd_stop_unclean = [], 0
    try:
        for i in range(runs):
            for path in paths:
                if progress:
                    progress(f"stop latency: {path.stem} ({i + 1}/{runs})")
                seconds, clean = _stop_once(afd, path, work, env, by_afd_stop=False)
                times[path.stem].append(seconds)
                unclean[path.stem] += not clean
            if progress:
                progress(f"afd stop end to end ({i + 1}/{runs})")
            seconds, clean = _stop_once(afd, paths[0].with_name("minimal.yaml"), work, env, by_afd_stop=True)
            afd_stop.append(seconds)
            afd_stop_unclean += not clean
    finally:
        if before is None:
            os.environ.pop("AFD_RUN_DIR", None)
        else:
            os.environ["AFD_RUN_DIR"] = before
        shutil.rmtree(work, ignore_errors=True)
    rows = {name: {"median_s": statistics.median(ts), "max_s": max(ts), "runs": len(ts), "not_clean": unclean[name],
                   "pass": max(ts) <= TARGET_STOP_S and not unclean[name]} for name, ts in times.items()}
    return {"runs": runs, "cpus": os.cpu_count(), "target_s": TARGET_STOP_S, "configs": rows,
            "afd_stop": {"median_s": statistics.median(afd_stop), "max_s": max(afd_stop), "runs": len(afd_stop),
                         "not_clean": afd_stop_unclean, "target_s": TARGET_AFD_STOP_S,
                         "pass": max(afd_stop) <= TARGET_AFD_STOP_S and not afd_stop_unclean}}


if __name__ == "__main__":  # python -m afd.bench.stop [runs]
    print(json.dumps(measure(runs=int(sys.argv[1]) if len(sys.argv) > 1 else None,
                             progress=lambda what: print(what, file=sys.stderr)), indent=1))
