"""What every role process shares: joining the controller, the wait policy (spin, then doorbell), heartbeats, watchdog, events."""
from __future__ import annotations

import os
import sys
import time
import traceback
from collections import deque

import numpy as np
import zmq

from .. import control, health
from ..config import AGENT_PREFIX, Config
from ..errors import AfdError
from ..faults import Fault, FaultHooks
from ..ops._polling import Stopped, Waiting
from ..timing import hold_until
from ..waiting import RUN_FLAG_OPS, Stall, WaitPolicy  # noqa: F401 (re-exported)
from . import doorbell, rss
from .memory import OP, STATUS, RunMemory

EVENT_CAP = 100_000  # events kept per role (the newest)
SAMPLE_CAP = 100_000  # latency samples kept per metric and role
# What a run that did not complete reports of them: the newest only. Shipping, decoding and summarising a full ring
# (100,000 events per role, as JSON through the controller to the launcher) took seconds at the end of a long run,
# and a stop must be over in a blink; the metrics and the trace of a stopped run cover its last part.
STOPPED_EVENTS = 2_000
STOPPED_SAMPLES = 2_000

# Waits that are usually the consequence of a stall elsewhere get twice the watchdog time, so the first report
# names the cause: a role's wait on its own session stream, and an FFN rank waiting for work (attention drives
# the pipeline, so the FFN side starves whenever the attention side is stuck on a lost F2A flag). On 950 the FFN rank
# waits for work inside FfnWorkerBatching V2's receive (on A3 that op never waits: the scheduler has waited).
DOWNSTREAM_WAITS = frozenset({"ffn_worker_scheduler_", "ffn_worker_batching"})


def _stall_factor(waiting: Waiting) -> float:
    return 2.0 if waiting.op.endswith(" stream") or waiting.op in DOWNSTREAM_WAITS else 1.0


class ControllerLost(Exception):
    """The controller (or the launcher that owns this process) is gone: exit rather than orphan."""


class RoleRuntime:
    """One role's connection to its run: control sockets, memory, wait policy and bookkeeping."""

    def __init__(self, role_id: str, controller: str, config: Config | None = None, plan: dict | None = None,
                 launcher_pid: int | None = None, run_dir: str | None = None, curve_keys: dict | None = None):
        self.role = role_id
        self.controller_endpoint = controller
        self.cfg = config
        self.plan = plan
        self.launcher_pid = launcher_pid
        self.launcher = control.LauncherWatch(launcher_pid)
        self.run_dir = run_dir
        self.curve_keys = curve_keys  # for roles that join from outside the launcher (afd role --keys)
        self.zctx: zmq.Context | None = None
        # Bounded, so a long run keeps flat memory: the newest events and samples are kept.
        self.events: deque = deque(maxlen=EVENT_CAP)
        self.metrics: dict[str, Samples] = {}  # per-role latency samples, sent with the final report
        self.stopping = False
        self.stop_reason = ""
        self.stop_outcome: str | None = None  # the run's outcome, as the controller's stop message says it
        self.malformed = 0
        self.directory: dict[str, str] = {}
        self._pushers: dict = {}  # role id -> doorbell ringer
        self._next_service = 0
        self._next_heartbeat = 0
        self._last_controller = time.monotonic()
        self._waits: WaitPolicy | None = None
        self.watched_run_flags: list = []
        # Faults that target this role (delay_s and window_fault are read by the ops' code).
        self.hooks = FaultHooks(stop=self._fault_stop, corrupt=self._corrupt, alive=self._launcher_alive,
                                on_fire=self._fault_fired)
        self._started_at = time.monotonic()
        self.mem: RunMemory | None = None
        self.status = None
        self.host: str | None = None  # multi-host runs: the host this role runs on
        self.links: dict = {}  # host -> afd.comm_remote.AgentLink (other hosts' windows and doorbells)
        self.register_extra: dict = {}  # sent with `register` (an agent's memory part)
        self.report_extra: dict = {}  # sent with the final report
        self.ended = False  # the controller's `end`: every role reported (agents then release the memory)
        self.on_welcome = None  # called once the welcome set cfg and plan, before attaching (an agent allocates)
        self.phase = "joining"

    # -- joining ----------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Register with the controller, get the plan, subscribe, and wait for `start` (bounded)."""
        if self.zctx is None:
            self.zctx = zmq.Context()
        health.beat(self.role, "joining")
        self.dealer = control.socket(self.zctx, zmq.DEALER, identity=self.role.encode())
        keys = (self.plan or {}).get("curve") or self.curve_keys
        control.curve_client(self.dealer, keys)
        self.dealer.connect(self.controller_endpoint)
        if self.controller_endpoint.startswith("ipc://") or self.run_dir:
            # the launcher's roles (and afd role over ipc) share this machine's run directory: a FIFO wakes fastest
            # (~20 us, where a ZeroMQ doorbell takes ~80 us and an I/O thread), and only this user can ring it;
            # a role on another host is rung by its host's agent
            db = f"fifo://{self.run_dir}/db-{self.role}.fifo"
        else:
            host = os.environ.get("AFD_ADVERTISE_HOST") or self.controller_endpoint[len("tcp://"):].rsplit(":", 1)[0]
            db = f"tcp://{host}:0" if host in ("127.0.0.1", "localhost") else "tcp://0.0.0.0:0"
        self.doorbell = doorbell.bind(self.zctx, db)
        self.doorbell_endpoint = self.doorbell.endpoint
        if "0.0.0.0" in self.doorbell_endpoint:
            self.doorbell_endpoint = self.doorbell_endpoint.replace(
                "0.0.0.0", os.environ.get("AFD_ADVERTISE_HOST", "127.0.0.1"))
        self.sub = control.socket(self.zctx, zmq.SUB)
        control.curve_client(self.sub, keys)
        timeout = (self.cfg.start_timeout_s if self.cfg else 30.0)
        deadline = time.monotonic() + timeout
        welcome = None
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        while welcome is None:
            self._check_launcher()
            if time.monotonic() > deadline:
                raise ControllerLost(f"{self.role}: no welcome from the controller at {self.controller_endpoint} "
                                     f"within {timeout:.0f}s")
            self.dealer.send_multipart(control.encode("register", {"role": self.role, "pid": os.getpid(),
                                                                   "doorbell": self.doorbell_endpoint,
                                                                   "clock_ns": time.monotonic_ns(),
                                                                   **self.register_extra}))
            health.beat(self.role, "joining")
            if poller.poll(200):
                try:
                    kind, payload = control.decode(self.dealer.recv_multipart())
                except control.MalformedMessage:
                    self.malformed += 1
                    continue
                if kind == "welcome":
                    welcome = payload
                elif kind == "stop":
                    raise Stopped(reason=payload.get("reason", "stopped before start"))
        if self.cfg is None:
            self.cfg = Config.model_validate(welcome["config"])
        if self.plan is None:
            self.plan = welcome["plan"]
        try:
            self._get_ready()
        except (Stopped, ControllerLost):
            raise  # (a signal or a lost controller: already the answer)
        except Exception as exc:
            # the run stopped while this role was getting ready (its host's memory or agent already gone): a stop
            reason = self._stop_told(0.5)
            if reason is None:
                raise
            raise Stopped(reason=reason) from exc
        # subscribing is this role's "ready": the controller starts the run once every role has subscribed, so
        # everything above (the memory attached, the links to other hosts' agents open) is done before the run
        # and its 1 s hang bound begin (subscribed at the welcome, a role still attaching on a loaded machine
        # missed its first heartbeats: 'sched0 stopped heartbeating for 1.0s' in 3 of 6 runs of 8 processes)
        self.sub.connect(_reachable(welcome["pub"], self.controller_endpoint))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        while True:
            self._check_launcher()
            if time.monotonic() > deadline:
                raise ControllerLost(f"{self.role}: no start from the controller within {timeout:.0f}s")
            health.beat(self.role, "joining")
            for sock, _ in poller.poll(200):
                try:
                    kind, payload = control.decode(sock.recv_multipart())
                except control.MalformedMessage:
                    self.malformed += 1
                    continue
                if kind == "start":
                    self.directory = payload.get("doorbells", {})
                    for peer in self.directory:  # connect every doorbell now, so no first ring is lost
                        if peer != self.role and not peer.startswith(AGENT_PREFIX):
                            self.ring(peer)
                    self._last_controller = time.monotonic()
                    self.status[STATUS["state"]] = 2
                    self.phase = "running"
                    health.beat(self.role, self.phase)
                    self.on_start(payload)
                    return
                if kind == "stop":
                    raise Stopped(reason=payload.get("reason", "stopped before start"))

    def _get_ready(self) -> None:
        """After the welcome: this role's memory attached (an agent's created), its links to other hosts' agents open
        and its status row set, everything a role does before it may run."""
        if self.on_welcome is not None:
            self.on_welcome()
        if "namespace" not in self.plan:  # agent mode: each host's memory is its agent's, found in plan["hosts"]
            self.host = self.cfg.host_of(self.role)
        if self.mem is None:
            self.mem = RunMemory.attach(self.cfg, self.plan, self.host)
        self.mem.remote = self.link
        if "hosts" in self.plan and not self.role.startswith(AGENT_PREFIX):
            # every link to another host's agent now, while joining: a connect (a name lookup, the handshake, the
            # seal's keys) inside the run would silence this role's heartbeats (a compose demo's first A2F took
            # over the 1 s hang bound that way)
            for host in self.plan["hosts"]:
                if host != self.host:
                    self.link(host)
        if self.role in self.mem.role_index:
            self.status = self.mem.status()[self.mem.role_index[self.role]]
        else:  # an agent: no row in the roles' status table
            import numpy as np
            self.status = np.zeros(len(STATUS), np.int64)
        self.status[STATUS["pid"]] = os.getpid()
        self.status[STATUS["state"]] = 1

    def _stop_told(self, seconds: float) -> str | None:
        """The reason of a stop the controller sent this role directly (within `seconds`), else None."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and self.dealer.poll(int(left * 1000) + 1):
            try:
                kind, payload = control.decode(self.dealer.recv_multipart(zmq.NOBLOCK))
            except (control.MalformedMessage, zmq.Again):
                continue
            if kind == "stop":
                return payload.get("reason", "stopped before start")
        return None

    def on_start(self, payload: dict) -> None:
        """Faults arrive with the start message; keep the ones that target this role."""
        self._started_at = time.monotonic()
        for fault in map(Fault.from_dict, payload.get("faults", [])):
            if fault.target == self.role:
                self.hooks.add(fault)

    # -- faults -----------------------------------------------------------------------------------------
    def check_faults(self, step: int, layer: int, micro_batch: int) -> None:
        """Fire every fault of this role that is due at this unit (or time)."""
        self.hooks.check(step, layer, micro_batch, elapsed_s=time.monotonic() - self._started_at)

    def _fault_fired(self, fault: Fault) -> None:
        self.status[STATUS["fault_ns"]] = time.monotonic_ns()

    def _fault_stop(self, fault: Fault) -> None:
        self.mem.stop_all()  # the path stop_schedule() takes: run_flag = 0 in the contexts
        self.send("stop", {"token": self.plan.get("token"), "reason": f"fault {fault.spec}"})

    def _launcher_alive(self) -> bool:
        """A hung role stays hung while its launcher lives; once orphaned it leaves (ControllerLost)."""
        self._check_launcher()
        return True

    def _corrupt(self, field: str) -> None:
        c = self.cfg
        if self.role.startswith("ffn"):
            ctx = self.mem.ffn_context(int(self.role[3:]))
            bad = {"polling_index": c.micro_batch_num + 3, "schedule_mode": 2, "token_info_buf": 0}
            setattr(ctx.ffn if field != "schedule_mode" else ctx.common, field, bad[field])
        else:
            session = int("".join(ch for ch in self.role if ch.isdigit()))
            ctx = self.mem.attention_context(session)
            bad = {"micro_batch_id": c.micro_batch_num + 3, "schedule_mode": 2, "token_info_buf": 0}
            setattr(ctx.attention if field != "schedule_mode" else ctx.common, field, bad[field])

    # -- doorbells --------------------------------------------------------------------------------------
    def link(self, host: str):
        """This process's ordered connection to another host's window agent (made on first use)."""
        link = self.links.get(host)
        if link is None:
            from ..comm_remote import AgentLink
            from ..transport_seal import seal_mode
            keys = (self.plan or {}).get("curve") or self.curve_keys
            link = self.links[host] = AgentLink(self.zctx, self.plan["hosts"][host]["transport"], keys, self.role,
                                                host, seal_mode(self.cfg.control.trusted_network))
        return link

    def ring(self, role_id: str) -> None:
        """Wake a role that may be blocked: best effort, never blocks (the shared memory is the truth). A role on
        another host is rung by its host's agent, after the puts this process sent there before the ring."""
        if self.host is not None:
            host = self.cfg.host_of(role_id)
            if host is not None and host != self.host:
                if "hosts" in self.plan:  # (an agent never rings another host's roles)
                    self.link(host).ring(role_id)
                return
        bell = self._pushers.get(role_id)
        if bell is None:
            endpoint = self.directory.get(role_id)
            if endpoint is None:
                return
            bell = self._pushers[role_id] = doorbell.ringer(self.zctx, endpoint)
        bell.ring()

    # -- waiting ----------------------------------------------------------------------------------------
    @property
    def waits(self) -> WaitPolicy:
        """This role's wait policy (made once the config is known): the `idle` the ops call between scans."""
        if self._waits is None:
            cfg = self.cfg
            self._waits = WaitPolicy(self.role, spin_us=cfg.spin_us, stall_timeout_s=cfg.stall_timeout_s,
                                     service_interval_s=min(cfg.heartbeat_interval_s, 0.05),
                                     spin_only=cfg.wait == "spin", block=self._block, service=self.service,
                                     stop_reason=self._stop_reason, stall_factor=_stall_factor,
                                     on_wait=lambda _: self._set_op(OP["wait"]))
        return self._waits

    def idle(self, waiting: Waiting) -> None:
        """The wait policy the ops call between scans: spin (sched_yield) briefly, then block on the doorbell."""
        try:
            self.waits(waiting)
        except Stall:
            self.status[STATUS["stall"]] = 1
            raise

    def _stop_reason(self) -> str | None:
        if not self.stopping:
            return None
        for flag in self.watched_run_flags:
            flag[0] = 0  # this host's truth; the op re-reads it and returns OK like the real kernel
        return self.stop_reason or "run_flag=0"

    @property
    def _service_ns(self) -> int:
        return int(min(self.cfg.heartbeat_interval_s, 0.05) * 1e9)

    def _block(self, timeout_ms: int) -> None:
        doorbell.wait_ring(self.doorbell, timeout_ms, also=(self.sub,))  # a control message wakes it too

    def wait_until(self, condition, what: str, micro_batch_id: int = -1) -> None:
        """Wait on a shared-memory condition with the same policy, stop checks and watchdog as the ops."""
        if condition():
            return
        waiting = Waiting(f"{self.role} stream", what, micro_batch_id, needed=1)
        t0 = time.monotonic_ns()
        while True:
            waiting.iterations += 1
            self.idle(waiting)
            if condition():
                break
        t1 = time.monotonic_ns()
        s = self.status
        s[STATUS["wait_ns"]] += t1 - t0
        self._set_op(0)
        if self.cfg.trace:
            self.events.append(("wait", t0, t1, int(s[STATUS["step"]]), int(s[STATUS["layer"]]),
                                int(s[STATUS["micro_batch"]]), {"for": what}))

    # -- housekeeping -----------------------------------------------------------------------------------
    def service(self, now: int | None = None) -> None:
        """Control messages, heartbeat, run_flag and liveness checks: at most every few ms."""
        now = now or time.perf_counter_ns()
        if now < self._next_service:
            return
        self._next_service = now + self._service_ns // 5
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._last_controller = time.monotonic()
            try:
                kind, payload = control.decode(frames)
            except control.MalformedMessage:
                self.malformed += 1
                continue
            if kind == "stop":
                self.stopping = True
                self.stop_reason = payload.get("reason", "stop")
                self.stop_outcome = payload.get("outcome")
            elif kind == "end":
                self.ended = True
            elif kind == "fault":
                fault = Fault.from_dict(payload["fault"])
                if fault.target == self.role:
                    self.hooks.add(fault)
        if any(flag[0] == 0 for flag in self.watched_run_flags):
            self.stopping = True
            self.stop_reason = self.stop_reason or "run_flag=0"
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + int(self.cfg.heartbeat_interval_s * 1e9)
            s = self.status
            s[STATUS["heartbeat_ns"]] = time.monotonic_ns()
            self.dealer.send_multipart(control.encode("heartbeat", {
                "progress": int(s[STATUS["progress"]]), "step": int(s[STATUS["step"]]),
                "layer": int(s[STATUS["layer"]]), "micro_batch": int(s[STATUS["micro_batch"]])}), zmq.NOBLOCK)
            health.beat(self.role, "stopping" if self.stopping else self.phase)
        self._check_launcher()
        if any(f.t is not None for f in self.hooks.pending):
            s = self.status
            self.check_faults(int(s[STATUS["step"]]), int(s[STATUS["layer"]]), int(s[STATUS["micro_batch"]]))
        # With a launcher, its sentinel catches a dead controller at once; the silence bound only has to
        # survive a loaded machine. Alone (containers), silence is how a dead controller shows.
        silence = 3.0 if self.launcher_pid is not None else max(1.0, 5 * self.cfg.heartbeat_interval_s)
        if time.monotonic() - self._last_controller > silence:
            if self.stopping or self.ended:
                # An orderly end: after its stop (or end) the controller may be busy collecting reports on a loaded
                # machine, or already gone. Its silence now is the end of the run, never a lost controller.
                self.ended = True
                return
            raise ControllerLost(f"{self.role}: controller silent for "
                                 f"{time.monotonic() - self._last_controller:.1f}s")

    def _check_launcher(self) -> None:
        if self.launcher.gone():
            raise ControllerLost(f"{self.role}: launcher (pid {self.launcher_pid}) is gone")
        if self.phase == "joining" and self._early_flags():
            raise Stopped(reason="run_flag=0 before this role joined")

    def _early_flags(self) -> bool:
        """While joining: has the launcher already written run_flag=0 (a stop before the start)?"""
        if self.launcher_pid is None or not self.plan or "attention" not in self.plan or "namespace" not in self.plan:
            return False  # (across hosts the launcher writes no run_flag: the controller's stop reaches the roles)
        if getattr(self, "_join_flags", None) is None:
            from ..device import Device
            self._join_device = Device(self.plan["namespace"])
            addrs = [a["context"] for a in self.plan["attention"] + self.plan["ffn"]]
            try:
                self._join_flags = [self._join_device.view(a + 128, 4, np.int32, field="run_flag") for a in addrs]
            except AfdError:
                self._join_flags = []
        return any(int(f[0]) == 0 for f in self._join_flags)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _set_op(self, op: int) -> None:
        self.status[STATUS["op"]] = op

    def at(self, step: int, layer: int, micro_batch: int) -> None:
        s = self.status
        s[STATUS["step"]], s[STATUS["layer"]], s[STATUS["micro_batch"]] = step, layer, micro_batch

    def op(self, name: str, args: dict | None = None, device_ns: int = 0):
        """Span of one op; `device_ns` > 0 holds the op until t0 + device_ns (the emulated device time)."""
        return _OpSpan(self, name, args, device_ns)

    def event(self, name: str, t_ns: int, args: dict | None = None) -> None:
        """An instant event (e.g. flags observed ready) at the current step/layer/micro-batch."""
        if self.cfg.trace:
            s = self.status
            self.events.append((name, t_ns, t_ns, int(s[STATUS["step"]]), int(s[STATUS["layer"]]),
                                int(s[STATUS["micro_batch"]]), args))

    def samples(self, name: str) -> "Samples":
        """A bounded ring of latency samples reported under `name`."""
        ring = self.metrics.get(name)
        if ring is None:
            ring = self.metrics[name] = Samples(SAMPLE_CAP)
        return ring

    def progressed(self) -> None:
        self.status[STATUS["progress"]] += 1

    def send(self, kind: str, payload: dict) -> None:
        self.dealer.send_multipart(control.encode(kind, payload))

    def finish(self, outcome: str, error: BaseException | None = None, extra: dict | None = None) -> None:
        """Send the final report (stats, events) to the controller; best effort."""
        self.phase = outcome
        health.beat(self.role, outcome)
        whole = self._run_completed(outcome)
        events = list(self.events) if self.cfg and self.cfg.trace else []
        payload = {"role": self.role, "outcome": outcome, "malformed": self.malformed,
                   "events": events if whole else events[-STOPPED_EVENTS:], "extra": extra or {},
                   "metrics": {k: v.tolist(None if whole else STOPPED_SAMPLES) for k, v in self.metrics.items()},
                   "pid": os.getpid(),
                   "clock_offset_ns": 0,  # add to local CLOCK_MONOTONIC to get the controller's clock (same host: 0)
                   "rss": rss.usage()}  # before close(): the windows are still mapped, so shmem_mb counts them
        if self.report_extra:
            payload["extra"] = {**self.report_extra, **payload["extra"]}
        if self.links:  # where this writer's time went on its links to other hosts (afd bench)
            payload["extra"]["links"] = {host: link.stats() for host, link in self.links.items()}
        if self.status is not None:
            payload["progress"] = int(self.status[STATUS["progress"]])
            payload["fault_ns"] = int(self.status[STATUS["fault_ns"]])
        if error is not None:
            payload["error"] = describe_error(error)
        if self.status is not None:
            self.status[STATUS["state"]] = 4 if error is None else 5
        try:
            self.dealer.send_multipart(control.encode("report", payload), zmq.NOBLOCK)
        except (zmq.ZMQError, AttributeError):
            pass

    def _run_completed(self, outcome: str) -> bool:
        """Whether the run completed, so this report carries every event and sample kept (else only the newest), as
        far as this role can tell: it failed, or it was not stopped, or the controller's stop message says. A stop
        seen in run_flag first waits a moment for that message (the controller sends it as it writes run_flag = 0);
        without it, the whole report goes (the conservative side)."""
        if outcome in ("failed", "orphaned"):
            return False
        if not (self.stopping or outcome == "stopped" or any(flag[0] == 0 for flag in self.watched_run_flags)):
            return True  # (an FFN rank's loop ends on run_flag = 0 without a Stopped)
        deadline = time.monotonic() + 0.05
        while self.stop_outcome is None and getattr(self, "sub", None) is not None and time.monotonic() < deadline:
            if not self.sub.poll(10):
                continue
            try:
                kind, payload = control.decode(self.sub.recv_multipart(zmq.NOBLOCK))
            except (zmq.Again, control.MalformedMessage):
                continue
            if kind == "stop":
                self.stop_outcome = payload.get("outcome")
        return self.stop_outcome in (None, "completed")

    def close(self) -> None:
        for bell in self._pushers.values():
            if isinstance(bell, doorbell.FifoRinger):
                bell.close()
        if isinstance(getattr(self, "doorbell", None), doorbell.FifoDoorbell):
            self.doorbell.close()  # removes the FIFO: no socket file outlives the role
        if self.zctx is not None:
            if getattr(self, "sub", None) is not None:
                # nothing to flush; a SUB whose publisher (the controller) has just gone has queued its subscription
                # again for a reconnect that never comes, and the context's end waited out the whole linger below
                # (1 s of a stop, about one run in four)
                self.sub.close(linger=0)
            # long enough to flush the final report, bounded if nobody listens; an orphan's has nobody to go to
            self.zctx.destroy(linger=0 if self.phase == "orphaned" else 1000)
            self.zctx = None
        if self.mem is not None:
            self.mem.device.close()
        if getattr(self, "_join_device", None) is not None:
            self._join_flags = None
            self._join_device.close()


class Samples:
    """A ring of int64 samples, allocated and touched once: a role's memory stays flat however long it runs."""

    def __init__(self, capacity: int):
        self.buf = np.full(capacity, 0, np.int64)
        self.n = 0

    def append(self, value: int) -> None:
        self.buf[self.n % len(self.buf)] = value
        self.n += 1

    def __len__(self) -> int:
        return min(self.n, len(self.buf))

    def tolist(self, newest: int | None = None) -> list[int]:
        """The kept samples (the newest `newest` of them when given), oldest first."""
        if self.n <= len(self.buf):
            kept = self.buf[:self.n]
        else:
            i = self.n % len(self.buf)
            kept = np.concatenate([self.buf[i:], self.buf[:i]])
        return kept[-newest:].tolist() if newest else kept.tolist()


class _OpSpan:
    """Times one op for the status table and the event list."""

    __slots__ = ("rt", "name", "t0", "args", "device_ns")

    def __init__(self, rt: RoleRuntime, name: str, args: dict | None = None, device_ns: int = 0):
        self.rt, self.name, self.args, self.device_ns = rt, name, args, device_ns

    def __enter__(self):
        self.rt._set_op(OP.get(self.name, 0))
        self.t0 = time.monotonic_ns()
        if self.rt.hooks.delay_s:  # a straggler: the op takes this much longer
            time.sleep(self.rt.hooks.delay_s)
        return self

    def __exit__(self, *exc):
        rt = self.rt
        if self.device_ns and exc[0] is None:
            hold_until(self.t0 + self.device_ns)
        t1 = time.monotonic_ns()
        s = rt.status
        waits = rt.waits
        waited = waits.waited_ns if waits.wait_start >= self.t0 else 0
        s[STATUS["busy_ns"]] += t1 - self.t0 - waited
        s[STATUS["wait_ns"]] += waited
        rt._set_op(0)
        if rt.cfg.trace:
            step, layer, mb = int(s[STATUS["step"]]), int(s[STATUS["layer"]]), int(s[STATUS["micro_batch"]])
            rt.events.append((self.name, self.t0, t1, step, layer, mb, self.args))
            if waited:
                rt.events.append(("wait", waits.wait_start, waits.wait_last, step, layer, mb,
                                  {"for": waits.what, "in": self.name}))
        return False


def describe_error(error: BaseException) -> dict:
    out = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, AfdError):
        out.update(field=error.field, rule=error.rule, status=error.status)
    if isinstance(error, Stall):
        w = error.waiting
        out["waiting"] = {"op": w.op, "what": w.what, "micro_batch_id": w.micro_batch_id, "ready": w.ready,
                          "needed": w.needed}
        details = getattr(error, "details", None)
        if details is not None:
            out["missing"] = details[:64]
            out["message"] += "; missing: " + ", ".join(
                f"mb {d['micro_batch']} token {d['token']} slot {d['expert_slot']} expert {d['expert_id']} "
                f"(owed by ffn{d['ffn_rank']})" for d in details[:4]) + (" ..." if len(details) > 4 else "")
    if not isinstance(error, (AfdError, Stopped, ControllerLost)):
        out["traceback"] = traceback.format_exc(limit=8)
    return out


def _reachable(endpoint: str, controller: str) -> str:
    """A bound-to-every-interface endpoint the controller advertised, made reachable: the host we reached it at."""
    for wildcard in ("0.0.0.0", "*"):
        if f"://{wildcard}:" in endpoint and controller.startswith("tcp://"):
            return endpoint.replace(wildcard, controller[len("tcp://"):].rsplit(":", 1)[0], 1)
    return endpoint


def _no_numba_blas_probe() -> None:
    """numba probes for scipy's BLAS when it first loads a kernel, importing scipy.linalg (0.35 s of CPU per
    process here, where scipy is installed though nothing needs it); no afd kernel calls BLAS and a role process
    runs only afd's code, so it tells numba there is none. After it, scipy.linalg cannot be imported in this process
    (its own modules import cython_blas): no afd code does. (Not in the fake NPU: that process is the user's.)"""
    for name in ("scipy.linalg.cython_blas", "scipy.linalg.cython_lapack"):
        sys.modules.setdefault(name, None)


def run_role(rt: RoleRuntime, body, prepare=None) -> int:
    """Run a role body with the common lifecycle: (prepare(rt)), connect, body(rt), report; exit code 0 on success
    or stop."""
    code = 0
    try:
        if prepare is not None:
            _no_numba_blas_probe()
            prepare(rt)
        rt.connect()
        body(rt)
        rt.finish("completed")
    except Stopped as exc:
        rt.finish("stopped", extra={"reason": str(exc)})
    except ControllerLost as exc:
        rt.finish("orphaned", exc)
        if rt.mem is not None and rt.launcher_pid is not None:
            from ..device import sweep
            sweep(rt.mem.device.namespace)  # the owner is gone: do not leave its segments to a later run
        code = 3
    except BaseException as exc:  # report what broke, then exit non-zero
        if os.environ.get("AFD_DEBUG"):
            traceback.print_exc()
        rt.finish("failed", exc)
        code = 1
    finally:
        if rt.status is not None:
            rt.status[STATUS["exit_code"]] = code
        rt.close()
    return code
