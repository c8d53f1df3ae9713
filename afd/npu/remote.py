"""Windows across nodes for the fake NPU: each rank serves its own window through afd's window transport.

A rank's WindowServerThread applies the puts of writers on other nodes to its window in arrival order (data
before flag stays true: one writer's messages travel one ordered connection) and answers their reads (A2F's
backpressure). A writer reaches a remote window through afd.comm_remote.RemoteWindow; each thread (each stream)
gets its own connection, since a ZeroMQ socket belongs to one thread and streams are not ordered among
themselves anyway. Plain TCP: the endpoints travel through the job's own c10d store, which is no more secret.
"""
from __future__ import annotations

import os
import socket
import threading

import zmq

from .. import control
from ..comm_remote import AgentLink, LocalRegion, RemoteWindow, WindowServer
from .memory import memory

_zctx: zmq.Context | None = None
_zlock = threading.Lock()


def _context() -> zmq.Context:
    global _zctx
    with _zlock:
        if _zctx is None:
            _zctx = zmq.Context()
        return _zctx


def _advertised() -> tuple[str, str]:
    """(bind address, address peers use): loopback for a job on one machine, this host's address otherwise."""
    forced = os.environ.get("AFD_NPU_ADVERTISE")
    if forced:
        return "0.0.0.0", forced
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("localhost", "127.0.0.1", "::1") or master.startswith("127."):
        return "127.0.0.1", "127.0.0.1"
    return "0.0.0.0", socket.gethostbyname(socket.gethostname())


class WindowServerThread:
    """Serves one window (address, size) of this process to remote writers, from a daemon thread."""

    def __init__(self, address: int, size: int):
        bind, advertise = _advertised()
        self.sock = control.socket(_context(), zmq.ROUTER, rcvhwm=100000, router_mandatory=0)
        self.endpoint = control.bind(self.sock, f"tcp://{bind}:0").replace("0.0.0.0", advertise)
        self.server = WindowServer({int(address): LocalRegion(memory, int(address), int(size))})
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="npu window server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self.sock.poll(100):
                    for _ in range(1000):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.server.handle(self.sock, frames)
        except zmq.ZMQError:  # the context went away at exit
            return
        self.sock.close()  # (by the thread that used it)
        self.server = None

    def close(self) -> None:
        """Stop serving (the window is released): the thread closes its socket and ends."""
        self._stop.set()
        self.thread.join(2.0)


class PerThreadRemoteWindow:
    """A peer's window on another node: one RemoteWindow (one ordered connection) per writing thread."""

    def __init__(self, info: dict):
        self.info = info
        self.size = int(info["size"])
        self._local = threading.local()
        self._links: list[AgentLink] = []

    def _win(self) -> RemoteWindow:
        win = getattr(self._local, "win", None)
        if win is None:
            me = f"npu-{os.getpid()}-{threading.get_ident()}-{id(self)}"
            link = AgentLink(_context(), self.info["endpoint"], None, me, self.info["host"])
            self._links.append(link)
            win = self._local.win = RemoteWindow(link, int(self.info["address"]), self.size)
        return win

    def close(self) -> None:
        """The window is released: close every thread's connection (no writer uses them any more)."""
        for link in self._links:
            link.sock.close()
        self._links.clear()
        self._local = threading.local()

    def put_rows(self, offset, stride, index, rows):
        self._win().put_rows(offset, stride, index, rows)

    def put_i32(self, offset, index, values):
        self._win().put_i32(offset, index, values)

    def get_i32(self, offset, count):
        return self._win().get_i32(offset, count)


def remote_window(info: dict) -> PerThreadRemoteWindow:
    return PerThreadRemoteWindow(info)
