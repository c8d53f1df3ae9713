"""The afd pytest plugin (entry point pytest11): pipeline fixtures and a per-test leak check."""
from __future__ import annotations

import os

import pytest

from . import device
from .config import Config, load


def pytest_addoption(parser):
    group = parser.getgroup("afd")
    group.addoption("--afd-timeout", type=float, default=120.0,
                    help="seconds a pipeline started by the afd_pipeline fixture may run before it is stopped")
    group.addoption("--afd-no-leak-check", action="store_true",
                    help="do not fail tests that leave afd processes or shared-memory segments behind")
    group.addoption("--afd-npu", action="store_true",
                    help="install the fake NPU (afd.npu) before test modules import torch_npu")


def pytest_configure(config):
    config.addinivalue_line("markers", "afd_timeout(seconds): bound for pipelines of this test (afd_pipeline)")
    config.addinivalue_line("markers", "afd_allow_leaks: skip the afd leak check for this test")
    if config.getoption("--afd-npu", default=False):
        from . import npu
        npu.install()


def _live_children() -> dict[int, str]:
    """Child processes of this process that are still running (zombies already exited), and those of its fork
    server (the roles of a run are forked by it, afd.launcher.forkserver.role_context)."""
    me = os.getpid()
    parents = {}  # pid -> (ppid, state, comm) of every process
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            parents[int(entry)] = (int(fields[1]), fields[0], stat[stat.index("(") + 1:stat.rindex(")")])

    def cmdline(pid: int) -> str:  # read only for the candidates (a process stuck in D state can block the read)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""
    mine = {pid: cmdline(pid) for pid, (ppid, state, _) in parents.items() if ppid == me and state != "Z"}
    # multiprocess's one-per-parent helpers, which end with this process: not leaks themselves
    helpers = {pid for pid, line in mine.items() if "resource_tracker" in line or "forkserver" in line}
    out = {pid: line[:120] or parents[pid][2] for pid, line in mine.items() if pid not in helpers}
    for pid, (ppid, state, comm) in parents.items():
        if ppid in helpers and state != "Z":
            out[pid] = cmdline(pid)[:120] or comm
    return out


@pytest.fixture(autouse=True)
def _afd_leak_check(request):
    """Fail a test that leaves afd segments (in namespaces this process allocated in) or child processes alive."""
    if request.config.getoption("--afd-no-leak-check") or request.node.get_closest_marker("afd_allow_leaks"):
        yield
        return
    namespaces_before = set(device.created_namespaces)
    children_before = set(_live_children())
    yield
    new = set(device.created_namespaces) - namespaces_before
    segments = sorted(name for ns in new for name in device.list_segments(ns))
    children = {pid: name for pid, name in _live_children().items() if pid not in children_before}
    if segments:
        for ns in new:
            device.sweep(ns)  # clean up, so one leak does not fail every later test
    if segments or children:
        what = ([f"shared-memory segments {segments}"] if segments else []) + (
            [f"processes {children}"] if children else [])
        pytest.fail("test left behind " + " and ".join(what), pytrace=False)


@pytest.fixture
def afd_config() -> Config:
    """The built-in default configuration (what `afd run` runs with no arguments)."""
    return load(None)


@pytest.fixture
def afd_pipeline(request):
    """A factory: `afd_pipeline(config=None, faults=(), **overrides)` returns a started Pipeline, always torn down."""
    from .launcher.pipeline import Pipeline

    marker = request.node.get_closest_marker("afd_timeout")
    timeout = marker.args[0] if marker else request.config.getoption("--afd-timeout")
    started: list[Pipeline] = []

    def make(config=None, faults=(), **overrides) -> Pipeline:
        values = dict(overrides)
        values.setdefault("run_timeout_s", timeout)
        pipeline = Pipeline(config, faults=list(faults), **values)
        started.append(pipeline)
        return pipeline.start()

    yield make
    for pipeline in started:
        pipeline.close()


@pytest.fixture
def afd_torchrun(tmp_path):
    """A factory: `afd_torchrun(script, *args, nproc=2, nnodes=1, env=None, timeout=180)` runs the script under
    `afd npu -- torchrun` (one torchrun per node; nodes are separate shared-memory namespaces) and returns a
    TorchrunResult: `returncode`, `ranks` {rank: RankResult(exit_code, output)}, `output`, and `failure()`, the
    message to assert with (`assert result.returncode == 0, result.failure()`): each failing rank's own first error,
    torchrun's root cause first, then the output's tail. Every process it started is gone afterwards (killed if need
    be, which fails the test)."""
    from .npu import registry
    from .npu.launch import TorchrunJob

    jobs: list = []
    listed_before = {j["pid"] for j in registry.jobs()}

    def run(script, *args, nproc: int = 2, nnodes: int = 1, env: dict | None = None, timeout: float = 180.0):
        job = TorchrunJob(str(script), [str(a) for a in args], nproc=nproc, nnodes=nnodes, env=env,
                          work_dir=tmp_path / f"job{len(jobs)}")
        jobs.append(job)
        return job.run(timeout)

    yield run
    leftovers = [p for job in jobs for p in job.cleanup()]
    # a SIGKILLed rank's `afd stop` listing is swept here (a SIGTERMed or exiting one removes its own)
    listed = [j["pid"] for j in registry.jobs() if j["pid"] not in listed_before]
    if leftovers or listed:
        pytest.fail(f"torchrun job left behind: processes {leftovers}, afd stop listings of pids {listed}",
                    pytrace=False)
