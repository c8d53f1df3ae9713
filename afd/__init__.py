"""afd-sim: a hardware-free, multi-process twin of the Ascend AFD operator pipeline."""
from .errors import AclnnError, AfdError, ConfigError, KernelError

__version__ = "0.1.0"
__all__ = ["Pipeline", "run", "Result", "Config", "load_config", "Fault", "parse_fault", "AfdError", "AclnnError",
           "ConfigError", "KernelError"]

# Each of these loads on first use (afd.Pipeline, `from afd import run`, afd.load_config ...), so importing a module
# of the package (afd.npu under every `import torch`, afd.cli, afd.trace ...) pays for neither the launcher nor the
# config's pydantic and yaml nor numpy: name -> (module, its attribute).
_LAZY = {"Pipeline": ("launcher.pipeline", "Pipeline"), "run": ("launcher.pipeline", "run"),
         "Result": ("launcher.result", "Result"), "Config": ("config", "Config"), "load_config": ("config", "load"),
         "Fault": ("faults", "Fault"), "parse_fault": ("faults", "parse")}


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = globals()[name] = getattr(importlib.import_module(f".{where[0]}", __name__), where[1])
    return value
