"""npu tensors over host memory: one storage, two device tags (npu for user code, a CPU alias for the kernels).

A tensor's device lives in its DLPack description (`DLDevice`, at byte 8 of `DLTensor`); exporting a tensor,
rewriting that field and importing it back gives a second tensor over the same bytes with another device, kept
alive by the first. npu tensors are made this way from CPU tensors over the allocator's blocks, and every
kernel runs on CPU aliases of its npu arguments, so a write through any view is seen through every other one.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch.utils import dlpack as _dlpack

from .memory import memory

KDL_CPU = 1
KDL_EXT_DEV = 12  # torch maps kDLExtDev to PrivateUse1 (renamed "npu")


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLTensorHead(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _retag(t: torch.Tensor, device_type: int, index: int) -> torch.Tensor:
    capsule = _dlpack.to_dlpack(t)
    head = _DLTensorHead.from_address(_capsule_pointer(capsule, b"dltensor"))
    head.device.device_type, head.device.device_id = device_type, index
    return _dlpack.from_dlpack(capsule)


def as_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the same bytes, shape and strides (no copy)."""
    if t.device.type != "npu":
        return t
    return _retag(t, KDL_CPU, 0)


def as_npu(t: torch.Tensor, index: int) -> torch.Tensor:
    """An npu:index tensor over a CPU tensor's bytes (no copy)."""
    return _retag(t, KDL_EXT_DEV, index)


def current_index() -> int:
    from .module import current_device
    return current_device()


def npu_bytes(nbytes: int, index: int | None = None, own_segment: bool = False) -> torch.Tensor:
    """A 1-D uint8 npu tensor of nbytes from the caching allocator (a zero-byte one still owns a block, so its
    data_ptr() is a real address like every other's)."""
    index = current_index() if index is None else int(index)
    nbytes = int(nbytes)
    block = memory.allocate(max(1, nbytes), own_segment=own_segment)
    cpu = torch.from_numpy(memory.host_bytes(block, max(1, nbytes)))
    return as_npu(cpu if nbytes else cpu[:0], index)


def empty_strided(size, stride, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """torch.empty_strided on npu: one block holding the largest offset the strides reach."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 0 if any(s == 0 for s in size) else 1 + sum((s - 1) * st for s, st in zip(size, stride))
    raw = npu_bytes(count * itemsize, index)
    flat = as_cpu(raw).view(dtype)
    return as_npu(torch.as_strided(flat, size, stride), raw.device.index)


def empty(size, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """torch.empty on npu: contiguous."""
    size = tuple(int(s) for s in size)
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return empty_strided(size, tuple(reversed(stride)), dtype, index)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """A numpy array over an npu (or CPU) tensor's bytes; bfloat16 becomes ml_dtypes.bfloat16."""
    c = as_cpu(t)
    if c.dtype == torch.bfloat16:
        import ml_dtypes
        return c.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if c.dtype == torch.bool:
        return c.numpy()
    return c.numpy()
