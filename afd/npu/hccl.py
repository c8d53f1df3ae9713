"""The hccl process group of the fake NPU: windows shared between ranks, the group name the operators resolve,
collectives through gloo.

`dist.init_process_group(backend="hccl")` under torchrun makes a ProcessGroupHCCL; its `_get_backend(npu)` is
itself, with torch_npu's calls: `get_hccl_comm_name(rank)` (the name `npu_attention_to_ffn` / `npu_ffn_to_attention`
take as `group`), `_window_register_and_exchange(size, peer_ranks)` and `_get_window_mem()`.

A window is a memfd segment of its rank. Ranks on one host (the same host name and torchrun node rank) map each
other's windows through /proc/<pid>/fd/<fd>, so one-sided writes are plain stores into the peer's memory (data
before flag, as afd.comm does it); ranks on different nodes, each its own shared-memory namespace like afd-sim's
`hosts:`, reach a peer's window through afd-sim's window transport (afd.comm_remote): every rank serves its own
window to remote writers in order. What each rank published (pid, host, memfd, size, transport endpoint) goes
through the job's c10d store.
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import time
import uuid
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .. import comm
from ..errors import AfdError
from . import faults, tensors, watchdog
from .memory import memory
from .tensors import as_cpu

EXCHANGE_KEY = "afd_window/{rank}"
NAME_KEY = "afd_comm_name"
_groups: dict[str, "ProcessGroupHCCL"] = {}  # comm name -> this process's group
_writer_groups: dict[tuple[str, int], comm.Group] = {}


def host_id() -> str:
    """Ranks with the same host id share memory: the host name and torchrun's node rank (GROUP_RANK)."""
    return os.environ.get("AFD_NPU_HOST") or f"{socket.gethostname()}/node{os.environ.get('GROUP_RANK', '0')}"


class WindowError(AfdError):
    """A window could not be registered, exchanged or mapped."""


def _npu_to_cpu(tensors_):
    return [as_cpu(t) if isinstance(t, torch.Tensor) else t for t in tensors_]


def _sync(tensors_) -> None:
    """Collectives read what the streams wrote: wait for the current stream of each device involved."""
    from .module import current_stream
    for index in {t.device.index or 0 for t in tensors_ if isinstance(t, torch.Tensor) and t.device.type == "npu"}:
        current_stream(index).synchronize()


class ProcessGroupHCCL(dist.ProcessGroup):
    """torch_npu's hccl backend on the fake NPU (a ProcessGroup, and its own npu backend)."""

    def __init__(self, store, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        self._store = store
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, timeout)
        if rank == 0:
            store.set(NAME_KEY, f"afd_hccl_{uuid.uuid4().hex[:16]}")
        self._name = self._get(NAME_KEY).decode()
        self._window: torch.Tensor | None = None
        self._peers: dict[int, dict] = {}
        self._maps: list = []
        self._server = None
        _groups[self._name] = self

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
        if self._window is None:
            self._window = tensors.npu_bytes(size, own_segment=True)  # memfd pages start zeroed
            as_cpu(self._window).zero_()
            self._publish()
        elif self._window.numel() < size:
            raise WindowError("size", f"this rank's window is already registered with {self._window.numel()} bytes")
        for p in peers:
            if p not in self._peers:
                self._peers[p] = self._map_peer(p, json.loads(self._get(EXCHANGE_KEY.format(rank=p))))
        self._register_group()

    def _get_window_mem(self) -> torch.Tensor:
        if self._window is None:
            raise WindowError("window", "no window is registered; call _window_register_and_exchange first")
        return self._window

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

    def _publish(self) -> None:
        fd, offset = memory.locate(self._window.data_ptr(), field="window")
        info = {"pid": os.getpid(), "host": host_id(), "fd": fd, "offset": offset, "size": self._window.numel(),
                "address": self._window.data_ptr(), "endpoint": self._serve()}
        self._store.set(EXCHANGE_KEY.format(rank=self.rank()), json.dumps(info))

    def _serve(self) -> str:
        """Serve this rank's window to writers on other nodes (afd's window transport); its endpoint."""
        from .remote import WindowServerThread
        self._server = WindowServerThread(self._window.data_ptr(), self._window.numel())
        return self._server.endpoint

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
            self._maps.append(mm)
            data = np.frombuffer(mm, np.uint8, info["size"], info["offset"])
            info = {**info, "window": comm.LocalWindow.over(data)}
        else:
            from .remote import remote_window
            info = {**info, "window": remote_window(info), "pid": None}  # no liveness check across hosts
        return info

    def _register_group(self) -> None:
        windows = {self.rank(): comm.LocalWindow(memory, self._window.data_ptr(), self._window.numel())}
        windows.update({r: p["window"] for r, p in self._peers.items()})
        comm.register(comm.Group(self._name, self.size(), windows))
        _writer_groups.pop((self._name, self.rank()), None)

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


# -- what the operators ask ---------------------------------------------------------------------------------------
def rank_in(group: comm.Group) -> int:
    """This process's rank in an operator's group."""
    pg = _groups.get(group.name)
    if pg is not None:
        return pg.rank()
    return int(os.environ.get("RANK", "0"))


def peer_pid(rank: int) -> int | None:
    """The pid of a rank on this host whose window this process mapped (None if unknown or on another host)."""
    for pg in _groups.values():
        info = pg._peers.get(rank)
        if info is not None:
            return info.get("pid")
    return None


def peer_ranks() -> list[int]:
    return sorted({r for pg in _groups.values() for r in pg._peers})


def writer_group(group: comm.Group, rank: int) -> comm.Group:
    """The group as this rank writes into it: its windows with the rank's drop-flag / reorder faults applied."""
    key = (group.name, rank)
    wrapped = _writer_groups.get(key)
    if wrapped is None or wrapped.windows.keys() != group.windows.keys():
        wrapped = _writer_groups[key] = comm.Group(group.name, group.world_size,
                                                   {r: faults.window(w) for r, w in group.windows.items()})
    return wrapped
