"""npu tensors over host memory: one storage, two device tags (npu for user code, a CPU alias for the kernels).

A tensor's device lives in its DLPack description (`DLDevice`, at byte 8 of `DLTensor`); exporting a tensor,
rewriting that field and importing it back gives a second tensor over the same bytes with another device, kept
alive by the first. npu tensors are made this way from CPU tensors over the allocator's blocks, and every
kernel runs on CPU aliases of its npu arguments, so a write through any view is seen through every other one.
"""
from __future__ import annotations

import ctypes
import math
import sys
import threading

import numpy as np
import torch
from torch.utils import dlpack as _dlpack

from ..device import DeviceBuffer
from .devices import current_device
from .memory import ROUND, memory

KDL_CPU = 1
KDL_EXT_DEV = 12  # torch maps kDLExtDev to PrivateUse1 (renamed "npu")


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensorHead(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType)]


KDL_BFLOAT = 4


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _retag(t: torch.Tensor, device_type: int, index: int) -> torch.Tensor:
    capsule = _dlpack.to_dlpack(t)
    head = _DLTensorHead.from_address(_capsule_pointer(capsule, b"dltensor"))
    head.device.device_type, head.device.device_id = device_type, index
    return _dlpack.from_dlpack(capsule)


_DEVICE_AT = _DLTensorHead.device.offset
_DTYPE_AT = _DLTensorHead.dtype.offset
_NPU_DEVICES: dict[int, bytes] = {}  # index -> the DLDevice bytes of npu:index
_BF16_CODE = bytes([KDL_BFLOAT])


def _npu_from_numpy(arr: np.ndarray, dtype: torch.dtype, index: int) -> torch.Tensor:
    """An npu tensor over a numpy array's bytes in one DLPack import (bfloat16 from an int16 array): the array
    stays alive, and its finalizer pending, as long as the tensor's storage. (Operator outputs come this way:
    one memmove per field rewritten, no ctypes structure made.)"""
    capsule = arr.__dlpack__()
    head = _capsule_pointer(capsule, b"dltensor")
    device = _NPU_DEVICES.get(index)
    if device is None:
        device = _NPU_DEVICES[index] = bytes(_DLDevice(KDL_EXT_DEV, index))
    ctypes.memmove(head + _DEVICE_AT, device, 8)
    if dtype is torch.bfloat16:
        ctypes.memmove(head + _DTYPE_AT, _BF16_CODE, 1)
    t = torch._C._from_dlpack(capsule)
    return t.view(dtype) if t.dtype != dtype else t  # (the fp8 / fp4 types come in as their bytes)


def is_npu(t: torch.Tensor) -> bool:
    """On npu: neither CPU nor meta, the only other devices of a CPU build of torch (a third of t.device.type)."""
    return not (t.is_cpu or t.is_meta)


def as_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the same bytes, shape and strides (no copy)."""
    if not is_npu(t):
        return t
    return _retag(t, KDL_CPU, 0)


def as_npu(t: torch.Tensor, index: int) -> torch.Tensor:
    """An npu:index tensor over a CPU tensor's bytes (no copy)."""
    return _retag(t, KDL_EXT_DEV, index)


def current_index() -> int:
    return current_device()


_ITEMSIZE: dict = {}


def itemsize(dtype: torch.dtype) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        size = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


def _block_bytes(nbytes: int, own_segment: bool = False) -> np.ndarray:
    """A uint8 numpy array of nbytes over a fresh allocator block (a zero-byte one still owns a block, so its
    address is a real one like every other's); the block is released when the array's last view dies."""
    nbytes = int(nbytes)
    return memory.host_bytes(memory.allocate(max(1, nbytes), own_segment=own_segment), max(1, nbytes))[:nbytes]


def _extent(size, stride) -> int:
    """Elements a layout reaches: one past its largest offset (0 when empty)."""
    return 0 if 0 in size else 1 + sum((s - 1) * st for s, st in zip(size, stride))


def host_block(nbytes: int, own_segment: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over a fresh allocator block; retag it with as_npu."""
    return torch.from_numpy(_block_bytes(nbytes, own_segment))


def npu_bytes(nbytes: int, index: int | None = None, own_segment: bool = False) -> torch.Tensor:
    """A 1-D uint8 npu tensor of nbytes from the caching allocator."""
    return as_npu(host_block(nbytes, own_segment), current_index() if index is None else int(index))


def _host_array(size, stride, dtype: torch.dtype) -> np.ndarray | None:
    """A numpy array of this shape and strides over a fresh block (None for a dtype numpy cannot hold)."""
    shaped = _FROM_NUMPY.get(dtype)
    if shaped is None:
        return None
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    flat = _block_bytes(_extent(size, stride) * itemsize(dtype)).view(shaped)
    if stride == contiguous_strides(size):
        return flat.reshape(size)
    return np.lib.stride_tricks.as_strided(flat, size, tuple(st * flat.itemsize for st in stride))


def host_strided(size, stride, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of this shape and strides over a fresh block (enough bytes for the largest offset)."""
    arr = _host_array(size, stride, dtype)
    if arr is not None:
        t = torch.from_numpy(arr)
        return t.view(dtype) if t.dtype != dtype else t
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    return torch.as_strided(host_block(_extent(size, stride) * itemsize(dtype)).view(dtype), size, stride)


_FROM_NUMPY = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32,
               torch.float64: np.float64, torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16,
               torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_,
               # the 950's quantised payloads and MX scales: bytes that torch.from_numpy can import
               torch.float8_e5m2: np.uint8, torch.float8_e4m3fn: np.uint8, torch.float8_e8m0fnu: np.uint8,
               torch.float4_e2m1fn_x2: np.uint8}


def empty_strided(size, stride, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """torch.empty_strided on npu."""
    index = current_index() if index is None else int(index)
    arr = _host_array(size, stride, dtype)
    if arr is not None:
        return _npu_from_numpy(arr, dtype, index)
    return as_npu(host_strided(size, stride, dtype), index)


def contiguous_strides(size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(int(s) for s in size)):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def empty(size, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """torch.empty on npu: contiguous."""
    return empty_strided(size, contiguous_strides(size), dtype, index)


def empty_together(shapes, dtypes, index: int | None = None) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Contiguous npu tensors carved from one block (512-byte aligned each), and numpy arrays over the same bytes:
    one allocation and one release for an operator's outputs. The block goes back to the allocator when the last
    of them dies."""
    index = current_index() if index is None else int(index)
    key = (tuple(map(tuple, shapes)), tuple(dtypes), index)
    plan = _together.get(key)
    if plan is None:
        plan = _together[key] = _together_plan(*key[:2])
    total, parts, bases = plan
    kept = _kept.get(key) if total <= KEEP_BYTES else None
    if kept:
        with _kept_lock:
            for entry in kept:
                if _unused(entry, bases):
                    return list(entry[0]), list(entry[1])
    base = memory.host_bytes(memory.allocate(total), total)
    tensors, arrays = [], []
    for start, end, size, dtype, shaped, np_dtype in parts:
        arr = base[start:end].view(shaped).reshape(size)
        tensors.append(_npu_from_numpy(arr, dtype, index))
        arrays.append(arr if np_dtype is None else arr.view(np_dtype))
    if total <= KEEP_BYTES and KEEPING:
        with _kept_lock:
            kept = _kept.setdefault(key, [])
            if len(kept) < KEEP_PER_SHAPE:
                views = sys.getrefcount(base) - 2  # the block's views now (not this name, not the argument): ours
                kept.append((tuple(tensors), tuple(arrays), base, views))
    return tensors, arrays


# Outputs an operator made, kept to be handed out again once nobody else holds them (the next call of the same
# operator at the same shapes, as a decode loop makes): a fresh output costs ~30 us of DLPack import and
# allocator work, a kept one a few refcount reads. Small outputs only, two per shape; torch.npu.empty_cache()
# lets them go. While kept, their blocks count as allocated, and a stale data_ptr() of one reads its current
# bytes with no freed-block warning.
KEEP_BYTES = 1 << 20
KEEP_PER_SHAPE = 2
KEEPING = sys.version_info < (3, 14)  # (3.14 may report smaller refcounts: the counts below would not hold)
_kept: dict = {}
_kept_lock = threading.Lock()
_together: dict = {}  # key -> (total bytes, per output (start, end, size, dtype, shaped, np dtype), refcount bases)
_storage_use_count = torch._C._storage_Use_Count


def _unused(entry, bases) -> bool:
    """True when only the keep list holds these outputs: no Python reference, no other tensor (a view, a CPU alias
    a queued op holds) on their storage, and no kernel still writing through the arrays."""
    tensors, arrays, base, views = entry
    if sys.getrefcount(base) != views + 3:  # a numpy view of an output (its base is the block) is held
        return False
    for t in tensors:  # (the references: the entry, the loop variable, getrefcount's argument)
        if sys.getrefcount(t) != 3 or t._use_count() != 1 or _storage_use_count(t.untyped_storage()._cdata) != 2:
            return False
    i = 0
    for a in arrays:  # (no zip: its reused result tuple would hold a reference too)
        if sys.getrefcount(a) != bases[i]:
            return False
        i += 1
    return True


def release_kept() -> None:
    """Let the kept outputs go (torch.npu.empty_cache): their blocks return to the allocator."""
    _kept.clear()


def _together_plan(shapes, dtypes):
    parts, total = [], 0
    for shape, dtype in zip(shapes, dtypes):
        size = tuple(int(s) for s in shape)
        n = math.prod(size) * itemsize(dtype)
        np_dtype = _np_dtype(dtype)
        parts.append((total, total + n, size, dtype, _FROM_NUMPY[dtype],
                      np_dtype if np_dtype != np.dtype(_FROM_NUMPY[dtype]) else None))
        total += max(ROUND, (n + ROUND - 1) // ROUND * ROUND)
    if len(_together) > 256:
        _together.clear()
        _kept.clear()
    # an array's references when unused: the entry, the loop, getrefcount's argument, and, when it is the array
    # the tensor was imported from (no dtype view over it), the tensor's DLPack context
    bases = tuple(3 + (p[5] is None) for p in parts)
    return total, parts, bases


def to_npu_copy(r: torch.Tensor, index: int) -> torch.Tensor:
    """A new npu tensor with the values (and layout) of a CPU result."""
    arr = _host_array(r.shape, r.stride(), r.dtype)
    if arr is None:
        out = host_strided(r.shape, r.stride(), r.dtype)
        out.copy_(r)
        return as_npu(out, index)
    cpu = torch.from_numpy(arr)
    (cpu.view(r.dtype) if cpu.dtype != r.dtype else cpu).copy_(r)
    return _npu_from_numpy(arr, r.dtype, index)


_views: dict[tuple, np.ndarray] = {}
_NP_DTYPES: dict = {}
_NUMPY_ONLY = (torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32,
               torch.int64, torch.bool)  # what torch's own .numpy() gives (the others come from afd.tokens)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    d = _NP_DTYPES.get(dtype)
    if d is None:
        if dtype == torch.float4_e2m1fn_x2:
            d = np.dtype(np.uint8)  # two fp4 values per byte, as the window and the real tensor keep them
        elif dtype in _NUMPY_ONLY:
            d = torch.empty(0, dtype=dtype).numpy().dtype
        else:  # bfloat16 and the fp8 types: ml_dtypes', by torch's name (imported here, on first use: a slow import)
            from .. import tokens
            names = {name: np_dtype for np_dtype, name in tokens.DTYPE_NAMES.items()}
            d = names.get(str(dtype).removeprefix("torch."))
            if d is None:
                d = torch.empty(0, dtype=dtype).numpy().dtype  # (raises torch's own error for the rest)
        _NP_DTYPES[dtype] = d
    return d


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """A numpy array over a tensor's bytes (no copy); bfloat16 becomes ml_dtypes.bfloat16.

    For npu tensors it views the allocator's segment at data_ptr() (not the tensor, so it keeps no block alive)
    and is kept by (address, shape, strides, dtype): an operator called every step with the same tensors pays for
    it once; a kept view only views the bytes at that address, as right for a later tensor there as for the first.
    """
    if not is_npu(t):
        return t.view(torch.int16).numpy().view(_np_dtype(t.dtype)) if t.dtype == torch.bfloat16 else t.numpy()
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
    arr = _views.get(key)
    if arr is None:
        dtype = _np_dtype(t.dtype)
        shape, stride = tuple(t.shape), t.stride()
        count = _extent(shape, stride)
        flat = memory.view(key[0], count * dtype.itemsize, dtype, field="tensor")
        if stride == contiguous_strides(shape):
            arr = flat.reshape(shape)
        else:
            arr = np.lib.stride_tricks.as_strided(flat, shape, tuple(st * dtype.itemsize for st in stride))
        if len(_views) >= 4096:
            _views.clear()
        _views[key] = arr
    return arr


class NpuDevice:
    """afd's device protocol (afd.device.Device: malloc, view, free) over npu memory: an allocation is an npu tensor,
    as the holder's context and out buffers are (the holder hands out that very tensor)."""

    def __init__(self):
        self._buffers: dict[int, tuple] = {}  # address -> (DeviceBuffer, tensor) of malloc()ed blocks

    def malloc(self, nbytes: int) -> DeviceBuffer:
        """An allocation the caller frees; its npu tensor is `tensor_of(buffer)`."""
        tensor = npu_bytes(int(nbytes))
        buf = DeviceBuffer(self, int(tensor.data_ptr()), int(nbytes))
        self._buffers[buf.address] = (buf, tensor)
        return buf

    def tensor_of(self, buffer: DeviceBuffer) -> torch.Tensor:
        return self._buffers[buffer.address][1]

    def free(self, buffer) -> None:
        address = buffer.address if isinstance(buffer, DeviceBuffer) else int(buffer)
        self._buffers.pop(address, None)  # the block is released when the last tensor over it dies

    def close(self) -> None:
        self._buffers.clear()

    def view(self, address: int, nbytes: int, dtype=np.uint8, *, field: str = "address") -> np.ndarray:
        return memory.view(address, nbytes, dtype, field=field)

    def allocation_size(self, address: int, *, field: str = "address") -> int:
        return memory.allocation_size(address, field=field)


npu_device = NpuDevice()  # (one per process, over the one address space)
