"""The hccl process group of the fake NPU: windows shared between ranks, the group name the operators resolve,
collectives through gloo.

`dist.init_process_group(backend="hccl")` under torchrun, or `_new_process_group_helper(..., Backend("hccl"), ...)`
over a `tcp://` rendezvous as afd-plugin builds its window group, makes a ProcessGroupHCCL; its `_get_backend(npu)`
is itself, with torch_npu's calls: `get_hccl_comm_name(rank)` (the name `npu_attention_to_ffn` /
`npu_ffn_to_attention` take as `group`), `_window_register_and_exchange(size, peer_ranks)` and `_get_window_mem()`.
`exchange_windows(group, window_addr, window_size)` exposes a caller's own npu memory instead (cann_ops_transformer's
buffers); both take one path. `destroy_process_group` releases the group and its windows.

A window lies in a memfd segment of its rank. Ranks on one host (the same host name and torchrun node rank) map each
other's windows through /proc/<pid>/fd/<fd>, so one-sided writes are plain stores into the peer's memory (data
before flag, as afd.comm does it); ranks on different nodes, each its own shared-memory namespace like afd-sim's
`hosts:`, reach a peer's window through afd-sim's window transport (afd.comm_remote): every rank serves its own
window to remote writers in order. What each rank published (pid, host, memfd, offset, size, transport endpoint)
goes through the group's c10d store.
"""
from __future__ import annotations

import json
import mmap
import operator
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .. import comm
from ..errors import AfdError
from . import faults, tensors, watchdog
from .memory import memory
from .streams import current_stream
from .tensors import as_cpu

WINDOW_KEY = "afd_window/{tag}/{rank}"  # one tag per exposure: "reg<n>" (torch_npu's calls), "x<n>" (exchange_windows)
NAME_KEY = "afd_comm_name"
_groups: dict[str, "ProcessGroupHCCL"] = {}  # comm name -> this process's group
# Guards _groups and each exposure's peers against the readers on other threads (a stream's watchdog asks who owes
# a flag: peer_pid, peer_ranks) while the caller's thread registers, maps and releases.
_lock = threading.Lock()
_writer_groups: dict[tuple[str, int], tuple[comm.Group, comm.Group]] = {}  # -> (group, as written)


def host_id() -> str:
    """Ranks with the same host id share memory: the host name and torchrun's node rank (GROUP_RANK)."""
    return os.environ.get("AFD_NPU_HOST") or f"{socket.gethostname()}/node{os.environ.get('GROUP_RANK', '0')}"


class WindowError(AfdError):
    """A window could not be registered, exchanged or mapped."""


@dataclass(frozen=True)
class ExchangedWindows:
    """What exchange_windows made reachable: the group's comm name (the `group` the operators take), this rank,
    and every rank's window as that rank published it (its own device address and size)."""

    group_name: str
    rank: int
    world_size: int
    addresses: tuple[int, ...]
    sizes: tuple[int, ...]


def _npu_to_cpu(tensors_):
    return [as_cpu(t) if isinstance(t, torch.Tensor) else t for t in tensors_]


def _sync(tensors_) -> None:
    """Collectives read what the streams wrote: wait for the current stream of each device involved."""
    for index in {t.device.index or 0 for t in tensors_ if isinstance(t, torch.Tensor) and t.device.type == "npu"}:
        current_stream(index).synchronize()


class _Exposure:
    """One window of this rank in a group, published under its tag, and the peers' windows of the same tag mapped:
    the one path both torch_npu's `_window_register_and_exchange` and `exchange_windows` take."""

    def __init__(self, pg: "ProcessGroupHCCL", tag: str, address: int, size: int, tensor=None):
        self.pg, self.tag, self.address, self.size = pg, tag, int(address), int(size)
        self.tensor = tensor  # the window's tensor when this group allocated it (torch_npu's registered window)
        self.local = comm.LocalWindow(memory, self.address, self.size)
        self.peers: dict[int, dict] = {}
        self.maps: list[mmap.mmap] = []
        self.server = None

    def key(self, rank: int) -> str:
        return WINDOW_KEY.format(tag=self.tag, rank=rank)

    def publish(self) -> None:
        """Serve this window to writers on other nodes and publish where it is (after it holds what it should)."""
        from .remote import WindowServerThread
        fd, offset = memory.locate(self.address, field="window")
        self.server = WindowServerThread(self.address, self.size)
        info = {"pid": os.getpid(), "host": host_id(), "fd": fd, "offset": offset, "size": self.size,
                "address": self.address, "endpoint": self.server.endpoint}
        self.pg._store.set(self.key(self.pg.rank()), json.dumps(info))

    def map(self, peers) -> None:
        """Map the peers' windows, then wait until each peer has mapped its own peers: an exchange is collective,
        so no rank returns (and may exit, taking its memfd with it) while another still has to open its window.
        A failure is published in this rank's place, so the peers raise at once instead of waiting."""
        done = WINDOW_KEY.format(tag=self.tag, rank=f"mapped/{self.pg.rank()}")
        try:
            for p in peers:
                if p not in self.peers:
                    peer = self._map_peer(p, self._read(self.key(p), p, "expose its window"))
                    with _lock:
                        self.peers[p] = peer
        except BaseException as exc:
            self.pg._store.set(done, json.dumps({"error": str(exc)}))
            raise
        self.pg._store.set(done, "{}")
        for p in peers:
            self._read(WINDOW_KEY.format(tag=self.tag, rank=f"mapped/{p}"), p, "map its peers' windows")

    def _read(self, key: str, rank: int, what: str) -> dict:
        info = json.loads(self.pg._get(key))
        if "error" in info:
            raise WindowError("group", f"rank {rank} could not {what}: {info['error']}")
        return info

    def _map_peer(self, rank: int, info: dict) -> dict:
        if info["host"] == host_id():
            path = f"/proc/{info['pid']}/fd/{info['fd']}"
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as exc:
                raise WindowError("peer_ranks", f"cannot open rank {rank}'s window at {path}: {exc}") from None
            try:
                mm = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self.maps.append(mm)
            data = np.frombuffer(mm, np.uint8, info["size"], info["offset"])
            return {**info, "window": comm.LocalWindow.over(data)}
        from .remote import remote_window
        return {**info, "window": remote_window(info), "pid": None}  # no liveness check across hosts

    def windows(self) -> dict[int, comm.Window]:
        return {self.pg.rank(): self.local, **{r: p["window"] for r, p in self.peers.items()}}

    def release(self) -> None:
        """Stop serving, close the links to remote peers, unmap the peers' windows (a mapping a view still uses
        goes with that view), and let go of a window this group allocated. A caller's memory stays as it is."""
        if self.server is not None:
            self.server.close()
            self.server = None
        with _lock:
            peers, self.peers = self.peers, {}
        for p in peers.values():
            close = getattr(p["window"], "close", None)
            if close is not None:
                close()
        self.local = self.tensor = None
        for mm in self.maps:
            try:
                mm.close()
            except BufferError:
                pass
        self.maps.clear()


class ProcessGroupHCCL(dist.ProcessGroup):
    """torch_npu's hccl backend on the fake NPU (a ProcessGroup, and its own npu backend)."""

    def __init__(self, store, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        self._store = store
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, timeout)
        # A ProcessGroup's name lives on its registered backends (none: "ProcessGroup name not set", and
        # destroy_process_group fails); the gloo beside it is the one C++ can hold.
        self._register_backend(torch.device("npu"), dist.ProcessGroup.BackendType.CUSTOM, self._gloo)
        if rank == 0:
            store.set(NAME_KEY, f"afd_hccl_{uuid.uuid4().hex[:16]}")
        self._name = self._get(NAME_KEY).decode()
        self._exposure: _Exposure | None = None
        self._tags: dict[str, int] = {}
        self._closed = False
        with _lock:
            _groups[self._name] = self
        comm.register(comm.Group(self._name, size))  # the name resolves from the start; windows come later

    # -- what torch_npu's backend offers -----------------------------------------------------------------------
    def _get_backend(self, device=None):
        return self

    def get_hccl_comm_name(self, rank: int = 0, init_comm: bool = True) -> str:
        return self._name

    def getBackendName(self) -> str:
        return "hccl"

    def name(self) -> str:
        return "hccl"

    def _window_register_and_exchange(self, size: int, peer_ranks) -> None:
        """Register this rank's window of `size` bytes and map the windows of `peer_ranks`; collective among them."""
        size, peers = int(size), [int(p) for p in peer_ranks]
        if size <= 0:
            raise WindowError("size", f"window size must be > 0, got {size}")
        for p in peers:
            if not 0 <= p < self.size() or p == self.rank():
                raise WindowError("peer_ranks", f"{p} is not another rank of this group (size {self.size()})")
        if self._exposure is None:
            window = tensors.npu_bytes(size, own_segment=True)  # memfd pages start zeroed
            as_cpu(window).zero_()
            self._expose("reg", window.data_ptr(), size, window)
        elif self._exposure.tensor is None:
            raise WindowError("group", "this rank's window in this group came from exchange_windows; "
                                       "release_windows first")
        elif self._exposure.size < size:
            raise WindowError("size", f"this rank's window is already registered with {self._exposure.size} bytes")
        self._map(peers)

    def _get_window_mem(self) -> torch.Tensor:
        if self._exposure is None or self._exposure.tensor is None:
            raise WindowError("window", "no window is registered; call _window_register_and_exchange first")
        return self._exposure.tensor

    def shutdown(self) -> None:
        """destroy_process_group: the windows are released and the comm name no longer resolves."""
        if self._closed:
            return
        self._closed = True
        self._release()
        comm.unregister(self._name)
        with _lock:
            _groups.pop(self._name, None)
        super().shutdown()

    # -- the exchange -----------------------------------------------------------------------------------------------
    def _get(self, key: str) -> bytes:
        """store.get in slices, so a dead launcher ends the wait (the store's own timeout is the job's)."""
        deadline = time.monotonic() + max(60.0, 2 * watchdog.stall_timeout_s())
        while True:
            try:
                self._store.wait([key], timedelta(seconds=0.5))
                return self._store.get(key)
            except (RuntimeError, dist.DistStoreError) as exc:
                watchdog.check_parent()
                if time.monotonic() > deadline:
                    raise WindowError(key, f"rank {self.rank()}: nothing was published under it within "
                                           f"{deadline:.0f}s ({exc})") from None

    def _next_tag(self, kind: str) -> str:
        """A fresh store tag; every rank counts its exposures of a kind alike, since each is collective."""
        n = self._tags[kind] = self._tags.get(kind, 0) + 1
        return f"{kind}{n}"

    def _expose(self, kind: str, address: int, size: int, tensor=None) -> _Exposure:
        if self._closed:
            raise WindowError("group", f"process group {self._name} was destroyed")
        exposure = _Exposure(self, self._next_tag(kind), address, size, tensor)
        exposure.publish()
        self._exposure = exposure
        return exposure

    def _refuse(self, kind: str, error: AfdError) -> None:
        """This rank cannot expose a window: tell the peers (they fail at once instead of waiting), then raise."""
        key = WINDOW_KEY.format(tag=self._next_tag(kind), rank=self.rank())
        self._store.set(key, json.dumps({"error": str(error)}))
        raise error

    def _map(self, peers) -> None:
        try:
            self._exposure.map(peers)
        except BaseException:
            self._release()
            raise
        comm.register(comm.Group(self._name, self.size(), self._exposure.windows()))
        _writer_groups.pop((self._name, self.rank()), None)

    def _release(self) -> None:
        exposure, self._exposure = self._exposure, None
        if exposure is not None:
            exposure.release()
        _writer_groups.pop((self._name, self.rank()), None)
        if not self._closed:
            comm.register(comm.Group(self._name, self.size()))

    # -- collectives, through gloo over CPU aliases -------------------------------------------------------------------
    def allreduce(self, tensors_, opts=None):
        _sync(tensors_)
        return self._gloo.allreduce(_npu_to_cpu(tensors_), opts or dist.AllreduceOptions())

    def broadcast(self, tensors_, opts=None):
        _sync(tensors_)
        return self._gloo.broadcast(_npu_to_cpu(tensors_), opts or dist.BroadcastOptions())

    def allgather(self, output_tensors, input_tensors, opts=None):
        _sync(list(input_tensors) + [t for ts in output_tensors for t in ts])
        return self._gloo.allgather([_npu_to_cpu(ts) for ts in output_tensors], _npu_to_cpu(input_tensors),
                                    opts or dist.AllgatherOptions())

    def _allgather_base(self, output, input, opts=None):
        _sync([output, input])
        return self._gloo._allgather_base(as_cpu(output), as_cpu(input), opts or dist.AllgatherOptions())

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        _sync(list(output_tensors) + [t for ts in input_tensors for t in ts])
        return self._gloo.reduce_scatter(_npu_to_cpu(output_tensors), [_npu_to_cpu(ts) for ts in input_tensors],
                                         opts or dist.ReduceScatterOptions())

    def _reduce_scatter_base(self, output, input, opts=None):
        _sync([output, input])
        return self._gloo._reduce_scatter_base(as_cpu(output), as_cpu(input), opts or dist.ReduceScatterOptions())

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _sync([output, input])
        return self._gloo.alltoall_base(as_cpu(output), as_cpu(input), output_split_sizes, input_split_sizes,
                                        opts or dist.AllToAllOptions())

    def reduce(self, tensors_, opts=None):
        _sync(tensors_)
        return self._gloo.reduce(_npu_to_cpu(tensors_), opts or dist.ReduceOptions())

    def send(self, tensors_, dst, tag=0):
        _sync(tensors_)
        return self._gloo.send(_npu_to_cpu(tensors_), dst, tag)

    def recv(self, tensors_, src, tag=0):
        _sync(tensors_)
        return self._gloo.recv(_npu_to_cpu(tensors_), src, tag)

    def barrier(self, opts=None):
        return self._gloo.barrier(opts or dist.BarrierOptions())


def _create(store, rank, size, timeout):
    return ProcessGroupHCCL(store, rank, size, timeout)


def install() -> None:
    """Make `backend="hccl"` a torch.distributed backend for npu tensors (once)."""
    if "HCCL" not in dist.Backend._plugins:
        dist.Backend.register_backend("hccl", _create, devices=["npu"])


# -- a caller's npu memory as a rank's window (what cann_ops_transformer's buffers do) -------------------------------
def _hccl(group, live: bool = True) -> ProcessGroupHCCL:
    """The fake hccl group behind a ProcessGroup, its npu backend, or its comm name (live: not destroyed)."""
    if isinstance(group, str):
        found = _groups.get(group)
        if found is None:
            raise WindowError("group", f"no hccl process group with comm name {group!r} in this process")
        return found
    if not isinstance(group, ProcessGroupHCCL) and hasattr(group, "_get_backend"):
        try:
            group = group._get_backend(torch.device("npu"))
        except RuntimeError:
            pass
    if not isinstance(group, ProcessGroupHCCL):
        raise WindowError("group", f"{type(group).__name__} is not an hccl process group of the fake NPU "
                                   "(make it with backend 'hccl')")
    if live and group._closed:
        raise WindowError("group", f"process group {group._name} was destroyed")
    return group


def _check_window(window_addr, window_size) -> tuple[int, int]:
    """(address, size) of a window that lies in one live npu allocation of this process; else names the argument."""
    given = {"window_addr": window_addr, "window_size": window_size}
    for name, value in given.items():
        try:
            if isinstance(value, bool):
                raise TypeError
            given[name] = operator.index(value)
        except TypeError:
            raise WindowError(name, f"must be an int, got {type(value).__name__}") from None
    window_addr, window_size = given.values()
    if window_addr <= 0:
        raise WindowError("window_addr", f"must be a positive npu device address (a tensor's data_ptr()), "
                                         f"got {window_addr}")
    if window_size <= 0:
        raise WindowError("window_size", f"must be a positive number of bytes, got {window_size}")
    with memory._lock:
        block = memory.find(window_addr)
        live = block is not None and block.live
    if block is None:
        raise WindowError("window_addr", f"{window_addr:#x} is not npu memory of this process (no allocation "
                                         "covers it)")
    if not live:
        raise WindowError("window_addr", f"{window_addr:#x} lies in a freed npu block of {block.size} bytes at "
                                         f"{block.start:#x}: nothing owns it")
    if window_addr + window_size > block.end:
        raise WindowError("window_size", f"{window_size} bytes from {window_addr:#x} run past its npu allocation "
                                         f"of {block.size} bytes at {block.start:#x} (at most "
                                         f"{block.end - window_addr} bytes fit)")
    return window_addr, window_size


def exchange_windows(group, window_addr: int, window_size: int, *, zero: bool = False) -> ExchangedWindows:
    """Make this rank's window, `window_size` bytes of npu memory at `window_addr`, reachable by every rank of
    `group`, and every other rank's window reachable from here; collective: every rank of the group calls it.

    `group` is the hccl ProcessGroup (made by `init_process_group(backend="hccl")` or
    `_new_process_group_helper(..., Backend("hccl"), ...)` as afd-plugin does), its npu backend
    (`pg._get_backend(torch.device("npu"))`) or its comm name (`get_hccl_comm_name(rank)`). The window is the
    caller's memory, as serving code makes it: `t = torch.zeros(size, dtype=torch.uint8, device="npu")`, then
    `exchange_windows(pg, t.data_ptr(), size)`; it must lie in one live npu allocation of this process (else a
    WindowError names `window_addr` or `window_size`), and the caller keeps it alive until `release_windows`.
    Each rank publishes its own size, so windows may differ per rank (an attention window and an FFN window).
    `zero=True` zeroes the window once, before any peer can write into it (cann_ops_transformer's buffers ask).

    Afterwards the operators given the comm name reach rank r's window as `afd.comm.resolve(name).window(r)` (a
    peer on this host through its memfd, opened via /proc/<pid>/fd: nothing is named in /dev/shm, so a crash or
    SIGTERM leaves nothing; a peer on another torchrun node through afd's window transport). One window per rank
    and group at a time; release_windows (or destroy_process_group) ends it, and the group can then exchange
    another. A rank that fails the checks tells its peers, which raise at once instead of waiting for it.
    Returns the group's comm name, this rank, and every rank's published address and size.
    """
    pg = _hccl(group)
    try:
        if pg._exposure is not None:
            raise WindowError("group", f"this rank already has a window in group {pg._name}; release_windows "
                                       "first")
        address, size = _check_window(window_addr, window_size)
    except WindowError as exc:
        pg._refuse("x", exc)
    current_stream().synchronize()  # the window as the stream left it (a queued torch.zeros, say)
    if zero:
        memory.view(address, size, field="window_addr")[:] = 0
    exposure = pg._expose("x", address, size)
    pg._map([r for r in range(pg.size()) if r != pg.rank()])
    infos = {pg.rank(): {"address": address, "size": size}, **exposure.peers}
    ranks = range(pg.size())
    return ExchangedWindows(pg._name, pg.rank(), pg.size(), tuple(int(infos[r]["address"]) for r in ranks),
                            tuple(int(infos[r]["size"]) for r in ranks))


def release_windows(group) -> None:
    """This rank's window in `group` is no longer reachable from here (cann_ops_transformer's `destroy()`): the
    peers' windows are unmapped and this rank stops serving its own; the caller's memory stays as it is. The comm
    name still resolves, to a group without windows. Local, not collective; a second call, or one after
    destroy_process_group, does nothing."""
    if isinstance(group, str) and group not in _groups:
        return  # (its group was destroyed: destroy_process_group released everything)
    _hccl(group, live=False)._release()


# -- what the operators ask ---------------------------------------------------------------------------------------
def rank_in(group: comm.Group) -> int:
    """This process's rank in an operator's group."""
    pg = _groups.get(group.name)
    if pg is not None:
        return pg.rank()
    return watchdog.rank()


def _peers(pg: ProcessGroupHCCL) -> dict[int, dict]:
    """pg's mapped peers (with _lock held: the dict itself, not a copy)."""
    exposure = pg._exposure  # (read once: a release sets it to None)
    return exposure.peers if exposure is not None else {}


def peer_pid(rank: int, group_name: str | None = None) -> int | None:
    """The pid of a rank on this host whose window this process mapped (None if unknown or on another host), in
    the named group or the first group that knows the rank."""
    with _lock:
        pgs = [_groups[group_name]] if group_name in _groups else list(_groups.values())
        infos = [_peers(pg).get(rank) for pg in pgs]
    return next((info.get("pid") for info in infos if info is not None), None)


def peer_ranks() -> list[int]:
    """Every rank whose window this process mapped, in any group (safe from any thread)."""
    with _lock:
        return sorted({r for pg in _groups.values() for r in _peers(pg)})


def writer_group(group: comm.Group, rank: int) -> comm.Group:
    """The group as this rank writes into it: its windows with the rank's drop-flag / reorder faults applied."""
    key = (group.name, rank)
    kept = _writer_groups.get(key)
    if kept is None or kept[0] is not group:  # (a group registered anew has new windows)
        kept = _writer_groups[key] = (group, comm.Group(group.name, group.world_size,
                                                        {r: faults.window(w) for r, w in group.windows.items()}))
    return kept[1]
