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
  b"L" <Qq address offset> index:int64[n] values:int64[n]                            put_i64
  b"T" <Qq address offset> index:int64[n] t_ns:int64                                 put_stamp: the agent's time
  b"G" <QqqQ address offset count seq>                          -> b"g" <Q seq> int32[count] | b"e" <Q seq> text
  b"N" role                                                                          ring a local role's doorbell

Security (a run with CURVE keys, `control: {transport: tcp}`): every message is sealed with AES-256-GCM under a key
of its link (afd.transport_seal), derived from the run's CURVE client secret, which only the run's authenticated
peers hold; the agent applies nothing that does not open, and nothing it has opened before (a counter per link).
By default the bulk (rows, values) is encrypted; on a network the user declares trusted
(`control.trusted_network: true`) it travels in clear, still authenticated (GMAC over it). The link's socket has
no CURVE: libzmq's CURVE (XSalsa20-Poly1305 per message, plus its copies) moved ~0.1-0.15 GB/s here, 45-64 ms for
one F2A payload of 6.2 MB, where AES-GCM seals it in ~0.7 ms. Without keys (the fake NPU's windows) nothing is
sealed, as before.
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
from .transport_seal import LinkSealer, SealOpener, transport_key

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
    """One process's ordered connection to one host's agent: every remote window of that host shares it.

    seal: "encrypted" (default) or "trusted" seal every message with the run's key (afd.transport_seal) when keys
    are given; "curve" puts libzmq's CURVE on the socket instead (what every link did before; kept for the
    benchmark's side-by-side figure). Without keys nothing is sealed."""

    def __init__(self, zctx: zmq.Context, endpoint: str, keys: dict | None, identity: str, host: str = "?",
                 seal: str = "encrypted"):
        self.endpoint, self.host = endpoint, host
        self.sock = control.socket(zctx, zmq.DEALER, identity=identity.encode(), sndhwm=10000, rcvhwm=1000)
        if seal == "curve":
            control.curve_client(self.sock, keys)
        self.sealer = LinkSealer(transport_key(keys), seal) if keys and seal != "curve" else None
        self.sock.connect(endpoint)
        self._seq = 0
        self.puts = self.bytes = self.gets = self.rings = 0
        # where a writer's time goes (afd bench's two-host breakdown): ns in building frames, sealing, sending,
        # and waiting for read replies
        self.serialize_ns = self.seal_ns = self.send_ns = self.get_ns = 0

    def stats(self) -> dict:
        return {"puts": self.puts, "bytes": self.bytes, "gets": self.gets, "rings": self.rings,
                "serialize_ns": self.serialize_ns, "seal_ns": self.seal_ns, "send_ns": self.send_ns,
                "get_ns": self.get_ns}

    def send(self, frames: list, copy: bool = True) -> None:
        """Queue one message; blocks (bounded) only while the agent is not draining its queue. copy=False sends the
        frames' buffers without a copy: only for buffers nobody writes again (fresh temporaries, ciphertexts)."""
        t0 = time.perf_counter_ns()
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            if not self.sock.poll(int(SEND_TIMEOUT_S * 1000), zmq.POLLOUT):
                raise KernelError("window", f"the window agent of host {self.host} at {self.endpoint} has not "
                                            f"drained its queue for {SEND_TIMEOUT_S:g}s") from None
            self.sock.send_multipart(frames, copy=copy)
        self.send_ns += time.perf_counter_ns() - t0

    def message(self, op: bytes, meta: list, body, owned: bool = False) -> None:
        """Send op + meta frames + body, sealed when the link seals. owned: body is a fresh buffer of ours."""
        if self.sealer is None:
            self.send([op, *meta, body], copy=not owned)
            return
        t0 = time.perf_counter_ns()
        frames = self.sealer.seal(op, meta, body)
        self.seal_ns += time.perf_counter_ns() - t0
        # an encrypted body is a fresh ciphertext; a trusted one is the body itself
        self.send(frames, copy=not (owned or self.sealer.encrypts))

    def put(self, op: bytes, meta: list, body, owned: bool = False) -> None:
        self.puts += 1
        self.bytes += sum(len(f) for f in meta) + memoryview(body).nbytes
        self.message(op, meta, body, owned)

    def get_i32(self, address: int, offset: int, count: int) -> np.ndarray:
        self._seq += 1
        seq = self._seq
        self.gets += 1
        t0 = time.perf_counter_ns()
        self.message(b"G", [_GET.pack(address, offset, count, seq)], b"")
        counter = self.sealer.counter if self.sealer is not None else 0
        end = time.monotonic() + REPLY_TIMEOUT_S
        try:
            while (left := end - time.monotonic()) > 0:
                if not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    break
                frames = self.sock.recv_multipart()
                if len(frames) != 3 or _SEQ.unpack(frames[1])[0] != seq:
                    continue  # a late reply to an earlier request that timed out
                data = frames[2] if self.sealer is None else self.sealer.open_reply(counter, frames)
                if data is None:
                    continue  # does not open: not the agent's reply
                if frames[0] == b"e":
                    raise KernelError("window", f"host {self.host}: {data.decode(errors='replace')}")
                return np.frombuffer(data, dtype="<i4").copy()
        finally:
            self.get_ns += time.perf_counter_ns() - t0
        raise KernelError("window", f"no reply from the window agent of host {self.host} at {self.endpoint} "
                                    f"within {REPLY_TIMEOUT_S:g}s")

    def ring(self, role_id: str) -> None:
        """Wake a role on the agent's host, after every put sent before this on this link was applied."""
        self.rings += 1
        try:
            if self.sealer is None:
                self.sock.send_multipart([b"N", role_id.encode()], zmq.NOBLOCK)
            else:
                self.sock.send_multipart(self.sealer.seal(b"N", [], role_id.encode()), zmq.NOBLOCK)
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
        t0 = time.perf_counter_ns()
        rows = np.ascontiguousarray(rows)
        width = rows.shape[1] * rows.dtype.itemsize
        check_rows(self.size, offset, stride, index, width)
        raw = rows.view(np.uint8).reshape(index.size, width)
        header = _ROWS.pack(self.address, offset, stride, index.size, width)
        if index.size > 1:
            words = raw.view(np.uint64) if width % 8 == 0 else raw
            keep = np.ones(index.size, bool)
            keep[1:] = ~(words[1:] == words[:-1]).all(axis=1)
            if not keep.all():  # equal adjacent rows (a token's row for each of its K+1 slots): send each once
                runs = np.diff(np.append(np.flatnonzero(keep), index.size)).astype("<i4")
                self._send_rows(t0, b"r", [header, index.tobytes(), runs.tobytes()], raw[keep].reshape(-1), True)
                return
        self._send_rows(t0, b"R", [header, index.tobytes()], raw.reshape(-1), False)

    def put_rows_of(self, offset: int, stride: int, index: np.ndarray, src: np.ndarray, src_index: np.ndarray,
                    streaming: bool = False) -> None:
        """put_rows(offset, stride, index, src[src_index]) from the source indices: equal adjacent indices (A2F: a
        token per k slot) are gathered and sent once, no row is compared; a run of consecutive source rows is
        sealed straight from src. (streaming is the owner's business: its agent applies with streaming stores.)"""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        if src.ndim != 2 or not src.flags.c_contiguous:
            self.put_rows(offset, stride, index, src[src_index])
            return
        t0 = time.perf_counter_ns()
        src_index = np.asarray(src_index, dtype=np.int64)
        width = src.shape[1] * src.dtype.itemsize
        check_rows(self.size, offset, stride, index, width)
        if src_index.shape != index.shape or int(src_index.min()) < 0 or int(src_index.max()) >= src.shape[0]:
            raise KernelError("window", f"source rows {src_index.tolist()[:8]} do not match {index.size} slots of "
                                        f"a source of {src.shape[0]} rows")
        raw = src.view(np.uint8).reshape(src.shape[0], width)
        header = _ROWS.pack(self.address, offset, stride, index.size, width)
        steps = np.diff(src_index)
        if steps.size and not steps.all():  # repeated source rows: each sent once, with its run length
            keep = np.ones(index.size, bool)
            keep[1:] = steps != 0
            runs = np.diff(np.append(np.flatnonzero(keep), index.size)).astype("<i4")
            self._send_rows(t0, b"r", [header, index.tobytes(), runs.tobytes()],
                            raw[src_index[keep]].reshape(-1), True)
            return
        lo = int(src_index[0])
        if (steps == 1).all() and self.link.sealer is not None and self.link.sealer.encrypts:
            self._send_rows(t0, b"R", [header, index.tobytes()], raw[lo:lo + index.size].reshape(-1), False)
            return  # (the ciphertext is the copy: sealing reads the rows where they are)
        self._send_rows(t0, b"R", [header, index.tobytes()], raw[src_index].reshape(-1), True)

    def _send_rows(self, t0: int, op: bytes, meta: list, body: np.ndarray, owned: bool) -> None:
        self.link.serialize_ns += time.perf_counter_ns() - t0
        self.link.put(op, meta, body, owned)

    def put_i32(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index)
        values = np.broadcast_to(np.asarray(values, dtype="<i4"), index.shape)
        self.link.put(b"I", [_PUT.pack(self.address, offset), index.tobytes()], np.ascontiguousarray(values).tobytes(),
                      True)

    def put_i64(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index, 8)
        values = np.broadcast_to(np.asarray(values, dtype="<i8"), index.shape)
        self.link.put(b"L", [_PUT.pack(self.address, offset), index.tobytes()], np.ascontiguousarray(values).tobytes(),
                      True)

    def put_stamp(self, offset: int, index: np.ndarray, t_ns: int) -> None:
        """Stamp int64 slots with the time the owner's agent applies this (its host's clock, the clock of the flag's
        reader); t_ns, the writer's time of the put, goes along for the agent's put -> store figure."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        check_ints(self.size, offset, index, 8)
        self.link.put(b"T", [_PUT.pack(self.address, offset), index.tobytes()], struct.pack("<q", t_ns), True)

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
    """The agent's receiving end: applies remote puts to this host's regions in arrival order, answers reads, rings.

    key/seal: the run's transport key and seal mode (afd.transport_seal): every message must open under its link's
    key, else it is refused; without a key messages are taken as they come (the fake NPU's windows)."""

    def __init__(self, regions: dict[int, LocalRegion], ring: Callable[[str], None] | None = None,
                 key: bytes | None = None, seal: str = "encrypted", on_stamp: Callable[[int], None] | None = None):
        from .ops._kernels import warm_up_copy_rows
        warm_up_copy_rows()  # the puts are applied with it: loaded (or compiled) now, not under a writer's timeout
        self.regions = regions  # base address -> region: only the run's windows and stamp areas are writable
        self.ring = ring
        self.on_stamp = on_stamp  # gets (this host's time - the writer's) of every stamp: one clock on one machine
        self.opener = SealOpener(key, seal) if key else None
        self.stats: dict[str, dict[str, int]] = {}
        self.refused = 0
        self.last_error = ""

    def _region(self, address: int) -> LocalRegion:
        region = self.regions.get(address)
        if region is None:
            raise KernelError("window", f"address {address:#x} is not a window of this host")
        return region

    def handle(self, sock: zmq.Socket, frames: list) -> None:
        """Apply one message from the agent's ROUTER ([identity, op, ...]; bytes, or zmq Frames received without a
        copy)."""
        t_recv = time.monotonic_ns()
        frames = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
        if len(frames) < 2:
            self.refused += 1
            return
        who, op = bytes(frames[0]).decode(errors="replace"), bytes(frames[1])
        st = self.stats.get(who)
        if st is None:
            st = self.stats[who] = dict.fromkeys(("puts", "flags", "bytes", "gets", "rings", "open_ns", "apply_ns",
                                                  "transfer_ns", "ring_ns", "row_messages"), 0)
        try:
            reply = None
            if self.opener is not None:
                t0 = time.perf_counter_ns()
                frames, reply, t_send = self.opener.open(frames)
                st["open_ns"] += time.perf_counter_ns() - t0
                if op in (b"R", b"r"):
                    st["transfer_ns"] += t_recv - t_send  # (one clock only when both hosts are one machine)
            t0 = time.perf_counter_ns()
            if op in (b"R", b"r"):
                address, offset, stride, n, width = _ROWS.unpack(frames[2])
                index = np.frombuffer(frames[3], dtype=np.int64)
                region = self._region(address)
                if op == b"R":
                    rows = np.frombuffer(frames[4], dtype=np.uint8).reshape(n, width)
                    source = np.arange(n, dtype=np.int64)
                else:
                    runs = np.frombuffer(frames[4], dtype="<i4")
                    rows = np.frombuffer(frames[5], dtype=np.uint8).reshape(runs.size, width)
                    if int(runs.sum()) != n or (runs <= 0).any():
                        raise KernelError("window", f"run lengths {runs.size} do not add up to {n} rows")
                    source = np.repeat(np.arange(runs.size, dtype=np.int64), runs)
                if index.size != n:
                    raise KernelError("window", f"{index.size} slots for {n} rows")
                # each row copied once into its slot(s), with streaming stores: the window's reader is another process
                region.put_rows_of(offset, stride, index, rows, source, streaming=True)
                st["puts"] += 1
                st["row_messages"] += 1
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
            elif op == b"T":
                address, offset = _PUT.unpack(frames[2])
                now = time.monotonic_ns()
                self._region(address).put_i64(offset, np.frombuffer(frames[3], dtype=np.int64), now)
                if self.on_stamp is not None:
                    self.on_stamp(now - struct.unpack("<q", frames[4])[0])
                st["puts"] += 1
            elif op == b"G":
                address, offset, count, seq = _GET.unpack(frames[2])
                st["gets"] += 1
                try:
                    kind, data = b"g", self._region(address).get_i32(offset, count).tobytes()
                except KernelError as exc:
                    kind, data = b"e", str(exc).encode()
                seq_frame = _SEQ.pack(seq)
                body = data if reply is None else reply(kind, seq_frame, data)
                sock.send_multipart([frames[0], kind, seq_frame, body])
            elif op == b"N":
                st["rings"] += 1
                if self.ring is not None:
                    t1 = time.perf_counter_ns()
                    self.ring(bytes(frames[2]).decode())
                    st["ring_ns"] += time.perf_counter_ns() - t1
            else:
                raise KernelError("window", f"unknown operation {op[:8]!r}")
            if op != b"N":
                st["apply_ns"] += time.perf_counter_ns() - t0
        except (KernelError, struct.error, ValueError, IndexError) as exc:
            self.refused += 1
            self.last_error = f"from {who}: {exc}"
            if self.refused <= 3:
                log.warning("refused a remote write %s", self.last_error)
