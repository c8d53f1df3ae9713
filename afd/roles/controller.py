"""The controller: registers roles, starts them together, watches heartbeats, stops the run through run_flag=0."""
from __future__ import annotations

import logging
import os
import time

import zmq

from .. import control, health
from ..config import Config
from ..faults import Fault
from ..runtime import rss
from ..runtime.memory import STATUS, RunMemory

TICK_S = 0.1
log = logging.getLogger("afd.controller")


class Controller:
    """ROUTER for register/heartbeat/report/stop, XPUB for start/stop/tick; one per run."""

    def __init__(self, config: Config, plan: dict, endpoint: str, pub_endpoint: str, launcher_pid: int | None):
        self.cfg, self.plan = config, plan
        # Agent mode (a `hosts:` section, or roles started by `afd role`): each host's agent owns that host's memory;
        # the controller shares none, so it learns progress, digests and fault times from messages.
        self.multi = "namespace" not in plan
        self.agents = list(plan.get("agents", []))
        self.expected = [r for r in plan["roles"] if r != "controller"] + self.agents
        self.launcher_pid = launcher_pid
        self.launcher = control.LauncherWatch(launcher_pid)
        self.zctx = zmq.Context()
        keys = plan.get("curve")
        self.auth = control.start_authenticator(self.zctx, keys)
        self.router = control.socket(self.zctx, zmq.ROUTER, router_mandatory=0)
        control.curve_server(self.router, keys)
        self.endpoint = control.bind(self.router, endpoint)
        self.pub = control.socket(self.zctx, zmq.XPUB, xpub_verbose=1)
        control.curve_server(self.pub, keys)
        self.pub_endpoint = control.bind(self.pub, pub_endpoint)
        self.mem = None if self.multi else RunMemory.attach(config, plan)
        # mapped now: a mapping outlives the owner's unlink at teardown
        self.status_table = self.mem.status() if self.mem is not None else None
        self.parts: dict[str, dict] = {}  # host -> its agent's memory part and transport endpoint
        self.plan_ready = not self.multi
        self.pending_welcome: dict[str, bytes] = {}  # roles that registered before every agent reported its part
        self.beats: dict[str, dict] = {}  # role -> its last heartbeat (step, layer, micro_batch, progress)
        self.ended_at = None
        self.registered: dict[str, dict] = {}
        self.last_seen: dict[str, float] = {}
        self.subscriptions = 0
        self.reports: dict[str, dict] = {}
        self.silent: set[str] = set()  # roles whose report will never come (dead, hung): the end does not wait for them
        self.done: set[str] = set()
        self.phase = "joining"
        self.outcome = None
        self.reason = ""
        self.failure: dict | None = None
        self.malformed = 0
        self.unknown_senders = 0
        self.started_at = None
        self.stop_at = None
        self.in_flight = None
        self.log_lines: list[str] = []
        self.pending_faults: list = plan.get("faults", [])
        self.own_faults = [f for f in map(Fault.from_dict, self.pending_faults) if f.target == "controller"]
        self.fault_ns = 0

    def note(self, message: str, level: int = logging.INFO) -> None:
        """A line of the run log (returned with the result, also sent to logging)."""
        t = 0.0 if self.started_at is None else time.monotonic() - self.started_at
        self.log_lines.append(f"{t:9.4f}s controller: {message}")
        log.log(level, message)

    def broadcast(self, kind: str, payload: dict | None = None) -> None:
        self.pub.send_multipart(control.encode(kind, payload))

    def reply(self, identity: bytes, kind: str, payload: dict | None = None) -> None:
        try:
            self.router.send_multipart([identity] + control.encode(kind, payload), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # -- the run's end ---------------------------------------------------------------------------------
    def begin_stop(self, outcome: str, reason: str, failure: dict | None = None) -> None:
        if self.phase == "stopping":
            return
        self.in_flight = self.snapshot()
        if self.mem is not None:
            self.mem.stop_all()  # the truth: every poll re-reads run_flag
        # the wake-up (and, across hosts, each host writes its run_flag); the outcome tells a role what to report
        self.broadcast("stop", {"reason": reason, "outcome": outcome})
        if self.phase == "joining":
            # a registered role subscribes only once it is ready (or waits for the plan): it may not hear the
            # broadcast, so each is told directly, or it would wait for a start until its own start timeout
            for role in self.registered:
                self.reply(role.encode(), "stop", {"reason": reason})
        self.pending_welcome.clear()
        self.outcome, self.reason, self.failure = outcome, reason, failure
        self.detect_ns = time.monotonic_ns()
        self.note(f"stopping ({outcome}): {reason}; run_flag=0 written into every context"
                  + (" (by each host's roles and agent)" if self.multi else ""))
        self.phase = "stopping"
        self.stop_at = time.monotonic()

    def snapshot(self) -> dict:
        """Step, layer and micro-batch each role had in flight (from the shared status table, or the heartbeats)."""
        table = self.status_table
        out = {}
        if table is None:
            for role in self.plan["roles"]:
                beat = self.beats.get(role, {})
                out[role] = {k: int(beat.get(k, 0)) for k in ("step", "layer", "micro_batch", "progress")}
            return out
        for role, i in self.mem.role_index.items():
            row = table[i]
            out[role] = {"step": int(row[STATUS["step"]]), "layer": int(row[STATUS["layer"]]),
                         "micro_batch": int(row[STATUS["micro_batch"]]), "progress": int(row[STATUS["progress"]])}
        return out

    def progress(self) -> tuple[int, int]:
        table = self.status_table
        if table is None:
            done = sum(int(self.beats.get(f"combine{s}", {}).get("progress", 0)) for s in range(self.cfg.sessions))
        else:
            done = sum(int(table[self.mem.role_index[f"combine{s}"]][STATUS["progress"]])
                       for s in range(self.cfg.sessions))
        total = self.cfg.sessions * self.cfg.steps * self.cfg.layers * self.cfg.micro_batch_num
        return done, total

    # -- messages --------------------------------------------------------------------------------------
    def on_router(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.malformed += 1
            return
        identity, body = frames[0], frames[1:]
        try:
            kind, payload = control.decode(body)
        except control.MalformedMessage:
            self.malformed += 1
            return
        sender = identity.decode(errors="replace")
        if kind == "register":
            role = payload.get("role")
            if role not in self.expected or role != sender:
                self.unknown_senders += 1
                if self.unknown_senders <= 3:
                    self.note(f"dropped a register from unknown role {str(role)[:40]!r}", logging.WARNING)
                return
            if role not in self.registered:
                self.note(f"{role} registered (pid {payload.get('pid')})")
            self.registered[role] = payload
            self.last_seen[role] = time.monotonic()
            if self.phase == "stopping":  # too late to join: it would wait for a start that never comes
                self.reply(identity, "stop", {"reason": self.reason})
            elif self.plan_ready or role in self.agents:
                self.welcome(identity)
            else:  # the plan needs every host's memory part first
                self.pending_welcome[role] = identity
        elif kind == "part":
            self.on_part(sender, payload)
        elif kind == "heartbeat":
            if sender in self.registered:
                self.last_seen[sender] = time.monotonic()
                self.beats[sender] = payload
            else:
                self.unknown_senders += 1
        elif kind == "done":
            if sender in self.registered:
                self.done.add(sender)
                if "progress" in payload:
                    self.beats.setdefault(sender, {}).update(progress=payload["progress"])
        elif kind == "report":
            if sender in self.registered:
                self.reports[sender] = payload
                self.last_seen[sender] = time.monotonic()
                if "progress" in payload:
                    self.beats.setdefault(sender, {}).update(progress=payload["progress"])
                if payload.get("outcome") == "failed":
                    err = payload.get("error", {})
                    failure = {"role": sender, "kind": "error", "error": err}
                    reason = f"{sender} failed: {err.get('message', '?')}"
                    if self.phase != "stopping":
                        self.begin_stop("failed", reason, failure)
                    elif self.failure and self.failure.get("kind") == "died" and self.failure.get("role") == sender:
                        # its exit beat its report to us: the report says why, so it is an error, not a death
                        self.failure, self.reason = failure, reason
        elif kind == "stop":
            if sender == "launcher" or payload.get("token") == self.plan.get("token"):
                self.reply(identity, "ack", {"phase": self.phase})
                self.begin_stop("stopped", payload.get("reason", f"stop requested by {sender}"))
            else:
                self.unknown_senders += 1  # an unauthenticated stop is refused
                self.note(f"refused a stop from {sender[:40]!r}: no valid run token", logging.WARNING)
        elif kind == "role_died" and sender == "launcher":
            role = payload.get("role")
            self.silent.add(role)
            self.begin_stop("failed", f"{role} exited unexpectedly (exit code {payload.get('exitcode')})",
                            {"role": role, "kind": "died", "exitcode": payload.get("exitcode")})
        elif kind == "inject" and sender == "launcher":
            fault = Fault.from_dict(payload["fault"])
            if fault.target == "controller":
                self.own_faults.append(fault)
            else:
                self.broadcast("fault", payload)
        elif kind == "status":
            done, total = self.progress()
            self.reply(identity, "status_reply", {"phase": self.phase, "done": done, "total": total})
        else:
            self.unknown_senders += 1

    def welcome(self, identity: bytes) -> None:
        plan = {k: v for k, v in self.plan.items() if k != "curve"}  # never send key material
        self.reply(identity, "welcome", {"pub": self.pub_endpoint, "config": self.cfg.model_dump(mode="json"),
                                         "plan": plan})

    def on_part(self, sender: str, payload: dict) -> None:
        """An agent's memory part: once every host's is in, the plan is complete and waiting roles are welcomed."""
        host = payload.get("host")
        if sender not in self.agents or sender != f"agent-{host}" or not isinstance(payload.get("part"), dict):
            self.unknown_senders += 1
            return
        if host not in self.parts:
            self.note(f"host {host}: memory namespace {payload['part'].get('namespace')}, window agent at "
                      f"{payload.get('transport')}")
        self.parts[host] = payload
        if not self.plan_ready and len(self.parts) == len(self.agents):
            self.plan = RunMemory.merge_parts(self.plan, {h: p["part"] for h, p in self.parts.items()},
                                              {h: p["transport"] for h, p in self.parts.items()})
            self.plan_ready = True
            for identity in self.pending_welcome.values():
                self.welcome(identity)
            self.pending_welcome.clear()

    def on_pub(self, frames: list[bytes]) -> None:
        if frames and frames[0][:1] == b"\x01":
            self.subscriptions += 1

    # -- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        join_deadline = time.monotonic() + self.cfg.start_timeout_s
        next_tick = next_progress = 0.0
        while True:
            for sock, _ in poller.poll(20):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    (self.on_router if sock is self.router else self.on_pub)(frames)
            now = time.monotonic()
            if self.launcher.gone():
                self.mem.stop_all()
                self.broadcast("stop", {"reason": "launcher gone"})
                self.orphaned()
                return 3
            if now >= next_tick:
                next_tick = now + TICK_S
                self.broadcast("tick")
                health.beat("controller", self.phase)
            if self.phase == "joining":
                if len(self.registered) == len(self.expected) and self.subscriptions >= len(self.expected):
                    self.started_at = now
                    self.phase = "running"
                    # roles send no heartbeat while they wait for the start: liveness counts from here
                    self.last_seen.update({r: now for r in self.registered})
                    self.note(f"all {len(self.expected)} roles registered and subscribed: start")
                    self.broadcast("start", {"doorbells": {r: p["doorbell"] for r, p in self.registered.items()},
                                             "faults": self.pending_faults})
                elif now > join_deadline:
                    missing = sorted(set(self.expected) - set(self.registered))
                    self.begin_stop("failed", f"roles did not join within {self.cfg.start_timeout_s}s: {missing}",
                                    {"role": ",".join(missing), "kind": "join"})
            elif self.phase == "running":
                combines = {f"combine{s}" for s in range(self.cfg.sessions)}
                # its own faults first: a point the run passed since the last look fires even if the run ended
                # meanwhile (this loop looks every ~20 ms; a short run can pass its point and end in between)
                self.check_own_faults(now)
                if self.phase == "running":
                    if combines <= self.done:
                        self.begin_stop("completed", "all steps completed")
                    else:
                        self.check_liveness(now)
                        if now - self.started_at > self.cfg.run_timeout_s:
                            self.begin_stop("failed", f"run exceeded run_timeout_s={self.cfg.run_timeout_s}",
                                            {"role": "controller", "kind": "timeout"})
            if self.phase != "joining" and now >= next_progress:
                next_progress = now + 0.2
                done, total = self.progress()
                self.reply(b"launcher", "progress", {"done": done, "total": total, "phase": self.phase})
            if self.phase == "stopping":
                alive = set(self.registered) - set(self.reports) - self.silent
                if not self.agents:
                    if not alive or now - self.stop_at > 1.5:
                        self.finish()
                        self.await_ack()
                        return 0
                elif self.ended_at is None:
                    if not (alive - set(self.agents)) or now - self.stop_at > 1.5:
                        self.ended_at = now  # every role is done with the memory: the agents may release it
                        self.broadcast("end")
                elif not alive or now - self.ended_at > 1.5:
                    self.finish()
                    self.await_ack()
                    return 0

    def await_ack(self, seconds: float = 5.0) -> None:
        """The result can be megabytes (events): wait until the launcher has it, or is gone, before closing."""
        if self.launcher_pid is None:
            return
        end = time.monotonic() + seconds
        resend = time.monotonic() + 0.5
        while time.monotonic() < end and not self.launcher.gone():
            if time.monotonic() > resend:  # a result lost on the way is sent again (the launcher keeps the first)
                resend = time.monotonic() + 0.5
                self.reply(b"launcher", "result", self.result_payload)
            if self.router.poll(50):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if frames[0] == b"launcher" and frames[1:2] == [b"ack"]:
                    return

    def check_own_faults(self, now: float) -> None:
        """Faults that target the controller: a stop at a point of progress (as stop_schedule()), or its own death."""
        if not self.own_faults:
            return
        if self.status_table is not None:
            row = self.status_table[self.mem.role_index["combine0"]]
            point = (int(row[STATUS["step"]]), int(row[STATUS["layer"]]), int(row[STATUS["micro_batch"]]))
        else:
            beat = self.beats.get("combine0", {})
            point = (int(beat.get("step", 0)), int(beat.get("layer", 0)), int(beat.get("micro_batch", 0)))
        for fault in list(self.own_faults):
            if fault.reached(*point, now - self.started_at):
                self.own_faults.remove(fault)
                self.note(f"fault {fault.spec} fires")
                self.fault_ns = time.monotonic_ns()
                if self.status_table is not None:
                    self.status_table[self.mem.role_index["controller"]][STATUS["fault_ns"]] = self.fault_ns
                if fault.kind == "kill":
                    os.kill(os.getpid(), 9)
                self.begin_stop("stopped", f"fault {fault.spec} at step {point[0]} layer {point[1]} "
                                           f"micro-batch {point[2]}")

    def check_liveness(self, now: float) -> None:
        for role in self.expected:
            seen = self.last_seen.get(role)
            if seen is not None and role not in self.reports and now - seen > self.cfg.hang_timeout_s:
                self.silent.add(role)
                self.begin_stop("failed", f"{role} stopped heartbeating for {now - seen:.1f}s (hung)",
                                {"role": role, "kind": "hang", "silent_s": round(now - seen, 3)})
                return

    def finish(self) -> None:
        """The run's result to the launcher (kept as self.result_payload for a controller that runs alone)."""
        done, total = self.progress()
        self.result_payload = {
            "outcome": self.outcome, "reason": self.reason, "failure": self.failure, "in_flight": self.in_flight,
            "reports": self.reports, "done": done, "total": total, "malformed": self.malformed,
            "unknown_senders": self.unknown_senders, "detect_ns": getattr(self, "detect_ns", 0),
            "log": self.log_lines[-2000:], "controller_fault_ns": self.fault_ns,
            "run_s": (self.stop_at - self.started_at) if self.started_at else 0.0, "rss": rss.usage()}
        self.reply(b"launcher", "result", self.result_payload)

    def orphaned(self) -> None:
        """The launcher died: remove what it owned (segments, socket files) instead of leaving it to a later run."""
        import shutil

        from ..device import sweep
        if not self.multi:  # across hosts each agent removes its own host's memory
            sweep(self.plan["namespace"])
        for endpoint in (self.endpoint, self.pub_endpoint):
            path = control.ipc_path(endpoint)
            if path:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.zctx.destroy(linger=200)
        if self.mem is not None:
            self.mem.device.close()


def main(config: Config, plan: dict, endpoint: str, pub_endpoint: str, launcher_pid: int | None) -> int:
    controller = Controller(config, plan, endpoint, pub_endpoint, launcher_pid)
    try:
        return controller.run()
    finally:
        controller.close()
