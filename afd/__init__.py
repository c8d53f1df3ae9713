"""afd-sim: a hardware-free, multi-process twin of the Ascend AFD operator pipeline."""
from .config import Config, load as load_config
from .errors import AclnnError, AfdError, ConfigError, KernelError
from .faults import Fault, parse as parse_fault
from .runtime.pipeline import Pipeline, run
from .runtime.result import Result

__version__ = "0.1.0"
__all__ = ["Pipeline", "run", "Result", "Config", "load_config", "Fault", "parse_fault", "AfdError", "AclnnError",
           "ConfigError", "KernelError"]
