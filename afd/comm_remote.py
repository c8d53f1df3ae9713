"""The window transport across hosts: a writer's ordered one-sided puts travel over ZeroMQ TCP to the owner host's agent.

Shared memory does not cross machines. When the owner of a window is on another host, the writer's Group holds a
`RemoteWindow` instead of a `LocalWindow`: every put becomes one message on the writer's single DEALER connection to
that host's agent (`WindowServer`), which applies the messages strictly in arrival order (ZeroMQ keeps the order of
one connection) to the owner's shared memory. So "slot data, then flag" stays true on the far side: a reader that sees
a flag sees its slot. `get_i32` (A2F backpressure reads the FFN header flag) is a request/reply on the same
connection, so it is answered after every earlier put of this writer was applied. A doorbell ring for a role on the
other host travels the same way (`AgentLink.ring`): the agent rings the local role after applying the puts before it.

Wire format (binary frames, the agent's ROUTER adds the writer's identity in front):
  b"R" <QqqII address offset stride n width> index:int64[n] rows:bytes[n*width]   put_rows
  b"r" <QqqII ...> index:int64[n] runs:int32[u] rows:bytes[u*width]                 put_rows, equal adjacent rows sent
                                                                                     once (A2F: a token per k slot)
  b"I" <Qq address offset> index:int64[n] values:int32[n]                            put_i32
  b"L" <Qq address offset> index:int64[n] values:int64[n]                            put_i64 (stamps)
  b"G" <QqqQ address offset count seq>                          -> b"g" <Q seq> int32[count] | b"e" <Q seq> text
  b"N" role                                                                          ring a local role's doorbell
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Callable

import numpy as np
import zmq

from . import control
from .comm import LocalWindow
from .errors import KernelError

_ROWS = struct.Struct("<QqqII")
_PUT = struct.Struct("<Qq")
_GET = struct.Struct("<QqqQ")
_SEQ = struct.Struct("<Q")
SEND_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 5.0
log = logging.getLogger("afd.comm_remote")


def check_rows(size: int, offset: int, stride: int, index: np.ndarray, width: int) -> None:
    if offset < 0 or offset + int(index.max()) * stride + width > size or int(index.min()) < 0:
        raise KernelError("window", f"write of {index.size} rows at offset {offset} stride {stride} "
                                    f"runs past the {size}-byte window")


def check_ints(size: int, offset: int, index: np.ndarray, itemsize: int = 4) -> None:
    if offset < 0 or offset + itemsize * (int(index.max()) + 1) > size or int(index.min()) < 0:
        raise KernelError("window", f"int{8 * itemsize} write at offset {offset} index {int(index.max())} "
                                    f"runs past the {size}-byte window")


class AgentLink:
    """One process's ordered connection to one host's agent: every remote window of that host shares it."""

    def __init__(self, zctx: zmq.Context, endpoint: str, keys: dict | None, identity: str, host: str = "?"):
        self.endpoint, self.host = endpoint, host
        self.sock = control.socket(zctx, zmq.DEALER, identity=identity.encode(), sndhwm=10000, rcvhwm=1000)
        control.curve_client(self.sock, keys)
        self.sock.connect(endpoint)
        self._seq = 0
        self.puts = self.bytes = self.gets = self.rings = 0

    def send(self, frames: list) -> None:
        """Queue one message; blocks (bounded) only while the agent is not draining its queue."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            if not self.sock.poll(int(SEND_TIMEOUT_S * 1000), zmq.POLLOUT):
                raise KernelError("window", f"the window agent of host {self.host} at {self.endpoint} has not "
                                            f"drained its queue for {SEND_TIMEOUT_S:g}s") from None
            self.sock.send_multipart(frames)

    def put(self, frames: list) -> None:
        self.puts += 1
        self.bytes += sum(len(f) for f in frames)
        self.send(frames)

    def get_i32(self, address: int, offset: int, count: int) -> np.ndarray:
        self._seq += 1
        seq = self._seq
        self.gets += 1
        self.send([b"G", _GET.pack(address, offset, count, seq)])
        end = time.monotonic() + REPLY_TIMEOUT_S
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            frames = self.sock.recv_multipart()
            if len(frames) != 3 or _SEQ.unpack(frames[1])[0] != seq:
                continue  # a late reply to an earlier request that timed out
            if frames[0] == b"e":
                raise KernelError("window", f"host {self.host}: {frames[2].decode(errors='replace')}")
            return np.frombuffer(frames[2], dtype="<i4").copy()
        raise KernelError("window", f"no reply from the window agent of host {self.host} at {self.endpoint} "
                                    f"within {REPLY_TIMEOUT_S:g}s")

    def ring(self, role_id: str) -> None:
        """Wake a role on the agent's host, after every put sent before this on this link was applied."""
        self.rings += 1
        try:
            self.sock.send_multipart([b"N", role_id.encode()], zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up only: the window is the truth


class RemoteWindow:
    """A window owned by another host: puts are ordered messages to that host's agent, reads are requests."""

    def __init__(self, link: AgentLink, address: int, size: int):
        self.link, self.address, self.size = link, int(address), int(size)

    def put_rows(self, offset: int, stride: int, index: np.ndarray, rows: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        rows = np.ascontiguousarray(rows)
        width = rows.shape[1] * rows.dtype.itemsize
        check_rows(self.size, offset, stride, index, width)
        raw = rows.view(np.uint8).reshape(index.size, width)
        header = _ROWS.pack(self.address, offset, stride, index.size, width)
        if index.size > 1:
            words = raw.view(np.uint64) if width % 8 == 0 else raw
            keep = np.ones(index.size, bool)
            keep[1:] = ~(words[1:] == words[:-1]).all(axis=1)
            if not keep.all():  # A2F repeats a token's row for each of its K+1 slots on one rank: send it once
                runs = np.diff(np.append(np.flatnonzero(keep), index.size)).astype("<i4")
                self.link.put([b"r", header, index.tobytes(), runs.tobytes(), raw[keep].reshape(-1)])
                return
        self.link.put([b"R", header, index.tobytes(), raw.reshape(-1)])

    def put_i32(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index)
        values = np.broadcast_to(np.asarray(values, dtype="<i4"), index.shape)
        self.link.put([b"I", _PUT.pack(self.address, offset), index.tobytes(), np.ascontiguousarray(values).tobytes()])

    def put_i64(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index, 8)
        values = np.broadcast_to(np.asarray(values, dtype="<i8"), index.shape)
        self.link.put([b"L", _PUT.pack(self.address, offset), index.tobytes(), np.ascontiguousarray(values).tobytes()])

    def get_i32(self, offset: int, count: int) -> np.ndarray:
        if offset < 0 or offset + 4 * count > self.size:
            raise KernelError("window", f"read of {count} int32 at offset {offset} runs past the {self.size}-byte "
                                        f"window")
        return self.link.get_i32(self.address, offset, count)


class LocalRegion(LocalWindow):
    """A LocalWindow that also takes int64 puts (the F2A flag stamps in a session stream)."""

    def put_i64(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index, 8)
        self.bytes[offset:offset + 8 * (int(index.max()) + 1)].view("<i8")[index] = values


class WindowServer:
    """The agent's receiving end: applies remote puts to this host's regions in arrival order, answers reads, rings."""

    def __init__(self, regions: dict[int, LocalRegion], ring: Callable[[str], None] | None = None):
        self.regions = regions  # base address -> region: only the run's windows and stamp areas are writable
        self.ring = ring
        self.stats: dict[str, dict[str, int]] = {}
        self.refused = 0
        self.last_error = ""

    def _region(self, address: int) -> LocalRegion:
        region = self.regions.get(address)
        if region is None:
            raise KernelError("window", f"address {address:#x} is not a window of this host")
        return region

    def handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Apply one message from the agent's ROUTER ([identity, op, ...])."""
        if len(frames) < 2:
            self.refused += 1
            return
        who, op = frames[0].decode(errors="replace"), frames[1]
        st = self.stats.get(who)
        if st is None:
            st = self.stats[who] = {"puts": 0, "flags": 0, "bytes": 0, "gets": 0, "rings": 0}
        try:
            if op in (b"R", b"r"):
                address, offset, stride, n, width = _ROWS.unpack(frames[2])
                index = np.frombuffer(frames[3], dtype=np.int64)
                if op == b"R":
                    rows = np.frombuffer(frames[4], dtype=np.uint8).reshape(n, width)
                else:
                    runs = np.frombuffer(frames[4], dtype="<i4")
                    unique = np.frombuffer(frames[5], dtype=np.uint8).reshape(runs.size, width)
                    if int(runs.sum()) != n or (runs <= 0).any():
                        raise KernelError("window", f"run lengths {runs.size} do not add up to {n} rows")
                    rows = np.repeat(unique, runs, axis=0)
                self._region(address).put_rows(offset, stride, index, rows)
                st["puts"] += 1
                st["bytes"] += len(frames[-1])
            elif op in (b"I", b"L"):
                address, offset = _PUT.unpack(frames[2])
                index = np.frombuffer(frames[3], dtype=np.int64)
                region = self._region(address)
                if op == b"I":
                    region.put_i32(offset, index, np.frombuffer(frames[4], dtype="<i4"))
                    st["flags"] += int(index.size) if offset == 0 else 0
                else:
                    region.put_i64(offset, index, np.frombuffer(frames[4], dtype="<i8"))
                st["puts"] += 1
            elif op == b"G":
                address, offset, count, seq = _GET.unpack(frames[2])
                st["gets"] += 1
                try:
                    data = self._region(address).get_i32(offset, count).tobytes()
                    sock.send_multipart([frames[0], b"g", _SEQ.pack(seq), data])
                except KernelError as exc:
                    sock.send_multipart([frames[0], b"e", _SEQ.pack(seq), str(exc).encode()])
            elif op == b"N":
                st["rings"] += 1
                if self.ring is not None:
                    self.ring(frames[2].decode())
            else:
                raise KernelError("window", f"unknown operation {op[:8]!r}")
        except (KernelError, struct.error, ValueError, IndexError) as exc:
            self.refused += 1
            self.last_error = f"from {who}: {exc}"
            if self.refused <= 3:
                log.warning("refused a remote write %s", self.last_error)
