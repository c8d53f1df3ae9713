"""The npu device type: PrivateUse1 renamed, its tensor methods (`.npu()`, `is_npu`), `torch.npu`, hooks and guard."""
from __future__ import annotations

import sys

import torch

_ready = False


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, dev_id) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


def setup() -> None:
    """Once per process, in the order torch needs: name, methods, module, hooks, guard."""
    global _ready
    if _ready:
        return
    from torch.utils.backend_registration import _get_privateuse1_backend_name

    from . import module
    if _get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
        torch.utils.generate_methods_for_privateuse1_backend()
    torch._register_device_module("npu", module)
    sys.modules["torch.npu"] = module
    torch._C._acc.register_python_privateuseone_hook(_Hooks())
    torch._C._acc.register_python_privateuseone_device_guard(_Guard())
    _ready = True
