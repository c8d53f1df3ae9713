"""The fake NPU's device memory: a caching allocator over memfd segments whose addresses the operators resolve.

Every npu tensor's bytes live in a segment of this process (an anonymous memfd, mapped shared), so `data_ptr()` is
a real address that numpy, ctypes and afd-sim's operators can read, another process can map the segment through
/proc/<pid>/fd/<fd> (HCCL windows, `afd stop`), and nothing is ever named in /dev/shm: a crashed rank leaves
nothing behind.

The pools follow the CUDA/NPU caching allocator: requests are rounded to 512 bytes; up to 1 MiB they come from
2 MiB segments, larger ones from 20 MiB segments (or their own, 2 MiB-rounded, from 10 MiB up); a freed block
stays mapped and cached for the next request that fits it best. So an address kept from a freed temporary still
reads its old bytes until the block is reused, as on hardware; resolving such an address warns once per block.
"""
from __future__ import annotations

import bisect
import functools
import mmap
import os
import sys
import threading
import warnings
import weakref

import numpy as np

from ..errors import DeviceAddressError

ROUND = 512
SMALL_REQUEST = 1 << 20
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
OWN_SEGMENT_FROM = 10 << 20


class FreedBlockWarning(UserWarning):
    """An address resolved into a block that was freed (still readable until the allocator reuses it)."""


def _round(nbytes: int) -> int:
    return max(ROUND, (int(nbytes) + ROUND - 1) // ROUND * ROUND)


class Segment:
    """One memfd mapping; its bytes are carved into blocks."""

    __slots__ = ("fd", "mm", "base", "size", "small", "starts", "blocks", "__weakref__")

    def __init__(self, size: int, small: bool, name: str = "afd-npu"):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.base = int(np.frombuffer(self.mm, np.uint8, 1).ctypes.data)
        self.size, self.small = size, small
        self.starts: list[int] = []  # block start addresses, sorted
        self.blocks: dict[int, Block] = {}

    def bytes_at(self, address: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.mm, np.uint8, nbytes, address - self.base)

    def close(self) -> bool:
        try:
            self.mm.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            return False
        os.close(self.fd)
        return True


class Block:
    """A piece of a segment: live (some tensor owns it) or cached (freed, readable until reused)."""

    __slots__ = ("segment", "start", "size", "live", "warned", "pinned", "owner")

    def __init__(self, segment: Segment, start: int, size: int):
        self.segment, self.start, self.size = segment, start, size
        self.owner = None  # a weak reference to the array that owns the live block (its death releases it)
        self.live = False
        self.warned = False
        self.pinned = False  # a segment of its own that is never cached (an HCCL window)

    @property
    def end(self) -> int:
        return self.start + self.size


class NpuMemory:
    """The allocator and address space of one process; its view and allocation_size are afd's device protocol, so
    the operators work on npu addresses unchanged (allocations as npu tensors: afd.npu.tensors.NpuDevice)."""

    def __init__(self):
        # Blocks are released from finalizers, which run wherever a tensor dies (inside this allocator too, when a
        # collection runs): a release only queues the block; whoever holds the lock, or next takes it, frees it.
        self._lock = threading.Lock()
        self._pending: list[Block] = []
        self._segments: list[Segment] = []  # sorted by base
        self._bases: list[int] = []
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # pool -> sorted (size, start)
        self._by_start: dict[int, Block] = {}
        self.allocated = 0  # bytes in live blocks
        self.peak = 0

    # -- allocation ---------------------------------------------------------------------------------------------
    def allocate(self, nbytes: int, own_segment: bool = False) -> Block:
        """A live block of at least nbytes (rounded to 512), best fit from the cache, else a new segment."""
        size = _round(nbytes)
        small = size <= SMALL_REQUEST and not own_segment
        with self._lock:
            self._drain()
            block = None if own_segment else self._best_fit(small, size)
            if block is None:
                if own_segment or size >= OWN_SEGMENT_FROM:
                    seg_size = (size + SMALL_SEGMENT - 1) // SMALL_SEGMENT * SMALL_SEGMENT
                else:
                    seg_size = SMALL_SEGMENT if small else LARGE_SEGMENT
                block = self._new_segment(seg_size, small)
            self._split(block, size, small)
            block.live, block.warned, block.pinned = True, False, own_segment
            self.allocated += block.size
            self.peak = max(self.peak, self.allocated)
            return block

    def _best_fit(self, small: bool, size: int) -> Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, 0))
        if i == len(pool):
            return None
        _, start = pool.pop(i)
        return self._by_start[start]

    def _new_segment(self, seg_size: int, small: bool) -> Block:
        seg = Segment(seg_size, small)
        i = bisect.bisect(self._bases, seg.base)
        self._bases.insert(i, seg.base)
        self._segments.insert(i, seg)
        block = Block(seg, seg.base, seg_size)
        seg.starts.append(seg.base)
        seg.blocks[seg.base] = block
        self._by_start[seg.base] = block
        return block

    def _split(self, block: Block, size: int, small: bool) -> None:
        rest = block.size - size
        if rest >= (ROUND if small else SMALL_REQUEST + 1):
            seg = block.segment
            tail = Block(seg, block.start + size, rest)
            block.size = size
            bisect.insort(seg.starts, tail.start)
            seg.blocks[tail.start] = tail
            self._by_start[tail.start] = tail
            self._cache(tail)

    def _cache(self, block: Block) -> None:
        bisect.insort(self._free[block.segment.small], (block.size, block.start))

    def _uncache(self, block: Block) -> None:
        pool = self._free[block.segment.small]
        i = bisect.bisect_left(pool, (block.size, block.start))
        if i < len(pool) and pool[i] == (block.size, block.start):
            pool.pop(i)

    def release(self, block: Block) -> None:
        """The owner is gone: the block is cached (merged with free neighbours), its bytes left as they are."""
        self._pending.append(block)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while self._pending:
            self._release_now(self._pending.pop())

    def _release_now(self, block: Block) -> None:
        if not block.live:
            return
        block.live = False
        self.allocated -= block.size
        if block.pinned:  # a window: its segment goes back to the system now
            self._drop_segment(block.segment)
            return
        seg = block.segment
        i = bisect.bisect_left(seg.starts, block.start)
        nxt = seg.blocks.get(block.end)
        if nxt is not None and not nxt.live:
            self._uncache(nxt)
            self._forget(nxt)
            block.size += nxt.size
        if i > 0:
            prev = seg.blocks[seg.starts[i - 1]]
            if not prev.live and prev.end == block.start:
                self._uncache(prev)
                self._forget(block)
                prev.size += block.size
                prev.warned = False
                block = prev
        self._cache(block)

    def _forget(self, block: Block) -> None:
        seg = block.segment
        seg.starts.pop(bisect.bisect_left(seg.starts, block.start))
        del seg.blocks[block.start]
        del self._by_start[block.start]

    def _drop_segment(self, seg: Segment) -> None:
        for start in list(seg.starts):
            block = seg.blocks[start]
            if not block.live:
                self._uncache(block)
            del self._by_start[start]
        i = bisect.bisect_left(self._bases, seg.base)
        del self._bases[i], self._segments[i]
        seg.close()

    def empty_cache(self) -> None:
        """Give wholly free segments back to the system (torch.npu.empty_cache)."""
        with self._lock:
            self._drain()
            for seg in list(self._segments):
                if all(not b.live for b in seg.blocks.values()):
                    self._drop_segment(seg)

    # -- tensors ------------------------------------------------------------------------------------------------
    def host_bytes(self, block: Block, nbytes: int) -> np.ndarray:
        """A uint8 numpy array over the first nbytes of a live block; the block is released when it dies."""
        arr = block.segment.bytes_at(block.start, nbytes)
        # (a plain weak reference kept on the block: a third of weakref.finalize's cost, per operator output)
        block.owner = weakref.ref(arr, functools.partial(self._owner_died, block))
        return arr

    def _owner_died(self, block: Block, _ref) -> None:
        block.owner = None
        if not sys.is_finalizing():  # (at exit the segments go with the process)
            self.release(block)

    # -- the address space ----------------------------------------------------------------------------------------
    def find(self, address: int) -> Block | None:
        """The block (live or cached) that holds this address, if any segment does."""
        i = bisect.bisect(self._bases, address) - 1
        if i < 0:
            return None
        seg = self._segments[i]
        if address >= seg.base + seg.size:
            return None
        j = bisect.bisect(seg.starts, address) - 1
        return seg.blocks[seg.starts[j]]

    def _resolve(self, address: int, nbytes: int, field: str) -> Block:
        address = int(address)
        if address == 0:
            raise DeviceAddressError(field, "null device address (0)")
        with self._lock:
            block = self.find(address)
            if block is None:
                raise DeviceAddressError(field, f"address {address:#x} is not npu memory (no allocation of this "
                                                "process covers it)")
            if address + int(nbytes) > block.end:
                raise DeviceAddressError(field, f"[{address:#x}, +{int(nbytes)}) runs past its allocation of "
                                                f"{block.size} bytes at {block.start:#x}")
            if not block.live and not block.warned:
                block.warned = True
                warnings.warn(f"{field}: address {address:#x} lies in a freed npu block of {block.size} bytes at "
                              f"{block.start:#x}; the caching allocator keeps it readable until it is reused, as on "
                              "hardware, but nothing owns it", FreedBlockWarning, stacklevel=3)
            return block

    def view(self, address: int, nbytes: int, dtype=np.uint8, *, field: str = "address") -> np.ndarray:
        """A numpy array over [address, address+nbytes) of npu memory; bounds-checked, naming `field` on error."""
        dtype = np.dtype(dtype)
        nbytes = int(nbytes)
        if nbytes < 0:
            raise DeviceAddressError(field, f"negative size {nbytes}")
        if nbytes % dtype.itemsize:
            raise DeviceAddressError(field, f"{nbytes} bytes is not a whole number of {dtype.name}")
        block = self._resolve(address, nbytes, field)
        return np.frombuffer(block.segment.mm, dtype, nbytes // dtype.itemsize, int(address) - block.segment.base)

    def allocation_size(self, address: int, *, field: str = "address") -> int:
        """Bytes from `address` to the end of its block."""
        return self._resolve(address, 0, field).end - int(address)

    def locate(self, address: int, *, field: str = "address") -> tuple[int, int]:
        """(memfd, offset) of a live or cached address: what another process opens to reach it."""
        block = self._resolve(address, 0, field)
        return block.segment.fd, int(address) - block.segment.base


memory = NpuMemory()  # one address space per process
