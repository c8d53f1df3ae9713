"""Doorbells: the wake-up a writer rings after its shared-memory stores; a named FIFO on one host, ZeroMQ across hosts.

A FIFO wakes a blocked reader straight from the writer's write(2) (measured here ~20 us p50), while a
ZeroMQ PUSH/PULL pair goes through libzmq's I/O threads (~80 us). Either way the ring carries no data:
the shared memory is the truth, and a lost ring costs at most one poll timeout.

What runs between a wake-up and the op's return is the hop (afd bench): right after a blocked process wakes on
this VM every call takes ~15x its warm time (a raised and caught exception ~40 us), so draining reads without
raising and the poller is built once per bell.
"""
from __future__ import annotations

import errno
import os

import zmq

from .. import control


_PIPE_BYTES = 65536  # Linux's default pipe capacity: one read takes every pending ring


class FifoDoorbell:
    """The receiving end: a FIFO created 0600 in the run directory, opened non-blocking."""

    def __init__(self, path: str):
        self.path = path
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.endpoint = f"fifo://{path}"
        self.pollable = self.fd
        self.pollers: dict[tuple, zmq.Poller] = {}  # wait_ring's, by the sockets waited on beside the bell

    def drain(self) -> None:
        try:
            while len(os.read(self.fd, _PIPE_BYTES)) == _PIPE_BYTES:  # a short read emptied the pipe
                pass
        except BlockingIOError:  # drained while nothing was pending (not after a wake-up)
            pass

    def close(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ZmqDoorbell:
    """The receiving end over ZeroMQ (a PULL socket), for doorbells rung from other hosts."""

    def __init__(self, zctx: zmq.Context, endpoint: str):
        self.sock = control.socket(zctx, zmq.PULL, rcvhwm=64)
        self.endpoint = control.bind(self.sock, endpoint)
        self.pollable = self.sock
        self.pollers: dict[tuple, zmq.Poller] = {}

    def drain(self) -> None:
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:  # EVENTS said a message was there; nothing lost if it was not
                return

    def close(self) -> None:
        self.sock.close(linger=0)


def wait_ring(bell, timeout_ms: int, also=()) -> bool:
    """Block until the doorbell rings (then drain it) or one of `also` (sockets) is readable, at most timeout_ms."""
    also = tuple(also)
    poller = bell.pollers.get(also)
    if poller is None:
        poller = bell.pollers[also] = zmq.Poller()
        poller.register(bell.pollable, zmq.POLLIN)
        for sock in also:
            poller.register(sock, zmq.POLLIN)
    for pollable, _ in poller.poll(timeout_ms):
        if pollable == bell.pollable:
            bell.drain()
            return True
    return False


def bind(zctx: zmq.Context, endpoint: str):
    """A doorbell at `fifo://PATH` or a ZeroMQ endpoint (tcp://host:0 picks a port)."""
    if endpoint.startswith("fifo://"):
        return FifoDoorbell(endpoint[len("fifo://"):])
    return ZmqDoorbell(zctx, endpoint)


class FifoRinger:
    """The writing end of a FIFO doorbell: opened lazily (the reader may not exist yet), never blocks."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def ring(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader (yet, or any more)
                    return
                raise
        try:
            os.write(self.fd, b"\0")
        except BlockingIOError:  # the pipe is full: the reader has plenty of rings to wake on
            pass
        except BrokenPipeError:  # the reader went away
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ZmqRinger:
    """The writing end over ZeroMQ: a PUSH socket; a ring that cannot be queued is dropped."""

    def __init__(self, zctx: zmq.Context, endpoint: str):
        self.sock = control.socket(zctx, zmq.PUSH, sndhwm=4)
        self.sock.connect(endpoint)

    def ring(self) -> None:
        try:
            self.sock.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.close(linger=0)


def ringer(zctx: zmq.Context, endpoint: str):
    if endpoint.startswith("fifo://"):
        return FifoRinger(endpoint[len("fifo://"):])
    return ZmqRinger(zctx, endpoint)
