"""What `import torch_npu` gives on the fake NPU: the AFD operators as torch_npu names them, torch_npu.npu, _afd.

Only the AFD family is there (and the `torch_npu.npu` module with streams, events, synchronize): anything else a
script reaches for raises an AttributeError that says the fake NPU does not have it.
"""
from __future__ import annotations

import sys
import types

import torch

from ..ops import catalog

VERSION = "2.14.0"


class _FakeModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name}: the fake NPU (afd-sim) has only the AFD operators, "
                             "torch_npu.npu and torch_npu._afd")


def build() -> types.ModuleType:
    """The torch_npu module object (its _afd submodule too)."""
    from . import holder
    mod = _FakeModule("torch_npu", __doc__)
    mod.__afd_fake__ = True
    mod.__version__ = VERSION
    mod.__path__ = []  # a package, so `import torch_npu._afd` finds the submodule in sys.modules
    ops = catalog.entries(catalog.NPU)
    for name in ops:
        setattr(mod, name, getattr(torch.ops.npu, name))
    mod.npu = torch.npu
    afd = _FakeModule("torch_npu._afd", holder.__doc__)
    afd.__afd_fake__ = True
    afd.create_schedule_context_holder = holder.create_schedule_context_holder
    afd.ScheduleContextHolder = holder.ScheduleContextHolder
    for name, (_, entry) in ops.items():
        if entry.bound_to_afd:  # torch_npu/utils/_afd_ops.py binds the schedulers onto torch_npu._afd
            setattr(afd, name, getattr(torch.ops.npu, name))
    mod._afd = afd
    return mod


def install_modules() -> None:
    """Make `import torch_npu` (and torch_npu._afd, torch_npu.npu) give the fake."""
    if getattr(sys.modules.get("torch_npu"), "__afd_fake__", False):
        return
    mod = build()
    sys.modules["torch_npu"] = mod
    sys.modules["torch_npu._afd"] = mod._afd
    sys.modules["torch_npu.npu"] = torch.npu
