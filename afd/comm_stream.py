"""The stream wire: the window transport's messages framed on one raw TCP connection, sent from and read into the
caller's buffers (afd.comm_remote's StreamLink and StreamServer).

A message: prefix <magic op meta-count sealed head-bytes body-bytes> (16 bytes), head = [seal (32)] meta frames
(each a u32 length and its bytes) [head tag (16)], then the body (with its 16-byte tag when sealed, see
afd.transport_seal). The writer hands the kernel the prefix+head and the body where they are (one sendmsg, no copy
of ours); the reader takes a body straight into the buffer its head names (a window's rows, or a reusable buffer).
Sockets block in the kernel (one sendmsg for a whole body, one MSG_WAITALL receive, no poll per chunk: a raw
socket's sender paid 0.4-1.2 ms of CPU for 6.2 MB sent whole, 0.9-1.1 ms in 64 KiB pieces), bounded by
SO_SNDTIMEO/SO_RCVTIMEO, so a dead peer is an error, not a hang; a reader looks for the next message with
MSG_DONTWAIT. ZeroMQ stays the wire of the fake NPU's windows (afd.npu.remote). Measured against it
(docs/benchmarks.md, "The stream wire"): 23% less CPU per micro-batch layer over a whole two-host run encrypted,
3% trusted, and 1.2-1.5x the rate.
"""
from __future__ import annotations

import socket
import struct
import time

from .errors import KernelError

SCHEME = "stream+tcp://"  # an agent's endpoint on the stream wire
MAGIC = 0xAF
PREFIX = struct.Struct("<BcBBIQ")  # magic, op, meta frames, sealed, head bytes, body bytes
_MLEN = struct.Struct("<I")
_READ_CHUNK = 1 << 18  # a reader's buffer: many small messages per recv
SOCKET_BUFFER = 4 << 20  # (the kernel caps it at net.core.[rw]mem_max, 4 MiB here)


def address(endpoint: str) -> tuple[str, int]:
    host, port = endpoint[len(SCHEME):].rsplit(":", 1)
    return host.strip("[]"), int(port)


def _buffers(sock: socket.socket) -> None:
    # a whole micro-batch's rows fit in the kernel's buffers: the writer's send returns once they are copied in,
    # without waiting for the agent to be scheduled and read them (the overlap ZeroMQ's I/O thread gave)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def _tune(sock: socket.socket, timeout_s: float) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a flag message goes out now, not with the next
    sock.settimeout(None)  # (Python's own timeout polls around every call: the kernel's bounds the waits instead)
    bound = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)


def connect(endpoint: str, timeout_s: float) -> socket.socket:
    host, port = address(endpoint)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        _buffers(sock)  # (before the connection: the window scale is agreed in the handshake)
        sock.settimeout(timeout_s)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    _tune(sock, timeout_s)
    return sock


def listen(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _buffers(sock)  # (the accepted connections inherit them)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def accept(listener: socket.socket, timeout_s: float) -> socket.socket | None:
    try:
        sock, _ = listener.accept()
    except BlockingIOError:
        return None
    _tune(sock, timeout_s)
    return sock


def head_bytes(op: bytes, meta: list, body_len: int, seal: bytes = b"", tag: bytes = b"") -> bytes:
    """The prefix and head of a message (the body goes beside it, where it is)."""
    parts = [seal]
    for m in meta:
        parts += [_MLEN.pack(len(m)), m]
    parts.append(tag)
    head = b"".join(parts)
    return PREFIX.pack(MAGIC, op, len(meta), 1 if seal else 0, len(head), body_len) + head


def send_all(sock: socket.socket, parts: list, timeout_s: float, what: str) -> None:
    """Send every byte of parts (bytes / buffers) in order: one sendmsg when the kernel takes them all."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    deadline = time.monotonic() + timeout_s
    while views:
        try:
            n = sock.sendmsg(views)
        except BlockingIOError:  # (SO_SNDTIMEO passed with nothing sent)
            n = 0
        except OSError as exc:
            raise KernelError("window", f"{what}: {exc}") from None
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0
        if views and time.monotonic() >= deadline:
            raise KernelError("window", f"{what}: the peer took nothing for {timeout_s:g}s")


class Reader:
    """The receiving end of one connection: heads from a reusable buffer, bodies straight into the caller's."""

    def __init__(self, sock: socket.socket, timeout_s: float, what: str):
        self.sock, self.timeout_s, self.what = sock, timeout_s, what
        self.buf = bytearray(_READ_CHUNK)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0
        self.closed = False

    def _recv(self, into: memoryview, block: bool, deadline: float | None, flags: int = 0) -> int:
        """Bytes received into `into`: what is there (0 when not block), or (block) at least one, waiting in the
        kernel (all of them with MSG_WAITALL) up to SO_RCVTIMEO at a time, until the deadline."""
        while True:
            try:
                n = self.sock.recv_into(into, 0, flags if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not block:
                    return 0
                if time.monotonic() >= deadline:
                    raise KernelError("window", f"{self.what}: no progress for {self.timeout_s:g}s") from None
                continue
            except OSError as exc:
                raise KernelError("window", f"{self.what}: {exc}") from None
            if n == 0:
                self.closed = True
                raise KernelError("window", f"{self.what}: the connection closed")
            return n

    def _fill(self, need: int, block: bool, deadline: float | None) -> bool:
        """At least `need` bytes buffered; False (nothing taken) when not block and they are not there yet."""
        if self.hi - self.lo >= need:
            return True
        if self.lo and (self.hi == self.lo or len(self.buf) - self.lo < need):
            self.buf[:self.hi - self.lo] = self.buf[self.lo:self.hi]
            self.hi, self.lo = self.hi - self.lo, 0
        if len(self.buf) < need:
            self.buf.extend(bytes(need - len(self.buf)))
            self.view = memoryview(self.buf)
        while self.hi - self.lo < need:
            n = self._recv(self.view[self.hi:], block, deadline)
            if n == 0:
                return False
            self.hi += n
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self.view[self.lo:self.lo + n])
        self.lo += n
        return out

    def read_head(self, block: bool) -> tuple | None:
        """(op, seal, meta, head tag, body bytes) of the next message; None when not block and none has begun
        arriving (a message that began is read to its end, bounded by the timeout)."""
        deadline = time.monotonic() + self.timeout_s
        if not self._fill(PREFIX.size, block, deadline):
            if self.hi == self.lo:
                return None
            self._fill(PREFIX.size, True, deadline)  # (a message is on its way)
        magic, op, count, sealed, head_len, body_len = PREFIX.unpack_from(self.buf, self.lo)
        if magic != MAGIC or head_len > 1 << 24:
            raise KernelError("window", f"{self.what}: not a window transport message")
        self.lo += PREFIX.size
        self._fill(head_len, True, deadline)
        end = self.lo + head_len
        seal = self._take(32) if sealed else b""
        meta = []
        for _ in range(count):
            if self.lo + 4 > end:
                raise KernelError("window", f"{self.what}: a message head that does not add up")
            (n,) = _MLEN.unpack_from(self.buf, self.lo)
            self.lo += 4
            if self.lo + n > end:
                raise KernelError("window", f"{self.what}: a message head that does not add up")
            meta.append(self._take(n))
        tag = self._take(end - self.lo) if sealed else b""
        if self.lo != end:
            raise KernelError("window", f"{self.what}: a message head that does not add up")
        return op, seal, meta, tag, body_len

    def read_into(self, out) -> None:
        """Exactly len(out) body bytes into out: what is buffered, then straight from the socket."""
        out = memoryview(out).cast("B")
        have = min(self.hi - self.lo, len(out))
        out[:have] = self.view[self.lo:self.lo + have]
        self.lo += have
        deadline = time.monotonic() + self.timeout_s
        while have < len(out):
            have += self._recv(out[have:], True, deadline, socket.MSG_WAITALL)
