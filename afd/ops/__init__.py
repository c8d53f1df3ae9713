"""The CANN AFD operators as functions over simulated device memory, named as torch_npu names them."""
import importlib
import sys
import types

# name -> its submodule. Each loads on first use, so a module that needs only afd.ops._polling (the fake NPU's streams,
# afd.waiting) does not load every operator, nor ml_dtypes and numba behind them.
_EXPORTS = {
    "attention_worker_scheduler_": "attention_worker_scheduler", "attention_worker_combine": "attention_worker_combine",
    "ffn_to_attention": "ffn_to_attention", "attention_to_ffn": "attention_to_ffn",
    "ffn_worker_scheduler_": "ffn_worker_scheduler", "ffn_worker_batching": "ffn_worker_batching",
    "FfnBatch": "ffn_worker_batching", "create_schedule_context_holder": "schedule_context",
    "ScheduleContextHolder": "schedule_context", "ScheduleContextError": "schedule_context", "Stopped": "_polling",
    "Waiting": "_polling", "sched_yield": "_polling", "strict": "_limits", "strict_mode": "_limits",
    "set_strict": "_limits",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on the package; where an operator has its module's name (attention_to_ffn
        # ...), afd.ops.<name> stays the operator, as `from afd.ops import attention_to_ffn` has always given.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
