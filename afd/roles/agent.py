"""Window agent agent-<host>: owns one host's device memory, applies other hosts' window writes in order, rings its roles.

In a multi-host run (a `hosts:` section, or roles started one by one with `afd role`) nobody else on a host may own
its shared memory: the agent creates the host's part of the run's memory (RunMemory.create(host=...)) once the
controller's welcome gave it the run's config, reports the addresses (`part`), and the controller hands every role
the merged plan. It then serves the window transport (afd.comm_remote.WindowServer) until the controller's `end`:
the puts of another host's writer are applied in arrival order, so slot data lands before its flag. On a stop it
writes run_flag = 0 into this host's contexts and rings the host's roles. At the end it reports what only this host's
memory knows (digests, final outputs, status rows: progress and fault times) and unlinks the memory.
"""
from __future__ import annotations

import base64
import os
import time

import numpy as np
import zmq

from .. import comm_stream
from ..comm_remote import StreamServer, WindowServer
from ..config import AGENT_PREFIX
from ..device import Device, new_namespace
from ..runtime.memory import STATUS, STATUS_FIELDS, RunMemory
from ..transport_seal import preload as preload_seal
from ..transport_seal import seal_mode, transport_key

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def transport_endpoints(address: str) -> tuple[str, str]:
    """(bind address, advertised address) of a host's agent: a loopback address binds there, any other binds every
    interface."""
    if address in LOOPBACK:
        return address, address
    return "0.0.0.0", address


def prepare(rt) -> None:
    """Before joining: what applying and opening the puts runs is loaded (numba's row copies, the seal's cipher), so
    the first puts inside the run do not wait for an import (on a loaded machine the agents' numba import took 1-3 s
    there, and the writers waiting on their replies missed the 1 s hang bound); the memory is created once the
    welcome brings the run's config (on_welcome)."""
    from ..ops._kernels import warm_up_copy_rows
    rt.host = rt.role[len(AGENT_PREFIX):]
    warm_up_copy_rows()
    preload_seal()

    def on_welcome() -> None:
        cfg, host = rt.cfg, rt.host
        if host not in cfg.host_map():
            raise ValueError(f"{rt.role}: host {host!r} is not in the run's hosts ({', '.join(cfg.host_map())})")
        namespace = getattr(rt, "namespace", None) or new_namespace()
        rt.mem = RunMemory.create(cfg, Device(namespace), host)
        # no CURVE on the transport: every message is sealed with the run's key instead (afd.transport_seal), on
        # the stream wire (afd.comm_stream: raw TCP, bodies straight into the windows)
        rt.transport_key = transport_key((rt.plan or {}).get("curve") or rt.curve_keys)
        bind, advertise = transport_endpoints(cfg.host_map()[host].address)
        rt.transport = comm_stream.listen(bind, int(os.environ.get("AFD_AGENT_PORT", "0")))
        endpoint = f"{comm_stream.SCHEME}{advertise}:{rt.transport.getsockname()[1]}"
        rt.transport_endpoint = endpoint
        rt.send("part", {"host": host, "part": rt.mem.plan, "transport": endpoint})

    rt.on_welcome = on_welcome


def body(rt) -> None:
    mem = rt.mem
    local_roles = [r for r in rt.cfg.host_map()[rt.host].roles]
    server = WindowServer(mem.regions(), ring=rt.ring, key=rt.transport_key,
                          seal=seal_mode(rt.cfg.control.trusted_network),
                          on_stamp=rt.samples("f2a_put_to_store_ns").append)
    poller = zmq.Poller()
    poller.register(rt.sub, zmq.POLLIN)
    stream = StreamServer(server, rt.transport, poller)
    stopped = False
    busy_ns = 0  # in handling messages (afd bench: how busy the agent is)
    try:
        while not rt.ended:
            ready = [fd for fd, _ in poller.poll(10) if isinstance(fd, int)]
            if ready:
                t0 = time.perf_counter_ns()
                for fd in ready:
                    stream.serve(fd)
                busy_ns += time.perf_counter_ns() - t0
            rt.service()
            if rt.stopping and not stopped:  # this host's truth; the other hosts' agents write theirs
                stopped = True
                mem.stop_all()
                for role in local_roles:
                    rt.ring(role)
    finally:
        stream.close()
        rt.report_extra = {"host": rt.host, "namespace": mem.device.namespace, "transport":
                           getattr(rt, "transport_endpoint", ""), "applied": server.stats,
                           "refused": server.refused, "last_refused": server.last_error, "busy_ns": busy_ns,
                           **host_state(mem)}


def host_state(mem: RunMemory) -> dict:
    """What only this host's memory knows, for the run's result: its sessions' digests and final outputs, and the
    status rows of its roles (progress, fault times)."""
    sessions = mem.local_sessions
    digests = mem.digests()
    outputs = mem.outputs()
    status = mem.status()
    roles = [r for r in mem.cfg.host_map()[mem.host].roles if r in mem.role_index]
    return {
        "sessions": sessions,
        "digests": {str(s): digests[:, s, :].astype(np.uint64).tolist() for s in sessions},
        "outputs": {str(s): base64.b64encode(np.ascontiguousarray(outputs[s]).tobytes()).decode() for s in sessions},
        "status": {r: dict(zip(STATUS_FIELDS, map(int, status[mem.role_index[r]]))) for r in roles},
    }


__all__ = ["prepare", "body", "host_state", "STATUS"]
