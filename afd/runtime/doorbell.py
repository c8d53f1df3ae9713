"""Doorbells: the wake-up a writer rings after its shared-memory stores; a named FIFO on one host, ZeroMQ across hosts.

A FIFO wakes a blocked reader straight from the writer's write(2) (measured here ~20 us p50), while a
ZeroMQ PUSH/PULL pair goes through libzmq's I/O threads (~80 us). Either way the ring carries no data:
the shared memory is the truth, and a lost ring costs at most one poll timeout.

What runs between a wake-up and the op's return is the hop (afd bench): right after a blocked process wakes on
this VM every call takes ~15x its warm time (a raised and caught exception ~40 us, a read(2) ~5 us). So a wait
drains the rings before it blocks, not after it wakes: rings already there end the wait at once (the op scans
again: nothing is lost between its last scan and the block), and the ring that wakes it is drained by the next
wait. Pollers are built once per bell; a FIFO bell waits in poll(2) itself (select.poll), ZeroMQ sockets beside it
by their file descriptor.
"""
from __future__ import annotations

import errno
import os
import select
import time

import zmq

from .. import control

_DRAIN_BYTES = 256  # rings read per read(2) (a 64 KiB buffer cost ~2 us more of allocation)


class FifoDoorbell:
    """The receiving end: a FIFO created 0600 in the run directory, opened non-blocking, and for writing too (Linux
    allows it): with a writer always there, poll(2) never reports the hang-up of the last ringer that closed, which
    would make every later wait return at once."""

    def __init__(self, path: str):
        self.path = path
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.endpoint = f"fifo://{path}"
        self.pollable = self.fd
        self.pollers: dict[tuple, select.poll] = {}  # wait_ring's, by the sockets waited on beside the bell

    def drain(self) -> int:
        """Read every pending ring; how many there were."""
        n = 0
        try:
            while True:
                got = len(os.read(self.fd, _DRAIN_BYTES))
                n += got
                if got < _DRAIN_BYTES:  # a short read emptied the pipe
                    return n
        except BlockingIOError:  # nothing (more) was pending
            return n

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

    def drain(self) -> int:
        """Receive every pending ring; how many there were."""
        n = 0
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:  # EVENTS said a message was there; nothing lost if it was not
                break
            n += 1
        return n

    def close(self) -> None:
        self.sock.close(linger=0)


def wait_ring(bell, timeout_ms: int, also=()) -> bool:
    """Block until the doorbell rings or one of `also` (sockets) is readable, at most timeout_ms; True when it rang
    (rings left by an earlier wake-up, drained first, count: the caller scans again before it waits again)."""
    also = tuple(also)
    if bell.drain():
        return True
    if isinstance(bell, FifoDoorbell):
        return _wait_fifo(bell, timeout_ms, also)
    poller = bell.pollers.get(also)
    if poller is None:
        poller = bell.pollers[also] = zmq.Poller()
        poller.register(bell.pollable, zmq.POLLIN)
        for sock in also:
            poller.register(sock, zmq.POLLIN)
    return any(pollable == bell.pollable for pollable, _ in poller.poll(timeout_ms))


def _wait_fifo(bell: FifoDoorbell, timeout_ms: int, also: tuple) -> bool:
    poller = bell.pollers.get(also)
    if poller is None:
        poller = bell.pollers[also] = select.poll()
        poller.register(bell.fd, select.POLLIN)
        for sock in also:
            poller.register(sock.getsockopt(zmq.FD), select.POLLIN)
    deadline = time.monotonic() + timeout_ms / 1000.0
    while True:
        for sock in also:  # a socket's FD only signals changes: a message already queued must not be slept past
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return False
        left_ms = (deadline - time.monotonic()) * 1000.0
        events = poller.poll(max(0, int(left_ms + 0.999))) if left_ms > 0 else []
        if not events:
            return False
        if any(fd == bell.fd for fd, _ in events):
            return True  # (its ring is drained by the next wait)
        # only a socket's FD fired, which it also does for changes that are no message (a peer attaching): its
        # EVENTS, read above, say whether a message came; if not, wait on for what is left of the timeout


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
