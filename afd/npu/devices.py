"""The fake NPU's devices: how many there are, a device's index from any spelling, and each thread's current one.

AFD_NPU_DEVICE_COUNT sets how many devices there are (default 8, like an A3 node's dies per process view).
"""
from __future__ import annotations

import os
import threading

import torch

DEFAULT_DEVICE_COUNT = 8

_current = threading.local()  # .device (int), per thread
_first_device: int | None = None  # the device the first set_device chose: new threads start on it
_count: int | None = None


def device_count() -> int:
    global _count
    if _count is None:
        try:
            _count = max(1, int(os.environ.get("AFD_NPU_DEVICE_COUNT", DEFAULT_DEVICE_COUNT)))
        except ValueError:
            _count = DEFAULT_DEVICE_COUNT
    return _count


def device_index(device=None) -> int:
    """The device index of int / "npu:N" / torch.device / None (the current device); checked against the count."""
    if device is None:
        return current_device()
    if isinstance(device, int):
        index = device
    else:
        d = torch.device(device) if not isinstance(device, torch.device) else device
        if d.type != "npu":
            raise ValueError(f"device: expected an npu device, got {d}")
        index = current_device() if d.index is None else d.index
    if not 0 <= index < device_count():
        raise RuntimeError(f"device: npu:{index} is out of range; this fake NPU has {device_count()} devices "
                           "(AFD_NPU_DEVICE_COUNT)")
    return index


def current_device() -> int:
    index = getattr(_current, "device", None)
    if index is None:
        index = _first_device if _first_device is not None else 0
    return index


def set_device(device) -> None:
    global _first_device
    index = device_index(device)
    _current.device = index
    if _first_device is None:
        _first_device = index


class device:
    """with torch.npu.device(i): ... (the current device inside)."""

    def __init__(self, device):
        self.index = device_index(device)

    def __enter__(self):
        self.before = current_device()
        _current.device = self.index

    def __exit__(self, *exc):
        _current.device = self.before
