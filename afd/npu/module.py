"""The torch.npu module of the fake NPU: devices, the current device and stream, synchronize, memory figures.

The devices are afd.npu.devices', the streams and which one is current afd.npu.streams'; this module gathers them
under torch.npu's names. AFD_NPU_SOC_NAME sets what get_device_name() says (default Ascend910_9392, an A3;
Ascend950PR_9599 once a job imports cann_ops_transformer). The SoC picks the operators' generation: the 950's V2 window path exists only on Ascend950*.
"""
from __future__ import annotations

import os

import torch

from . import devices as _devices
from . import streams as _streams
from .devices import current_device, device_count, device_index, set_device  # noqa: F401 (torch.npu's names)
from .memory import memory
from .streams import Event, Stream, StreamError, current_stream, default_stream, set_stream  # noqa: F401 (same)
from .tensors import release_kept

device = _devices.device  # with torch.npu.device(i): (torch.npu's functions below name their argument device too)
stream = _streams.stream  # with torch.npu.stream(s):

DEFAULT_SOC_NAME = "Ascend910_9392"  # an Atlas A3 die


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
    device_index(device)
    return soc_name()


def get_device_properties(device=None):
    from types import SimpleNamespace
    return SimpleNamespace(name=get_device_name(device), total_memory=_total_memory())


def _total_memory() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages)


def synchronize(device=None) -> None:
    """Wait for every stream of the device; a kept stream error is raised here."""
    if not _streams.busy and device is None:  # no stream has work pending or an error kept (the common case)
        return
    index = device_index(device)  # (a device given is checked, as torch_npu checks it, even with nothing to wait)
    if not _streams.busy:
        return
    for s in list(Stream.all_streams()):
        if s.device_index == index:
            s.synchronize()


def empty_cache() -> None:
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
