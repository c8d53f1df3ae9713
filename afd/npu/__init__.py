"""The fake Ascend NPU for PyTorch: `install()` gives `torch.npu`, the `npu` device, `torch_npu` with its AFD ops, and
`cann_ops_transformer` (the 950's V2 window operators) on import.

Nothing happens on import: a real torch_npu is never hidden unless asked. `afd npu -- COMMAND` asks for the
command and every process it starts (AFD_NPU=1 and a `torch_npu` package first on PYTHONPATH); in Python,
`import afd.npu; afd.npu.install()`.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading

ENV = "AFD_NPU"
SHIM_DIR = os.path.join(os.path.dirname(__file__), "_shim")  # holds the `torch_npu` package `afd npu` puts first
_lock = threading.RLock()
_done = False


class NpuInstallError(RuntimeError):
    """The fake NPU cannot be put in place (torch missing, or another npu backend already loaded)."""


def installed() -> bool:
    return _done


def install() -> None:
    """Put the fake NPU in place in this process (idempotent)."""
    global _done
    with _lock:
        if _done:
            return
        try:
            import torch  # noqa: F401 (needed below through the submodules)
        except ImportError:
            raise NpuInstallError("afd.npu needs torch (CPU): pip install 'afd-sim[npu]'") from None
        from torch.utils.backend_registration import _get_privateuse1_backend_name
        name = _get_privateuse1_backend_name()
        if name not in ("privateuseone", "npu"):
            raise NpuInstallError(f"torch's PrivateUse1 device is already {name!r}; the fake NPU needs it as 'npu'")
        if name == "npu" and not _done and "torch_npu" in sys.modules and \
                not getattr(sys.modules["torch_npu"], "__afd_fake__", False):
            raise NpuInstallError("a real torch_npu is already loaded in this process; not replacing it")
        from . import backend
        backend.setup()
        from . import api, dispatch, hccl, operators
        dispatch.install()
        operators.install()
        hccl.install()
        api.install_modules()
        _offer_cann_ops_transformer()
        _clean_up_at_exit()
        _done = True


COT = "cann_ops_transformer"


class _CotFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `import cann_ops_transformer` with the fake's package, built on first import. It sits last on
    sys.meta_path, so a real cann_ops_transformer on sys.path is found first and never hidden."""

    def find_spec(self, name, path, target=None):
        if name in (COT, f"{COT}.ops"):
            return importlib.util.spec_from_loader(name, self, is_package=name == COT)
        return None

    def create_module(self, spec):
        from . import cot
        pkg = cot.build()
        return pkg if spec.name == COT else pkg.ops

    def exec_module(self, module) -> None:
        pass


def _offer_cann_ops_transformer() -> None:
    loaded = sys.modules.get(COT)
    if loaded is not None and not getattr(loaded, "__afd_fake__", False):
        return  # a real one is already imported: it stays
    if not any(isinstance(f, _CotFinder) for f in sys.meta_path):
        sys.meta_path.append(_CotFinder())


def _clean_up_at_exit() -> None:
    """torchrun ends the other ranks of a failed job with SIGTERM: leave nothing behind (the `afd stop` listing,
    this rank's trace part) however the rank ends, short of SIGKILL, and wherever it is blocked; a rank whose
    torchrun is gone ends too."""
    from .. import exit_cleanup
    from . import registry, trace, watchdog
    exit_cleanup.register(registry.clear)
    exit_cleanup.register(trace.write)
    watchdog.end_with_launcher()


def _autoload() -> None:
    """torch's device-backend entry point: runs inside `import torch`; installs only when AFD_NPU=1 asks."""
    if os.environ.get(ENV, "") not in ("", "0"):
        install()


if os.environ.get(ENV, "") not in ("", "0"):
    # Under `afd npu`, `import torch` installs the fake (the entry point above). Importing torch here first, before
    # any submodule, means a script that imports an afd.npu module before torch never has torch's import (and so
    # install()) run while that submodule is half imported.
    import torch  # noqa: F401,E402
