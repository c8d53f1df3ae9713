"""afd-sim: a hardware-free, multi-process twin of the Ascend AFD operator pipeline."""
from .config import Config, load as load_config
from .errors import AclnnError, AfdError, ConfigError, KernelError
from .faults import Fault, parse as parse_fault

__version__ = "0.1.0"
__all__ = ["Pipeline", "run", "Result", "Config", "load_config", "Fault", "parse_fault", "AfdError", "AclnnError",
           "ConfigError", "KernelError"]

# The launcher loads on first use (afd.Pipeline, afd.run, afd.Result, `from afd import run`), so importing a
# module of the package (afd.trace, afd.ops, ...) does not import the runtime.
_LAZY = {"Pipeline": "runtime.pipeline", "run": "runtime.pipeline", "Result": "runtime.result"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    return value
