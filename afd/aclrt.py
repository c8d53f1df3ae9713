"""A small `aclrt`-like runtime over afd.device: init, malloc/memcpy/free, streams, returning ACL status codes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import device as _device
from .errors import AfdError

# acl_base.h / rt_error_codes.h values.
ACL_SUCCESS = 0
ACL_ERROR_RT_PARAM_INVALID = 107000
ACL_ERROR_RT_MEMORY_ALLOCATION = 207001
ACL_ERROR_RT_AICPU_EXCEPTION = 507018  # what a stream sync reports when an AICPU kernel failed

# aclrtMemMallocPolicy: the simulator has one kind of memory, the policy is accepted and ignored.
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEM_MALLOC_HUGE_ONLY = 1
ACL_MEM_MALLOC_NORMAL_ONLY = 2

# aclrtMemcpyKind
ACL_MEMCPY_HOST_TO_HOST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_DEVICE_TO_DEVICE = 3

_recent_error = ""


def _fail(status: int, message: str) -> int:
    """Record the message for aclGetRecentErrMsg() and return the status."""
    global _recent_error
    _recent_error = message
    return status


def aclGetRecentErrMsg() -> str:
    """The message of the last failure in this process (empty if none), like the real aclGetRecentErrMsg."""
    return _recent_error


@dataclass
class Stream:
    """A stream handle. Work runs synchronously at launch; a kernel failure is kept as the stream's sticky error."""

    error: int = ACL_SUCCESS

    def record(self, status: int) -> None:
        if status != ACL_SUCCESS and self.error == ACL_SUCCESS:
            self.error = status


def aclInit(config_path: str | None = None) -> int:
    return ACL_SUCCESS


def aclFinalize() -> int:
    return ACL_SUCCESS


def aclrtSetDevice(device_id: int) -> int:
    """Select this process's simulated device (one namespace per process; device_id only has to be >= 0)."""
    if int(device_id) < 0:
        return _fail(ACL_ERROR_RT_PARAM_INVALID, f"device_id: must be >= 0, got {device_id}")
    _device.current()
    return ACL_SUCCESS


def aclrtResetDevice(device_id: int) -> int:
    """Release the device: unlink every segment this process allocated and did not free."""
    _device.current().close()
    return ACL_SUCCESS


def aclrtCreateStream() -> tuple[int, Stream]:
    return ACL_SUCCESS, Stream()


def aclrtDestroyStream(stream: Stream | None) -> int:
    return ACL_SUCCESS


def aclrtSynchronizeStream(stream: Stream | None) -> int:
    """Everything already ran; report (and clear) the stream's sticky kernel error, as a sync on failure does."""
    if stream is None:
        return ACL_SUCCESS
    status, stream.error = stream.error, ACL_SUCCESS
    return status


def aclrtMalloc(size: int, policy: int = ACL_MEM_MALLOC_HUGE_FIRST) -> tuple[int, int]:
    """(status, device address); the address is 0 on failure."""
    if int(size) <= 0:
        return _fail(ACL_ERROR_RT_PARAM_INVALID, f"size: must be > 0, got {size}"), 0
    try:
        return ACL_SUCCESS, _device.current().malloc(size).address
    except OSError as exc:  # /dev/shm full or not writable
        return _fail(ACL_ERROR_RT_MEMORY_ALLOCATION, f"size: cannot allocate {size} bytes: {exc}"), 0


def aclrtFree(address: int) -> int:
    try:
        _device.current().free(address)
    except AfdError as exc:
        return _fail(ACL_ERROR_RT_PARAM_INVALID, str(exc))
    return ACL_SUCCESS


def _host_bytes(buf, field: str, writable: bool) -> np.ndarray:
    """A flat uint8 view of a host buffer (bytes-like or numpy array)."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise AfdError(field, "host buffer must be contiguous")
    if writable and not arr.flags.writeable:
        raise AfdError(field, "host destination is read-only")
    return arr.reshape(-1).view(np.uint8)


def aclrtMemcpy(dst, dest_max: int, src, count: int, kind: int) -> int:
    """Copy `count` bytes; device sides are addresses (int), host sides are bytes-like objects or numpy arrays."""
    count, dest_max = int(count), int(dest_max)
    if count > dest_max:
        return _fail(ACL_ERROR_RT_PARAM_INVALID, f"count: {count} bytes exceed destMax {dest_max}")
    if count == 0:
        return ACL_SUCCESS
    dev = _device.current()
    try:
        if kind in (ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_DEVICE):
            out = dev.view(dst, count, field="dst")
        elif kind in (ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_HOST_TO_HOST):
            out = _host_bytes(dst, "dst", writable=True)
        else:
            return _fail(ACL_ERROR_RT_PARAM_INVALID, f"kind: unknown aclrtMemcpyKind {kind}")
        if kind in (ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE):
            inp = dev.view(src, count, field="src")
        else:
            inp = _host_bytes(src, "src", writable=False)
        if out.size < count or inp.size < count:
            side = "dst" if out.size < count else "src"
            return _fail(ACL_ERROR_RT_PARAM_INVALID, f"{side}: buffer is smaller than count={count} bytes")
        out[:count] = inp[:count]
    except AfdError as exc:
        return _fail(ACL_ERROR_RT_PARAM_INVALID, str(exc))
    return ACL_SUCCESS
