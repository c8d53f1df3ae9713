"""The window transport across hosts: a writer's ordered one-sided puts travel over TCP to the owner host's agent.

Shared memory does not cross machines. When the owner of a window is on another host, the writer's Group holds a
`RemoteWindow` instead of a `LocalWindow`: every put becomes one message on the writer's single connection to that
host's agent, which applies the messages strictly in arrival order (one TCP connection keeps them in order) to the
owner's shared memory. So "slot data, then flag" stays true on the far side: a reader that sees a flag sees its slot.
`get_i32` (A2F backpressure reads the FFN header flag) is a request/reply on the same connection, so it is answered
after every earlier put of this writer was applied. A doorbell ring for a role on the other host travels the same way
(`AgentLink.ring`): the agent rings the local role after applying the puts before it.

Two wires carry the same messages. The agents serve the stream wire (`StreamLink` -> `StreamServer`, framing in
afd.comm_stream: raw TCP, the body handed to the kernel from where it is and read straight into the window rows when
its slots are one contiguous run, 4 MiB socket buffers); the fake NPU's ranks serve ZeroMQ (`AgentLink` DEALER ->
`WindowServer.handle` on a ROUTER). An `AgentLink` made for a `stream+tcp://` endpoint is a `StreamLink`.

Messages (op, meta frames, body; on ZeroMQ the agent's ROUTER adds the writer's identity in front):
  b"R" <QqqII address offset stride n width> index:int64[n] | rows:bytes[n*width]   put_rows
  b"r" <QqqII ...> index:int64[n] runs:int32[u] | rows:bytes[u*width]                 put_rows, equal adjacent rows
                                                                                       sent once (A2F: a token per
                                                                                       k slot)
  b"I" <Qq address offset> index:int64[n] | values:int32[n]                            put_i32
  b"L" <Qq address offset> index:int64[n] | values:int64[n]                            put_i64
  b"T" <Qq address offset> index:int64[n] | t_ns:int64                                 put_stamp: the agent's time
  b"G" <QqqQ address offset count seq> | -                      -> b"g" <Q seq> | int32[count], b"e" <Q seq> | text
  b"N" | role                                                                          ring a local role's doorbell
  b"H" writer | -                                                                      (stream) who the link is

Security (a run with CURVE keys, `control: {transport: tcp}`): every message is sealed with AES-256-GCM under a key
of its link (afd.transport_seal), derived from the run's CURVE client secret, which only the run's authenticated
peers hold; the agent applies nothing that does not open, and nothing it has opened before (a counter per link).
By default the bulk (rows, values) is encrypted; on a network the user declares trusted
(`control.trusted_network: true`) it travels in clear, still authenticated (GMAC over it). The sockets have no
CURVE: libzmq's CURVE (XSalsa20-Poly1305 per message, plus its copies) moved ~0.1-0.15 GB/s here. Without keys (the
fake NPU's windows) nothing is sealed.

Cost of one micro-batch layer's writes (6.9 MB: A2F's 48 token rows, F2A's 432 rows, flags), per side, measured
with the agent in its own process (loaded 2-core machine): the kernel's two copies ~1-2 ms of CPU each side (a raw
socket alone: sender 0.4-1.2 ms, receiver 1.0-1.2 ms), AES-GCM 0.6 ms each side (GMAC 0.27 trusted), the agent's
scatter of F2A rows into their slots (a permutation of one contiguous run) ~0.45 ms.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from typing import Callable

import numpy as np
import zmq

from . import comm_stream, control
from .comm import LocalWindow, check_ints, check_rows, check_source_rows
from .errors import KernelError
from .transport_seal import TAG_BYTES, TRUSTED, LinkSealer, SealOpener, transport_key

_ROWS = struct.Struct("<QqqII")
_PUT = struct.Struct("<Qq")
_GET = struct.Struct("<QqqQ")
_SEQ = struct.Struct("<Q")
SEND_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 5.0
log = logging.getLogger("afd.comm_remote")


class AgentLink:
    """One process's ordered connection to one host's agent: every remote window of that host shares it.

    seal: "encrypted" (default) or "trusted" seal every message with the run's key (afd.transport_seal) when keys
    are given; "curve" puts libzmq's CURVE on the socket instead (what every link did before; kept for the
    benchmark's side-by-side figure). Without keys nothing is sealed."""

    def __new__(cls, zctx, endpoint: str, *args, **kwargs):
        # an agent that serves the stream wire advertises its scheme: its links are StreamLinks (whoever makes them)
        if cls is AgentLink and endpoint.startswith(comm_stream.SCHEME):
            cls = StreamLink
        return super().__new__(cls)

    def __init__(self, zctx: zmq.Context, endpoint: str, keys: dict | None, identity: str, host: str = "?",
                 seal: str = "encrypted"):
        self.endpoint, self.host = endpoint, host
        self._stats_init()
        self.sock = control.socket(zctx, zmq.DEALER, identity=identity.encode(), sndhwm=10000, rcvhwm=1000)
        if seal == "curve":
            control.curve_client(self.sock, keys)
        self.sealer = LinkSealer(transport_key(keys), seal) if keys and seal != "curve" else None
        self.sock.connect(endpoint)

    def _stats_init(self) -> None:
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
        """Read int32s of a window of the agent's host, answered after every put sent before this on this link."""
        self._seq += 1
        seq = self._seq
        self.gets += 1
        t0 = time.perf_counter_ns()
        self.message(b"G", [_GET.pack(address, offset, count, seq)], b"")
        counter = self.sealer.counter if self.sealer is not None else 0
        try:
            kind, data = self._reply(seq, counter, time.monotonic() + REPLY_TIMEOUT_S)
        finally:
            self.get_ns += time.perf_counter_ns() - t0
        if kind == b"e":
            raise KernelError("window", f"host {self.host}: {data.decode(errors='replace')}")
        return np.frombuffer(data, dtype="<i4").copy()

    def _open_reply(self, counter: int, kind: bytes, seq_frame: bytes, body) -> bytes | None:
        return bytes(body) if self.sealer is None else self.sealer.open_reply(counter, [kind, seq_frame, body])

    def _reply(self, seq: int, counter: int, end: float) -> tuple[bytes, bytes]:
        """(kind, data) of the agent's reply to read `seq` (sealed with `counter`)."""
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            frames = self.sock.recv_multipart()
            if len(frames) != 3 or _SEQ.unpack(frames[1])[0] != seq:
                continue  # a late reply to an earlier request that timed out
            data = self._open_reply(counter, *frames)
            if data is not None:  # (None: does not open, not the agent's reply)
                return frames[0], data
        raise KernelError("window", f"no reply from the window agent of host {self.host} at {self.endpoint} "
                                    f"within {REPLY_TIMEOUT_S:g}s")

    def close(self) -> None:
        self.sock.close()

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


class StreamLink(AgentLink):
    """An AgentLink on the stream wire (afd.comm_stream): one raw TCP connection to an agent's StreamServer. A body
    goes to the kernel from where it is (trusted, none) or from a reusable ciphertext buffer (encrypted): sendmsg
    copies it before returning, so the caller may overwrite it at once."""

    def __init__(self, zctx, endpoint: str, keys: dict | None, identity: str, host: str = "?",
                 seal: str = "encrypted"):
        self.endpoint, self.host = endpoint, host
        self._stats_init()
        if seal == "curve":
            raise ValueError("a stream link seals with the run's key (encrypted or trusted), not CURVE")
        self.sealer = LinkSealer(transport_key(keys), seal) if keys else None
        self.what = f"the window agent of host {host} at {endpoint}"
        self.sock = comm_stream.connect(endpoint, SEND_TIMEOUT_S)
        self.reader = comm_stream.Reader(self.sock, REPLY_TIMEOUT_S, self.what)
        self._out = np.empty(0, np.uint8)  # the encrypted bodies' buffer, grown once
        self.message(b"H", [identity.encode()], b"")  # who this link is, in the agent's figures (sealed: proven)

    def message(self, op: bytes, meta: list, body, owned: bool = False) -> None:
        n = memoryview(body).nbytes
        if self.sealer is None:
            parts = [comm_stream.head_bytes(op, meta, n), body]
        else:
            t0 = time.perf_counter_ns()
            seal, tag = self.sealer.seal_head(op, meta, n + TAG_BYTES)
            if self.sealer.encrypts:
                if self._out.size < n + TAG_BYTES:
                    self._out = np.empty(n + TAG_BYTES + (n >> 3), np.uint8)
                sealed = self._out[:n + TAG_BYTES]
                self.sealer.seal_body_into(body, sealed)
                parts = [comm_stream.head_bytes(op, meta, n + TAG_BYTES, seal, tag), sealed]
            else:
                parts = [comm_stream.head_bytes(op, meta, n + TAG_BYTES, seal, tag), body, self.sealer.body_tag(body)]
            self.seal_ns += time.perf_counter_ns() - t0
        t0 = time.perf_counter_ns()
        comm_stream.send_all(self.sock, parts, SEND_TIMEOUT_S, self.what)
        self.send_ns += time.perf_counter_ns() - t0

    def _reply(self, seq: int, counter: int, end: float) -> tuple[bytes, bytes]:
        while time.monotonic() < end:
            op, _, meta, _, body_len = self.reader.read_head(True)
            body = bytearray(body_len)
            self.reader.read_into(body)
            if len(meta) != 1 or _SEQ.unpack(meta[0])[0] != seq:
                continue  # a late reply to an earlier request that timed out
            data = self._open_reply(counter, op, meta[0], body)
            if data is None:
                raise KernelError("window", f"{self.what}: a reply that does not open under the run's key")
            return op, data
        raise KernelError("window", f"no reply from {self.what} within {REPLY_TIMEOUT_S:g}s")

    def ring(self, role_id: str) -> None:
        self.rings += 1
        self.message(b"N", [], role_id.encode())  # (a stream cannot drop a message half sent: it waits, bounded)


def _rows_of(raw: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the bytes of raw[rows], owned): consecutive rows are sent from where they are (a link that keeps a body past
    the call copies it: owned False), others gathered once into a fresh buffer of ours."""
    lo = int(rows[0])
    if rows.size == 1 or (np.diff(rows) == 1).all():
        return raw[lo:lo + rows.size].reshape(-1), False
    return raw[rows].reshape(-1), True


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
        check_source_rows(index, src_index, src)
        raw = src.view(np.uint8).reshape(src.shape[0], width)
        header = _ROWS.pack(self.address, offset, stride, index.size, width)
        steps = np.diff(src_index)
        if steps.size and not steps.all():  # repeated source rows: each sent once, with its run length
            keep = np.ones(index.size, bool)
            keep[1:] = steps != 0
            runs = np.diff(np.append(np.flatnonzero(keep), index.size)).astype("<i4")
            self._send_rows(t0, b"r", [header, index.tobytes(), runs.tobytes()], *_rows_of(raw, src_index[keep]))
            return
        self._send_rows(t0, b"R", [header, index.tobytes()], *_rows_of(raw, src_index))

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

    def stats_of(self, who: str) -> dict:
        st = self.stats.get(who)
        if st is None:
            st = self.stats[who] = dict.fromkeys(("puts", "flags", "bytes", "gets", "rings", "open_ns", "apply_ns",
                                                  "transfer_ns", "ring_ns", "row_messages", "in_place"), 0)
        return st

    def refuse(self, who: str, exc: Exception) -> None:
        self.refused += 1
        self.last_error = f"from {who}: {exc}"
        if self.refused <= 3:
            log.warning("refused a remote write %s", self.last_error)

    def handle(self, sock: zmq.Socket, frames: list) -> None:
        """Apply one message from the agent's ROUTER ([identity, op, ...]; bytes, or zmq Frames received without a
        copy)."""
        t_recv = time.monotonic_ns()
        frames = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
        if len(frames) < 2:
            self.refused += 1
            return
        who, op = bytes(frames[0]).decode(errors="replace"), bytes(frames[1])
        st = self.stats_of(who)
        try:
            reply = None
            if self.opener is not None:
                t0 = time.perf_counter_ns()
                frames, reply, t_send = self.opener.open(frames)
                st["open_ns"] += time.perf_counter_ns() - t0
                if op in (b"R", b"r"):
                    st["transfer_ns"] += t_recv - t_send  # (one clock only when both hosts are one machine)

            def answer(kind: bytes, seq: bytes, data: bytes) -> None:
                sock.send_multipart([frames[0], kind, seq, data if reply is None else reply(kind, seq, data)])
            self.apply(st, op, frames[2:], answer)
        except (KernelError, struct.error, ValueError, IndexError) as exc:
            self.refuse(who, exc)

    def rows_in_place(self, meta: list) -> np.ndarray | None:
        """Where the rows of a b"R" message with this meta land when its slots are one contiguous run (F2A: a
        micro-batch's rows, slot after slot): the window's bytes, for the wire to take the body straight in; None
        when they do not (then the body is copied in by apply)."""
        address, offset, stride, n, width = _ROWS.unpack(meta[0])
        index = np.frombuffer(meta[1], dtype=np.int64)
        region = self.regions.get(address)
        if region is None or stride != width or index.size != n or n == 0:
            return None
        first = int(index[0])
        if n > 1 and not (np.diff(index) == 1).all():
            return None
        check_rows(region.size, offset, stride, index[[0, -1]], width)
        return region.bytes[offset + first * stride:offset + (first + n) * stride]

    def apply(self, st: dict, op: bytes, parts: list, answer: Callable[[bytes, bytes, bytes], None],
              placed: bool = False) -> None:
        """Apply one opened message: parts = its meta frames, then its body (None when placed: the wire took the
        rows straight into their slots, see rows_in_place). answer(kind, seq, data) replies to a read."""
        t0 = time.perf_counter_ns()
        if op in (b"R", b"r"):
            address, offset, stride, n, width = _ROWS.unpack(parts[0])
            index = np.frombuffer(parts[1], dtype=np.int64)
            region = self._region(address)
            if index.size != n:
                raise KernelError("window", f"{index.size} slots for {n} rows")
            if placed:
                st["bytes"] += n * width
                st["in_place"] += 1
            else:
                if op == b"R":
                    rows = np.frombuffer(parts[2], dtype=np.uint8).reshape(n, width)
                    source = np.arange(n, dtype=np.int64)
                else:
                    runs = np.frombuffer(parts[2], dtype="<i4")
                    rows = np.frombuffer(parts[3], dtype=np.uint8).reshape(runs.size, width)
                    if int(runs.sum()) != n or (runs <= 0).any():
                        raise KernelError("window", f"run lengths {runs.size} do not add up to {n} rows")
                    source = np.repeat(np.arange(runs.size, dtype=np.int64), runs)
                # each row copied once into its slot(s), with streaming stores: the reader is another process
                region.put_rows_of(offset, stride, index, rows, source, streaming=True)
                st["bytes"] += len(parts[-1])
            st["puts"] += 1
            st["row_messages"] += 1
        elif op in (b"I", b"L"):
            address, offset = _PUT.unpack(parts[0])
            index = np.frombuffer(parts[1], dtype=np.int64)
            region = self._region(address)
            if op == b"I":
                region.put_i32(offset, index, np.frombuffer(parts[2], dtype="<i4"))
                st["flags"] += int(index.size) if offset == 0 else 0
            else:
                region.put_i64(offset, index, np.frombuffer(parts[2], dtype="<i8"))
            st["puts"] += 1
        elif op == b"T":
            address, offset = _PUT.unpack(parts[0])
            now = time.monotonic_ns()
            self._region(address).put_i64(offset, np.frombuffer(parts[1], dtype=np.int64), now)
            if self.on_stamp is not None:
                self.on_stamp(now - struct.unpack("<q", parts[2])[0])
            st["puts"] += 1
        elif op == b"G":
            address, offset, count, seq = _GET.unpack(parts[0])
            st["gets"] += 1
            try:
                kind, data = b"g", self._region(address).get_i32(offset, count).tobytes()
            except KernelError as exc:
                kind, data = b"e", str(exc).encode()
            answer(kind, _SEQ.pack(seq), data)
        elif op == b"N":
            st["rings"] += 1
            if self.ring is not None:
                t1 = time.perf_counter_ns()
                self.ring(bytes(parts[-1]).decode())
                st["ring_ns"] += time.perf_counter_ns() - t1
            return
        else:
            raise KernelError("window", f"unknown operation {op[:8]!r}")
        st["apply_ns"] += time.perf_counter_ns() - t0


class StreamServer:
    """The agent's end of the stream wire (afd.comm_stream): accepts links on its listening socket, reads each one's
    messages in order and applies them through its WindowServer. A rows message whose slots are one contiguous run
    is taken straight into the window (trusted, none) or decrypted straight into it (encrypted), its head opened
    first; a body that then does not open is wiped where it landed, refused, and its connection closed (a stream
    that carried a forgery is not trusted further). poller: the agent's zmq.Poller, which gets every connection."""

    def __init__(self, server: WindowServer, listener, poller: zmq.Poller):
        self.server, self.listener, self.poller = server, listener, poller
        self.conns: dict[int, list] = {}  # fd -> [socket, reader, who]
        self._plain = np.empty(0, np.uint8)  # reusable bodies (no fresh, page-faulting buffer per message)
        self._sealed = np.empty(0, np.uint8)
        # no body is larger than the largest region (+ its tag): a bigger one is refused before anything is taken
        self._max_body = max((r.size for r in server.regions.values()), default=0) + (1 << 16)
        poller.register(listener.fileno(), zmq.POLLIN)

    def serve(self, fd: int, limit: int = 1000) -> None:
        """Handle what fd (the listener or a connection the poller reported) has: new links, or up to `limit`
        whole messages (a flood does not starve the agent's control plane)."""
        if fd == self.listener.fileno():
            while (sock := comm_stream.accept(self.listener, REPLY_TIMEOUT_S)) is not None:
                what = f"window link {sock.getpeername()}"
                self.conns[sock.fileno()] = [sock, comm_stream.Reader(sock, REPLY_TIMEOUT_S, what), "?"]
                self.poller.register(sock.fileno(), zmq.POLLIN)
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            for _ in range(limit):
                head = conn[1].read_head(False)
                if head is None:
                    return
                self._message(conn, *head)
        except (KernelError, struct.error, ValueError, IndexError) as exc:
            if not conn[1].closed:  # (a link that closed is a writer that ended, not a refusal)
                self.server.refuse(conn[2], exc)
            self._close(fd)

    def _close(self, fd: int) -> None:
        sock = self.conns.pop(fd)[0]
        self.poller.unregister(fd)
        sock.close()

    def close(self) -> None:
        for fd in list(self.conns):
            self._close(fd)
        self.poller.unregister(self.listener.fileno())
        self.listener.close()

    def _buffer(self, name: str, n: int) -> np.ndarray:
        buf = getattr(self, name)
        if buf.size < n:
            buf = np.empty(n + (n >> 3), np.uint8)
            setattr(self, name, buf)
        return buf[:n]

    def _message(self, conn: list, op: bytes, seal: bytes, meta: list, tag: bytes, body_len: int) -> None:
        server, opener = self.server, self.server.opener
        n, link, open_ns = body_len, None, 0
        if body_len > self._max_body:
            raise KernelError("window", f"a message body of {body_len} bytes: larger than any window here")
        if opener is not None:
            t0 = time.perf_counter_ns()
            if not seal or body_len < TAG_BYTES:
                raise KernelError("seal", "a message without the run's seal")
            link, counter, t_send = opener.open_head(op, seal, meta, body_len, tag)
            open_ns += time.perf_counter_ns() - t0
            n -= TAG_BYTES
        elif seal:
            raise KernelError("seal", "a sealed message for an agent without the run's key")
        dest = None
        if op == b"R" and len(meta) == 2:
            try:
                dest = server.rows_in_place(meta)
            except (KernelError, struct.error, ValueError):
                dest = None  # (apply refuses it, once its body is off the wire)
            if dest is not None and dest.size != n:
                dest = None
        target = dest if dest is not None else self._buffer("_plain", n)
        if opener is None:
            conn[1].read_into(target)
        else:
            sealed = self._buffer("_sealed", TAG_BYTES if opener.mode == TRUSTED else body_len)
            if opener.mode == TRUSTED:
                conn[1].read_into(target)
            conn[1].read_into(sealed)
            t0 = time.perf_counter_ns()
            try:
                opener.open_body(link, counter, sealed, target)
            except KernelError:
                if dest is not None:
                    dest[:] = 0  # what did not open does not stay in the window
                raise
            open_ns += time.perf_counter_ns() - t0
        if op == b"H":
            conn[2] = bytes(meta[0]).decode(errors="replace") if meta else "?"
            return
        st = server.stats_of(conn[2])
        st["open_ns"] += open_ns
        if opener is not None and op in (b"R", b"r"):
            st["transfer_ns"] += time.monotonic_ns() - t_send  # (one clock: both hosts are one machine)
        sock = conn[0]

        def answer(kind: bytes, seq: bytes, data: bytes) -> None:  # (a read's reply only: puts are not answered)
            data = data if opener is None else opener.replier(link, counter)(kind, seq, data)
            comm_stream.send_all(sock, [comm_stream.head_bytes(kind, [seq], len(data)), data], SEND_TIMEOUT_S,
                                 f"the reply to {conn[2]}")
        try:
            server.apply(st, op, [*meta, None if dest is not None else target], answer, placed=dest is not None)
        except (KernelError, struct.error, ValueError, IndexError) as exc:
            server.refuse(conn[2], exc)  # an authenticated message that does not apply: the link goes on
        if op == b"N":
            # the rung role takes the core now, before this agent goes on to the next body (F2A's next 6.2 MB):
            # the remote flag hop p50 went 0.45-1.15 ms -> 0.16-0.27 ms, the rate unchanged (same minutes, load 4)
            os.sched_yield()
