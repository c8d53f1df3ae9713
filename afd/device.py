"""Simulated device memory: a 64-bit address space backed by named POSIX shared-memory segments.

Every allocation is one segment `/dev/shm/afd-<namespace>-<index>`; its device address is
ADDRESS_BASE + index * SEGMENT_SPAN, so any process that knows the namespace can turn an address
found in a ScheduleContext back into memory. Segments are created 0600 with O_EXCL and mapped
with plain mmap: no multiprocessing resource tracker ever sees them (CPython gh-82300), and only
the creator unlinks.
"""
from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from .errors import DeviceAddressError

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "afd-"
ADDRESS_BASE = 0x0000_1240_0000_0000
SEGMENT_SPAN = 1 << 36  # 64 GiB of address space per allocation


# Namespaces this process allocated in: lets a test harness check its own leaks without touching other runs'.
created_namespaces: set[str] = set()
# Devices that own segments: whatever they still own is unlinked when the process ends (afd.exit_cleanup).
_owners: "weakref.WeakSet[Device]" = weakref.WeakSet()


def _unlink_owned() -> None:
    for dev in list(_owners):
        dev.close()


def segment_name(namespace: str, index: int) -> str:
    return f"{SEGMENT_PREFIX}{namespace}-{index}"


def new_namespace() -> str:
    return secrets.token_hex(4)


def list_segments(namespace: str | None = None) -> list[str]:
    """Names of the afd segments in /dev/shm (all of them, or one namespace's)."""
    prefix = SEGMENT_PREFIX + (f"{namespace}-" if namespace else "")
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def in_use() -> set[str]:
    """afd segments some process on this machine maps or holds open (read from /proc; what cannot be read is
    assumed in use by whoever cannot be seen, so only this user's processes' segments can look orphaned)."""
    used: set[str] = set()
    marker = os.path.join(SHM_DIR, SEGMENT_PREFIX)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(marker)
                    if at >= 0:
                        used.add(os.path.basename(line[at:].split()[0]))
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                try:
                    target = os.readlink(os.path.join(fd_dir, fd))
                except OSError:
                    continue
                if target.startswith(marker):
                    used.add(os.path.basename(target.split(" (deleted)")[0]))
        except OSError:
            continue
    return used


def orphans() -> list[str]:
    """afd segments of this user that no process maps or holds open: their owner died (SIGKILL) without
    unlinking them."""
    used = in_use()
    me = os.getuid()
    out = []
    for name in list_segments():
        try:
            owner = os.stat(os.path.join(SHM_DIR, name)).st_uid
        except FileNotFoundError:
            continue
        if owner == me and name not in used:
            out.append(name)
    return out


def sweep(namespace: str) -> list[str]:
    """Unlink every segment of a namespace (used when the owner is gone); returns the names removed."""
    removed = []
    for name in list_segments(namespace):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


@dataclass(frozen=True)
class DeviceBuffer:
    """One allocation: a device address, a size, and numpy views over the memory."""

    device: "Device"
    address: int
    size: int

    @property
    def name(self) -> str:
        return segment_name(self.device.namespace, (self.address - ADDRESS_BASE) // SEGMENT_SPAN)

    def view(self, dtype=np.uint8, shape=None, offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = (self.size - offset) // dtype.itemsize if shape is None else int(np.prod(shape))
        arr = self.device.view(self.address + offset, count * dtype.itemsize, dtype)
        return arr if shape is None else arr.reshape(shape)


class Device:
    """One namespace of simulated device memory as seen from this process."""

    def __init__(self, namespace: str | None = None):
        self.namespace = namespace or new_namespace()
        self._maps: dict[int, mmap.mmap] = {}
        self._owned: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()
        self.generation = 0

    # -- allocation -------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> DeviceBuffer:
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise DeviceAddressError("nbytes", f"allocation size must be > 0, got {nbytes}")
        with self._lock:
            while True:
                path = os.path.join(SHM_DIR, segment_name(self.namespace, self._next))
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileExistsError:  # another process of the namespace took this index
                    self._next += 1
            index = self._next
            self._next += 1
            try:
                os.ftruncate(fd, nbytes)
                self._maps[index] = mmap.mmap(fd, nbytes)
            except BaseException:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
            self._owned.add(index)
            created_namespaces.add(self.namespace)
            if not _owners:
                from . import exit_cleanup
                exit_cleanup.register(_unlink_owned)
            _owners.add(self)
        return DeviceBuffer(self, ADDRESS_BASE + index * SEGMENT_SPAN, nbytes)

    def free(self, buffer: DeviceBuffer | int) -> None:
        address = buffer.address if isinstance(buffer, DeviceBuffer) else int(buffer)
        index, offset = self._split(address, "address")
        if offset:
            raise DeviceAddressError("address", f"free needs the base address of an allocation, got {address:#x}")
        with self._lock:
            if index in self._owned:
                self._owned.discard(index)
                try:
                    os.unlink(os.path.join(SHM_DIR, segment_name(self.namespace, index)))
                except FileNotFoundError:
                    pass
            self._unmap(index)

    def close(self) -> None:
        """Unmap everything and unlink what this process created."""
        with self._lock:
            for index in list(self._owned):
                try:
                    os.unlink(os.path.join(SHM_DIR, segment_name(self.namespace, index)))
                except FileNotFoundError:
                    pass
            self._owned.clear()
            for index in list(self._maps):
                self._unmap(index)

    def disown(self) -> None:
        """Forget ownership (a child that must not unlink what its parent created)."""
        self._owned.clear()

    def _unmap(self, index: int) -> None:
        self.generation += 1  # views derived from this device's mappings are stale (ops/_context.prepared)
        mm = self._maps.pop(index, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a numpy view is still alive; the mapping goes with it
                pass

    # -- addressing -------------------------------------------------------------------------
    def _split(self, address: int, field: str) -> tuple[int, int]:
        address = int(address)
        if address == 0:
            raise DeviceAddressError(field, "null device address (0)")
        if address < ADDRESS_BASE:
            raise DeviceAddressError(field, f"address {address:#x} is not a device address")
        return (address - ADDRESS_BASE) // SEGMENT_SPAN, (address - ADDRESS_BASE) % SEGMENT_SPAN

    def _map(self, index: int, field: str, address: int) -> mmap.mmap:
        mm = self._maps.get(index)
        if mm is None:
            path = os.path.join(SHM_DIR, segment_name(self.namespace, index))
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                raise DeviceAddressError(
                    field, f"address {address:#x} is not allocated (no segment {os.path.basename(path)})") from None
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            with self._lock:
                mm = self._maps.setdefault(index, mm)
        return mm

    def view(self, address: int, nbytes: int, dtype=np.uint8, *, field: str = "address") -> np.ndarray:
        """A numpy array over [address, address+nbytes); bounds-checked, naming `field` on error."""
        index, offset = self._split(address, field)
        mm = self._map(index, field, address)
        dtype = np.dtype(dtype)
        nbytes = int(nbytes)
        if nbytes < 0 or offset + nbytes > len(mm):
            raise DeviceAddressError(
                field, f"[{address:#x}, +{nbytes}) runs past its allocation of {len(mm)} bytes (offset {offset})")
        if nbytes % dtype.itemsize:
            raise DeviceAddressError(field, f"{nbytes} bytes is not a whole number of {dtype.name}")
        return np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)

    def allocation_size(self, address: int, *, field: str = "address") -> int:
        """Bytes from `address` to the end of its allocation."""
        index, offset = self._split(address, field)
        return len(self._map(index, field, address)) - offset

    def owned_segments(self) -> list[str]:
        return [segment_name(self.namespace, i) for i in sorted(self._owned)]


_current: Device | None = None


def current() -> Device:
    """This process's default device (a fresh namespace unless `use()` chose one)."""
    global _current
    if _current is None:
        _current = Device()
    return _current


def use(namespace: str | Device) -> Device:
    """Make a namespace (or a Device) this process's default device."""
    global _current
    _current = namespace if isinstance(namespace, Device) else Device(namespace)
    return _current


def malloc(nbytes: int) -> DeviceBuffer:
    return current().malloc(nbytes)


def free(buffer: DeviceBuffer | int) -> None:
    current().free(buffer)
