"""An emulated HCCL communication group: per-rank memory windows that one-sided writes land in."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .errors import KernelError


class Window(Protocol):
    """One rank's window as a writer sees it: ordered one-sided puts, and reads for backpressure."""

    size: int

    def put_rows(self, offset: int, stride: int, index: np.ndarray, rows: np.ndarray) -> None:
        """Write rows[i] at offset + index[i]*stride (bytes), in order."""

    def put_i32(self, offset: int, index: np.ndarray, values) -> None:
        """Write int32 values at offset + 4*index[i], after every earlier put to this window."""

    def get_i32(self, offset: int, count: int) -> np.ndarray:
        """Read `count` int32 at offset (a fresh copy)."""


def check_rows(size: int, offset: int, stride: int, index: np.ndarray, width: int) -> None:
    """Rows `width` bytes wide into slots `stride` apart from `offset` stay inside a `size`-byte window."""
    if offset < 0 or offset + int(index.max()) * stride + width > size or int(index.min()) < 0:
        raise KernelError("window", f"write of {index.size} rows at offset {offset} stride {stride} "
                                    f"runs past the {size}-byte window")


def check_ints(size: int, offset: int, index: np.ndarray, itemsize: int = 4) -> int:
    """An int32 (int64) write at `index` from `offset` stays inside a `size`-byte window; the highest index."""
    # (a header is one index: no reductions; ~1 us each, a few per micro-batch on both sides)
    hi, lo = (int(index[0]),) * 2 if index.size == 1 else (int(index.max()), int(index.min()))
    if offset < 0 or offset + itemsize * (hi + 1) > size or lo < 0:
        raise KernelError("window", f"int{8 * itemsize} write at offset {offset} index {hi} "
                                    f"runs past the {size}-byte window")
    return hi


def check_source_rows(index: np.ndarray, src_index: np.ndarray, src: np.ndarray) -> None:
    """put_rows_of's source indices: one per slot, each a row of src."""
    if src_index.shape != index.shape or int(src_index.min()) < 0 or int(src_index.max()) >= src.shape[0]:
        raise KernelError("window", f"source rows {src_index.tolist()[:8]} do not match {index.size} slots of "
                                    f"a source of {src.shape[0]} rows")


class LocalWindow:
    """A window in this host's simulated device memory: puts are plain stores into shared memory."""

    def __init__(self, device, address: int, size: int):
        self.device, self.address, self.size = device, int(address), int(size)
        self.bytes = device.view(self.address, self.size, field="window")

    @classmethod
    def over(cls, data: np.ndarray) -> LocalWindow:
        """A window over bytes this process has mapped already (a peer's window on the same host)."""
        win = cls.__new__(cls)
        win.device, win.address, win.size = None, int(data.ctypes.data), int(data.nbytes)
        win.bytes = data.reshape(-1).view(np.uint8)
        return win

    def put_rows(self, offset: int, stride: int, index: np.ndarray, rows: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        width = rows.shape[1] * rows.dtype.itemsize
        check_rows(self.size, offset, stride, index, width)
        n_slots = (self.size - offset) // stride
        slots = self.bytes[offset:offset + n_slots * stride].reshape(n_slots, stride)
        slots[index, :width] = np.ascontiguousarray(rows).view(np.uint8).reshape(len(index), width)

    def put_rows_of(self, offset: int, stride: int, index: np.ndarray, src: np.ndarray, src_index: np.ndarray,
                    streaming: bool = False) -> None:
        """put_rows(offset, stride, index, src[src_index]) without the temporary: each row copied once (compiled),
        for a C-contiguous 2-D src; numpy's two passes otherwise. streaming: with non-temporal stores where the
        rows are whole aligned 8-byte words (x86-64), for rows nobody reads soon (see _kernels.stream_rows)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        if src.ndim != 2 or not src.flags.c_contiguous:
            self.put_rows(offset, stride, index, src[src_index])
            return
        width = src.shape[1] * src.dtype.itemsize
        if width > stride:  # (put_rows fails on it too: a row would spill into the next slot)
            raise KernelError("window", f"rows of {width} bytes do not fit slots {stride} bytes apart")
        check_rows(self.size, offset, stride, index, width)
        src_index = np.asarray(src_index, dtype=np.int64)
        check_source_rows(index, src_index, src)
        from .ops import _kernels  # (the roles and the fake NPU load them ahead: warm_up_copy_rows)
        n_slots = (self.size - offset) // stride
        slots = self.bytes[offset:offset + n_slots * stride].reshape(n_slots, stride)
        rows = src.view(np.uint8).reshape(src.shape[0], width)
        if streaming and _kernels.STREAMING_STORES and width % 8 == 0 and stride % 8 == 0:
            # whole aligned words on both sides: the uint64 views' own flag (cheaper than reading .ctypes.data)
            slot_words, row_words = slots.view(np.uint64), rows.view(np.uint64)
            if slot_words.flags.aligned and row_words.flags.aligned:
                _kernels.stream_rows(slot_words, index, row_words, src_index, width // 8)
                return
        _kernels.copy_rows(slots, index, rows, src_index, width)

    def put_i32(self, offset: int, index: np.ndarray, values) -> None:
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        hi = check_ints(self.size, offset, index)
        ints = self.bytes[offset:offset + 4 * (hi + 1)].view("<i4")
        ints[index] = values

    def get_i32(self, offset: int, count: int) -> np.ndarray:
        return self.bytes[offset:offset + 4 * count].view("<i4").copy()

    def i32(self, offset: int, count: int) -> np.ndarray:
        """A live int32 view (local windows only): what spinning readers poll."""
        return self.bytes[offset:offset + 4 * count].view("<i4")


class Group:
    """A named group of `world_size` ranks, each with a window; `notify(rank)` rings that rank's doorbell."""

    def __init__(self, name: str, world_size: int, windows: dict[int, Window] | None = None,
                 notify: Callable[[int], None] | None = None):
        self.name = name
        self.world_size = int(world_size)
        self.windows: dict[int, Window] = dict(windows or {})
        self._notify = notify

    def window(self, rank: int) -> Window:
        rank = int(rank)
        if not 0 <= rank < self.world_size:
            raise KernelError("rank", f"rank {rank} is outside group {self.name!r} of world_size {self.world_size}")
        win = self.windows.get(rank)
        if win is None:
            raise KernelError("rank", f"group {self.name!r} has no window for rank {rank}")
        return win

    def notify(self, rank: int) -> None:
        """Tell rank that its window changed: a wake-up only, the window is the truth."""
        if self._notify is not None:
            self._notify(int(rank))


_groups: dict[str, Group] = {}


def put_rows_of(win, offset: int, stride: int, index: np.ndarray, src: np.ndarray, src_index: np.ndarray,
                streaming: bool = False) -> None:
    """win.put_rows(offset, stride, index, src[src_index]), through the window's single-pass copy when it has
    one (local windows, and fault-wrapped ones over them); others get the gathered rows."""
    put = getattr(win, "put_rows_of", None)
    if put is None:
        win.put_rows(offset, stride, index, src[src_index])
    else:
        put(offset, stride, index, src, src_index, streaming)


def by_rank(dst: np.ndarray, world_size: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The indices of dst (destination ranks, already checked to be in [0, world_size)) grouped by rank, stably,
    and [(rank, start, end)] of the ranks that occur, ascending: a compiled counting sort (numpy's form was an
    argsort, a unique and an append, ~30 us for a few hundred slots)."""
    from .ops._kernels import group_by_rank
    order = np.empty(dst.size, np.int64)
    starts = np.empty(world_size + 1, np.int64)
    if group_by_rank(np.ascontiguousarray(dst, np.int64), 0, world_size, order, starts) < 0:
        raise ValueError(f"by_rank: a destination rank is outside [0, {world_size})")
    bounds = starts.tolist()
    return order, [(r, lo, hi) for r, (lo, hi) in enumerate(itertools.pairwise(bounds)) if hi > lo]


def register(group: Group) -> Group:
    _groups[group.name] = group
    return group


def unregister(name: str) -> None:
    _groups.pop(name, None)


def resolve(group: Group | str) -> Group:
    """The Group for a name (as ops receive it) or the Group itself."""
    if isinstance(group, Group):
        return group
    found = _groups.get(group)
    if found is None:
        raise KernelError("group", f"no communication group named {group!r} is registered in this process")
    return found
