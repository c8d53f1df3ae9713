"""The launcher: a Pipeline owns one run's memory and processes, supervises them, and always cleans up."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path

import multiprocess
import zmq

from .. import config as config_mod
from .. import control, preflight
from .. import faults as faults_mod
from ..config import Config
from ..device import Device, new_namespace, sweep
from ..errors import AfdError
from ..runtime.memory import STATUS, RunMemory
from .entry import controller_entry, role_entry
from .forkserver import launcher_state, role_context
from .reaper import Reaper
from .reference import Checker
from .result import Result, build_result
from .signals import STOP_SIGNALS, Signalled, blocked_stop_signals


class Pipeline:
    """One pipeline run: `with Pipeline(cfg) as p: result = p.wait()`; exit always stops and removes everything."""

    def __init__(self, config: str | os.PathLike | dict | Config | None = None, overrides: list[str] | None = None,
                 faults: list | None = None, **values):
        self.cfg = config if isinstance(config, Config) and not overrides and not values else \
            config_mod.load(config, overrides, **values)
        role_ids = self.cfg.role_ids()
        # Faults from the config and from the caller, checked before anything starts.
        self.faults = faults_mod.parse_all(self.cfg.faults, role_ids) + [
            f if isinstance(f, faults_mod.Fault) else faults_mod.parse(f, role_ids) for f in (faults or [])]
        preflight.check(self.cfg)  # a run that cannot fit this machine is refused here, not found out mid-run
        self.processes: dict[str, multiprocess.Process] = {}
        self.pids: dict[str, int] = {}  # kept after close, to check that every process is gone
        self.mem: RunMemory | None = None
        self.device: Device | None = None
        self.namespaces: dict[str, str] = {}  # multi-host: host -> the namespace its agent allocates in
        self.run_dir: Path | None = None
        self.zctx: zmq.Context | None = None
        self.result: Result | None = None
        self.progress = (0, 1)
        self.on_progress = None
        self._controller_result: dict | None = None
        self._died: dict[str, int] = {}
        self._started = None
        self._signalled: int | None = None  # a SIGTERM / SIGHUP that came in; the wait turns it into a stop
        self._waiting = False
        self._old_handlers: dict = {}
        self._reaper: Reaper | None = None
        self._checker: Checker | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def signalled(self) -> str | None:
        """The name of the SIGTERM / SIGHUP that stopped this run, if one did."""
        return None if self._signalled is None else signal.Signals(self._signalled).name

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP (what timeout, docker stop, systemd and a cancelled CI job send) stop the run as
        Ctrl-C does: the report is written and everything is removed. Only the main thread can take signals."""
        if threading.current_thread() is not threading.main_thread() or self._old_handlers:
            return

        def handler(signum, frame):
            if self._signalled is None:
                self._signalled = signum
                if self._waiting:
                    raise Signalled(signum)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        if self._signalled is not None:  # asked to end: the caller still writes the report; later signals stay ignored
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def start(self) -> "Pipeline":
        self._catch_signals()
        if self.cfg.multi_host:
            return self._start_hosts()
        cfg = self.cfg
        namespace = new_namespace()
        self.device = Device(namespace)
        try:
            self.mem = RunMemory.create(cfg, self.device)
            self.run_dir = control.make_run_dir(namespace)
            self._reaper = Reaper(namespace, str(self.run_dir))
            endpoint, pub = self._endpoints()
            self.endpoint = endpoint
            if cfg.control.transport == "tcp":  # TCP is reachable by others: encrypt and authenticate
                self.mem.plan["curve"] = control.make_curve_keys(self.run_dir)
            self.mem.plan["token"] = os.urandom(16).hex()
            self.mem.plan["faults"] = [f.to_dict() for f in self.faults]
            plan = self.mem.plan
            me = os.getpid()
            self._spawn_all(plan, pub, lambda role, cfg_json: (role, cfg_json, plan, endpoint, me, str(self.run_dir)))
            self._publish(plan, namespace)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn_all(self, plan: dict, pub: str, role_args, first: list[str] = ()) -> None:
        """Start the controller, then `first` (agents), then every role; role_args(role, cfg_json) -> its args."""
        cfg_json = self.cfg.model_dump_json()
        ctx = role_context()
        launcher = launcher_state()
        roles = ["controller"] + list(first) + [r for r in self.cfg.role_ids() if r != "controller"]
        for role in roles:
            if role == "controller":
                target, args = controller_entry, (launcher, cfg_json, plan, self.endpoint, pub, os.getpid())
            else:
                target, args = role_entry, (launcher, *role_args(role, cfg_json))
            proc = ctx.Process(target=target, args=args, name=role, daemon=False)
            with blocked_stop_signals():
                proc.start()
            self.processes[role] = proc
        self.pids = {r: p.pid for r, p in self.processes.items()}
        if self.cfg.check_reference:
            self._checker = Checker(ctx, launcher)

    def _publish(self, plan: dict, namespace: str, **extra) -> None:
        """Join the controller as `launcher` and write run.json (0600) so `afd stop` can find this run."""
        self.zctx = zmq.Context()
        self.dealer = control.socket(self.zctx, zmq.DEALER, identity=b"launcher")
        control.curve_client(self.dealer, plan.get("curve"))
        self.dealer.connect(self.endpoint)
        control.write_run_info(self.run_dir, {"pid": os.getpid(), "endpoint": self.endpoint, "namespace": namespace,
                                              "name": self.cfg.name, "token": plan["token"], **extra,
                                              "roles": dict(self.pids)})
        os.chmod(self.run_dir / "run.json", 0o600)
        self._started = time.monotonic()

    def _endpoints(self) -> tuple[str, str]:
        cfg = self.cfg
        if cfg.control.transport == "ipc":
            return f"ipc://{self.run_dir}/ctl.sock", f"ipc://{self.run_dir}/pub.sock"
        port = cfg.control.port
        if not port:  # pick free ports here so roles know where to connect
            return tuple(f"tcp://{cfg.control.host}:{p}" for p in _free_ports(cfg.control.host, 2))
        return f"tcp://{cfg.control.host}:{port}", f"tcp://{cfg.control.host}:{port + 1}"

    def _start_hosts(self) -> "Pipeline":
        """Multi-host on this machine: one shared-memory namespace per host, owned by that host's agent; roles
        attach only their host's namespace and reach other hosts' windows through the agents (TCP)."""
        cfg = self.cfg
        run_id = new_namespace()
        try:
            self.namespaces = {h: new_namespace() for h in cfg.host_map()}
            self.run_dir = control.make_run_dir(run_id)
            self.endpoint, pub = self._endpoints()
            keys = control.make_curve_keys(self.run_dir) if cfg.control.transport == "tcp" else None
            plan = {"run": run_id, "roles": cfg.role_ids(), "agents": cfg.agent_ids(), "token": os.urandom(16).hex(),
                    "faults": [f.to_dict() for f in self.faults], "curve": keys}
            me = os.getpid()

            def role_args(role: str, cfg_json: str) -> tuple:
                args = (role, cfg_json, None, self.endpoint, me, str(self.run_dir), keys)
                return args + (self.namespaces[cfg.host_of(role)],) if role in cfg.agent_ids() else args
            self._spawn_all(plan, pub, role_args, first=cfg.agent_ids())
            self._publish(plan, run_id, hosts=self.namespaces)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "Pipeline":
        if self._started is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control ---------------------------------------------------------------------------------------
    def stop(self, reason: str = "stop requested") -> None:
        """run_flag = 0 in every context (the truth), then ask the controller to broadcast the wake-up."""
        if self.mem is not None:
            self.mem.stop_all()
        if self.zctx is not None:  # across hosts the broadcast is how each host's run_flag becomes 0
            self._tell("stop", {"reason": reason})

    def _tell(self, kind: str, payload: dict) -> bool:
        """Send to the controller without ever blocking: a controller that is gone, not yet up or not reading
        (its queue full) must not hang the launcher; run_flag in shared memory stays the truth."""
        try:
            self.dealer.send_multipart(control.encode(kind, payload), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def inject(self, fault) -> faults_mod.Fault:
        """Inject a fault into the running pipeline (a spec string like `kill:ffn0@step=2` or a Fault)."""
        if not isinstance(fault, faults_mod.Fault):
            fault = faults_mod.parse(fault, self.cfg.role_ids())
        self.faults.append(fault)
        if not self._tell("inject", {"fault": fault.to_dict()}):
            raise AfdError("fault", f"inject {fault.spec}: the controller is not taking messages")
        return fault

    @property
    def roles(self) -> dict[str, dict]:
        return {r: {"pid": p.pid, "alive": p.is_alive()} for r, p in self.processes.items()}

    @property
    def step_count(self) -> int:
        """Steps every micro-batch of every session has completed so far."""
        if self.mem is None:
            return 0
        return self.mem.steps_done()

    def wait(self, timeout: float | None = None) -> Result:
        """Supervise until the controller reports the end (or a process dies), then clean up; returns the Result."""
        if self.result is not None:
            return self.result
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        self._waiting = True
        try:
            if self._signalled is not None:  # it came during the start-up
                raise Signalled(self._signalled)
            while self._controller_result is None:
                if deadline is not None and time.monotonic() > deadline:
                    self.stop(f"wait timeout {timeout}s")
                    deadline = None
                    self._await_result(3.0, poller)
                    break
                if dict(poller.poll(20)):
                    self._drain(poller)
                self._check_processes()
                if "controller" in self._died and self._controller_result is None:
                    self._late_result(poller)
                    break
        except (KeyboardInterrupt, Signalled) as exc:
            self._waiting = False  # a second signal now does not cut the clean-up short
            self._ignore_while_stopping()
            self.stop("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc))
            self._await_result(3.0, poller)
        finally:
            self._waiting = False
        return self._conclude()

    def _ignore_while_stopping(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                old = signal.signal(sig, signal.SIG_IGN)
                self._old_handlers.setdefault(sig, old)

    def _late_result(self, poller) -> None:
        """A controller that exited 0 sent its result just before: give the message a moment to arrive."""
        if self._died.get("controller") == 0:
            end = time.monotonic() + 1.0
            while self._controller_result is None and time.monotonic() < end:
                if dict(poller.poll(20)):
                    self._drain(poller)
        if self._controller_result is None and getattr(self, "_died_first", None) is None:
            self._died_first = ("controller", self._died["controller"], time.monotonic_ns(),
                                self._in_flight("controller"))

    def _await_result(self, seconds: float, poller) -> None:
        end = time.monotonic() + seconds
        while self._controller_result is None and time.monotonic() < end:
            if dict(poller.poll(20)):
                self._drain(poller)
            self._check_processes()
            if "controller" in self._died:
                return

    def _drain(self, poller) -> None:
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, payload = control.decode(frames)
            except control.MalformedMessage:
                continue
            if kind == "progress":
                self.progress = (payload["done"], payload["total"])
                if self.on_progress:
                    self.on_progress(*self.progress)
            elif kind == "result":
                self._controller_result = payload
                self._tell("ack", {})  # the controller may close now

    def _check_processes(self) -> None:
        """Process sentinels: a role that exits before the run ends is a failure detected at once."""
        sentinels = {p.sentinel: r for r, p in self.processes.items() if r not in self._died}
        for ready in wait_sentinels(list(sentinels), timeout=0):
            role = sentinels[ready]
            proc = self.processes[role]
            proc.join(0.1)
            self._died[role] = proc.exitcode
            if self._controller_result is None and proc.exitcode != 0:
                if self.mem is not None:
                    self.mem.stop_all()
                if role != "controller":
                    self._tell("role_died", {"role": role, "exitcode": proc.exitcode})
                self._died_first = getattr(self, "_died_first", None) or (role, proc.exitcode,
                                                                         time.monotonic_ns(), self._in_flight(role))

    def _in_flight(self, role: str) -> dict:
        if self.mem is None or role not in self.mem.role_index:
            return {}  # multi-host: the controller's snapshot (from heartbeats) says it
        row = self.mem.status()[self.mem.role_index[role]]
        return {k: int(row[STATUS[k]]) for k in ("step", "layer", "micro_batch", "progress")}

    def _conclude(self) -> Result:
        failure = (self._controller_result or {}).get("failure") or {}
        if failure.get("kind") == "hang" and failure.get("role") in self.processes:
            self.processes[failure["role"]].kill()  # hung: it would not leave by itself while this process lives
        self._reap(2.0)
        exit_codes = {r: p.exitcode for r, p in self.processes.items()}
        mem = self.mem
        if mem is None:
            from .reported import ReportedMemory
            mem = ReportedMemory(self.cfg, self._controller_result)
        self.result = build_result(self.cfg, mem, self._controller_result, getattr(self, "_died_first", None),
                                   exit_codes, time.monotonic() - self._started, self.faults,
                                   reference=self._checker)  # (None only when nothing is checked)
        return self.result

    def _reap(self, grace: float, joining_grace: float = 10.0) -> None:
        """Wait for the processes to exit, then kill what is left. A role that never attached to the run (still
        loading its kernels when the stop came: it cannot hear a stop yet) gets longer: once it attaches it sees
        run_flag = 0 and leaves by itself."""
        end = time.monotonic() + grace
        for proc in self.processes.values():
            proc.join(max(0.0, end - time.monotonic()))
        late = [r for r, p in self.processes.items() if p.is_alive() and not self._attached(r)]
        end = time.monotonic() + joining_grace
        for role in late:
            self.processes[role].join(max(0.0, end - time.monotonic()))
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)

    def _attached(self, role: str) -> bool:
        if self.mem is None or role not in self.mem.role_index:
            return True  # (across hosts the launcher has no status table: no longer grace)
        return int(self.mem.status()[self.mem.role_index[role]][STATUS["state"]]) != 0

    def close(self) -> None:
        """Stop and remove everything of the run: processes, segments, sockets, run directory."""
        if self.processes and any(p.is_alive() for p in self.processes.values()):
            if self.mem is not None:
                self.mem.stop_all()
            elif self.zctx is not None:
                self._tell("stop", {"reason": "pipeline closed"})
            self._reap(2.0)
        for proc in self.processes.values():
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
            try:
                proc.close()
            except (ValueError, AttributeError):
                pass
        if self._checker is not None:
            self._checker.close()
            self._checker = None
        if self.zctx is not None:
            self.zctx.destroy(linger=0)
            self.zctx = None
        if self.device is not None:
            self.device.close()
            sweep(self.device.namespace)
        for namespace in self.namespaces.values():  # the agents unlink their own; this is the safety net
            sweep(namespace)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self._restore_signals()
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None


def _free_ports(host: str, n: int) -> list[int]:
    import socket
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def run(config: str | os.PathLike | dict | Config | None = None, overrides: list[str] | None = None,
        timeout: float | None = None, on_progress=None, **values) -> Result:
    """Run one pipeline to its end and return the Result (the one launch path the CLI uses too)."""
    with Pipeline(config, overrides, **values) as pipeline:
        pipeline.on_progress = on_progress
        return pipeline.wait(timeout)


__all__ = ["Pipeline", "run", "AfdError"]
