"""The torch.npu module of the fake NPU: devices, the current device and stream, synchronize, memory figures.

AFD_NPU_DEVICE_COUNT sets how many devices there are (default 8, like an A3 node's dies per process view) and
AFD_NPU_SOC_NAME what get_device_name() says (default Ascend910_9392, an A3; Ascend950PR_9599 once a job imports
cann_ops_transformer). The SoC picks the operators' generation: the 950's V2 window path exists only on Ascend950*.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

from . import streams as _streams
from .memory import memory
from .streams import Event, Stream, StreamError  # noqa: F401 (torch.npu.Event, torch.npu.Stream)

DEFAULT_SOC_NAME = "Ascend910_9392"  # an Atlas A3 die
DEFAULT_DEVICE_COUNT = 8

_current = threading.local()  # .device (int) and .streams {device: Stream}, per thread
_default_streams: dict[int, Stream] = {}
_default_lock = threading.Lock()
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


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def _lazy_init() -> None:
    pass


def init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def _device_index(device=None) -> int:
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
    index = _device_index(device)
    _current.device = index
    if _first_device is None:
        _first_device = index


class device:
    """with torch.npu.device(i): ... (the current device inside)."""

    def __init__(self, device):
        self.index = _device_index(device)

    def __enter__(self):
        self.before = current_device()
        _current.device = self.index

    def __exit__(self, *exc):
        _current.device = self.before


V2_SOC_NAME = "Ascend950PR_9599"  # an Ascend 950 die: the default once a job imports cann_ops_transformer
_default_soc = DEFAULT_SOC_NAME


def soc_name() -> str:
    return os.environ.get("AFD_NPU_SOC_NAME", _default_soc)


def default_to_950() -> None:
    """A job that imports cann_ops_transformer runs on a 950 unless AFD_NPU_SOC_NAME (afd npu --soc) says otherwise:
    the V2 window operators exist only there."""
    global _default_soc
    _default_soc = V2_SOC_NAME


def generation() -> str:
    """The operators' generation this SoC runs: "950" for an Ascend950* die, else "A3"."""
    return "950" if soc_name().startswith("Ascend950") else "A3"


def get_device_name(device=None) -> str:
    _device_index(device)
    return soc_name()


def get_device_properties(device=None):
    from types import SimpleNamespace
    return SimpleNamespace(name=get_device_name(device), total_memory=_total_memory())


def _total_memory() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages)


def default_stream(device=None) -> Stream:
    index = device if type(device) is int else _device_index(device)
    stream = _default_streams.get(index)
    if stream is None:
        with _default_lock:
            stream = _default_streams.get(index)
            if stream is None:
                stream = _default_streams[index] = Stream(_device_index(index), stream_id=0)
    return stream


def current_stream(device=None) -> Stream:
    index = device if type(device) is int and 0 <= device < device_count() else _device_index(device)
    streams = getattr(_current, "streams", None)
    if streams is not None and index in streams:
        return streams[index]
    return default_stream(index)


def set_stream(stream: Stream) -> None:
    if not hasattr(_current, "streams"):
        _current.streams = {}
    _current.streams[stream.device_index] = stream


@contextmanager
def stream(s: Stream | None):
    """with torch.npu.stream(s): work launched inside runs on s (None: no change)."""
    if s is None:
        yield
        return
    before = current_stream(s.device_index)
    set_stream(s)
    try:
        yield
    finally:
        set_stream(before)


def synchronize(device=None) -> None:
    """Wait for every stream of the device; a kept stream error is raised here."""
    index = _device_index(device)
    if not _streams.busy:  # no stream has work pending or an error kept
        return
    for s in list(Stream.all_streams()):
        if s.device_index == index:
            s.synchronize()


def empty_cache() -> None:
    from .tensors import release_kept
    release_kept()
    memory.empty_cache()


def memory_allocated(device=None) -> int:
    return memory.allocated


def max_memory_allocated(device=None) -> int:
    return memory.peak


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)  # kernels run on CPU aliases: the CPU generator is the one they use


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def seed() -> None:
    torch.seed()


def get_rng_state(device=None):
    return torch.get_rng_state()


def set_rng_state(state, device=None) -> None:
    torch.set_rng_state(state)
