"""The stream wire (afd.comm_stream) between a writer's StreamLink and an agent's StreamServer: puts applied in order,
rows taken straight into the window where their slots are contiguous, reads answered after the puts before them;
sealed with the run's key, it refuses replays, forgeries and other runs' messages, and wipes rows that do not open."""
from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
import zmq

from afd import comm_stream, device
from afd.comm import LocalWindow
from afd.comm_remote import AgentLink, LocalRegion, RemoteWindow, StreamLink, StreamServer, WindowServer
from afd.errors import KernelError
from afd.transport_seal import transport_key


class Agent:
    """A StreamServer over one 64 KiB region, served from a thread (as an agent's loop does)."""

    def __init__(self, key=None, mode="encrypted"):
        self.dev = device.Device()
        self.buf = self.dev.malloc(1 << 16)
        self.rung = []
        self.server = WindowServer({self.buf.address: LocalRegion(self.dev, self.buf.address, self.buf.size)},
                                   ring=self.rung.append, key=key, seal=mode)
        self.poller = zmq.Poller()
        self.stream = StreamServer(self.server, comm_stream.listen("127.0.0.1"), self.poller)
        self.endpoint = f"{comm_stream.SCHEME}127.0.0.1:{self.stream.listener.getsockname()[1]}"
        self.local = LocalWindow(self.dev, self.buf.address, self.buf.size)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.done.is_set():
            for fd, _ in self.poller.poll(10):
                self.stream.serve(fd)

    def settle(self, until=lambda: True, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not until():
            time.sleep(0.01)
        time.sleep(0.05)

    def close(self):
        self.done.set()
        self.thread.join()
        self.stream.close()
        self.dev.close()


@pytest.fixture
def agent_factory():
    agents = []

    def make(**kw):
        agents.append(Agent(**kw))
        return agents[-1]
    yield make
    for a in agents:
        a.close()


def _keys():
    return {"client_secret": zmq.curve_keypair()[1].decode()}


@pytest.mark.parametrize("mode", [None, "encrypted", "trusted"])
def test_stream_link_applies_in_order_in_place_and_reads_back(agent_factory, mode):
    keys = _keys() if mode else None
    agent = agent_factory(key=transport_key(keys), mode=mode or "encrypted")
    link = AgentLink(None, agent.endpoint, keys, "writer", "h", seal=mode or "encrypted")
    assert isinstance(link, StreamLink)  # the agent's scheme picks the wire
    win = RemoteWindow(link, agent.buf.address, agent.buf.size)
    rows = np.arange(6 * 32, dtype=np.int16).reshape(6, 32)  # 64-byte rows
    win.put_rows_of(1024, 64, np.arange(2, 8), rows, np.arange(6))  # contiguous slots: straight into the window
    win.put_rows(8192, 128, np.array([3, 0, 2]), rows[[5, 4, 3]])  # scattered slots (stride > width): copied in
    dup = np.repeat(np.arange(2), [3, 2])
    win.put_rows_of(16384, 64, np.array([4, 0, 2, 1, 3]), rows, dup)  # two rows travel, five slots get them
    win.put_i32(0, np.array([5, 6]), 1)
    win.put_i64(512, np.array([1]), 123456789012)
    link.ring("sched0")
    assert win.get_i32(0, 8).tolist() == [0, 0, 0, 0, 0, 1, 1, 0]  # answered after every put before it
    b = agent.local.bytes
    np.testing.assert_array_equal(b[1024 + 128:1024 + 512].view(np.int16).reshape(6, 32), rows)
    np.testing.assert_array_equal(b[8192:8192 + 512].reshape(4, 128)[[3, 0, 2], :64].copy().view(np.int16),
                                  rows[[5, 4, 3]])
    np.testing.assert_array_equal(b[16384:16384 + 320].reshape(5, 64).copy().view(np.int16)[[4, 0, 2, 1, 3]],
                                  rows[dup])
    assert b[512 + 8:512 + 16].view(np.int64)[0] == 123456789012
    st = agent.server.stats["writer"]
    assert agent.rung == ["sched0"] and agent.server.refused == 0
    assert st["in_place"] == 1 and st["row_messages"] == 3 and st["flags"] == 2
    with pytest.raises(KernelError, match="not a window"):
        RemoteWindow(link, agent.buf.address + 64, 64).get_i32(0, 1)  # a read outside the agent's windows
    link.close()


@pytest.mark.parametrize("mode", [None, "encrypted"])
def test_an_agent_compiles_nothing_at_its_puts(agent_factory, mode):
    """What an agent applies puts with is loaded when it starts (WindowServer: warm_up_copy_rows), read-only arrays
    included: an index parsed from a message's bytes is another type to numba, and a container whose cache lacked it
    compiled it at its first puts inside the run (the compose demo's hops: p99 160-290 ms)."""
    from afd.ops import _kernels
    keys = _keys() if mode else None
    agent = agent_factory(key=transport_key(keys), mode=mode or "encrypted")
    kernels = (_kernels.copy_rows, _kernels.stream_rows)
    loaded = [list(k.signatures) for k in kernels]
    link = AgentLink(None, agent.endpoint, keys, "writer", "h", seal=mode or "encrypted")
    win = RemoteWindow(link, agent.buf.address, agent.buf.size)
    rows = np.arange(6 * 32, dtype=np.int16).reshape(6, 32)
    win.put_rows_of(1024, 64, np.arange(2, 8), rows, np.arange(6))  # in place
    win.put_rows(8192, 128, np.array([3, 0, 2]), rows[[5, 4, 3]])  # scattered: the row copy
    win.put_rows_of(16384, 64, np.array([4, 0, 2, 1, 3]), rows, np.repeat(np.arange(2), [3, 2]))  # runs
    win.put_rows(24576, 66, np.array([1, 0]), rows[:2, :33].copy())  # not whole words: the byte copy
    assert win.get_i32(0, 1).tolist() == [0]  # (answered after every put before it)
    assert agent.server.refused == 0
    assert [list(k.signatures) for k in kernels] == loaded
    link.close()


def _capture(tap: socket.socket) -> bytes:
    """Everything a link sent to a tap (our stand-in for the wire) so far."""
    conn, _ = tap.accept()
    conn.settimeout(0.5)
    data = b""
    try:
        while chunk := conn.recv(1 << 20):
            data += chunk
    except TimeoutError:
        pass
    conn.close()
    return data


def _deliver(agent: Agent, wire: bytes) -> None:
    raw = socket.create_connection(comm_stream.address(agent.endpoint))
    raw.sendall(wire)
    agent.settle()
    raw.close()


def _tap():
    tap = socket.socket()
    tap.bind(("127.0.0.1", 0))
    tap.listen(4)
    return tap, f"{comm_stream.SCHEME}127.0.0.1:{tap.getsockname()[1]}"


@pytest.mark.parametrize("mode", ["encrypted", "trusted"])
def test_sealed_stream_refuses_replays_forgeries_and_other_runs(agent_factory, mode):
    keys = _keys()
    agent = agent_factory(key=transport_key(keys), mode=mode)
    rows = np.random.default_rng(0).integers(0, 1 << 15, (4, 32), dtype=np.int16)
    tap, endpoint = _tap()

    def sent(keys_, flip=None):
        """The bytes a link sealed with keys_ puts on the wire for 4 contiguous rows then their flags."""
        link = AgentLink(None, endpoint, keys_, "writer", "h", seal=mode)
        win = RemoteWindow(link, agent.buf.address, agent.buf.size)
        win.put_rows_of(1024, 64, np.arange(4), rows, np.arange(4))
        win.put_i32(0, np.arange(4), 1)
        link.close()
        wire = bytearray(_capture(tap))
        if flip is not None:
            wire[flip] ^= 1
        return bytes(wire)

    flags = lambda: agent.local.i32(0, 4).tolist()
    wire = sent(keys)
    assert (rows[1].tobytes() in wire) == (mode == "trusted")  # rows in clear only on a trusted network
    flag_put = wire.index(struct.pack("<BcBB", comm_stream.MAGIC, b"I", 2, 1))  # where the rows message ends
    # a changed row: refused once its body does not open, the rows it wrote are wiped, the link is dropped
    _deliver(agent, sent(keys, flip=flag_put - 20))
    assert agent.server.refused == 1 and flags() == [0] * 4
    assert not agent.local.bytes[1024:1024 + 256].any()
    # another run's key, or no seal at all: nothing written, nobody rung
    _deliver(agent, sent(_keys()))
    link = AgentLink(None, endpoint, None, "writer", "h")  # an unsealed writer
    RemoteWindow(link, agent.buf.address, agent.buf.size).put_i32(0, np.arange(4), 1)
    link.close()
    _deliver(agent, _capture(tap))
    assert agent.server.refused == 3 and flags() == [0] * 4
    # the run's own messages apply; the same bytes again are a replay
    _deliver(agent, wire)
    assert flags() == [1] * 4 and agent.server.refused == 3
    np.testing.assert_array_equal(agent.local.bytes[1024:1024 + 256].view(np.int16).reshape(4, 32), rows)
    agent.local.bytes[:16] = 0
    _deliver(agent, wire)
    assert agent.server.refused == 4 and flags() == [0] * 4
    tap.close()


def test_a_body_larger_than_any_window_is_refused_before_it_is_taken(agent_factory):
    agent = agent_factory()  # no key: nothing else would stop it
    head = comm_stream.head_bytes(b"R", [struct.pack("<QqqII", agent.buf.address, 0, 64, 1, 64),
                                         np.zeros(1, np.int64).tobytes()], 1 << 40)
    _deliver(agent, head)
    assert agent.server.refused == 1 and "larger than any window" in agent.server.last_error
    assert not agent.stream.conns  # the connection is closed
