"""The CANN AFD operators as functions over simulated device memory, named as torch_npu names them."""
from ._limits import set_strict, strict, strict_mode
from ._polling import Stopped, Waiting, sched_yield
from .attention_to_ffn import attention_to_ffn
from .attention_worker_combine import attention_worker_combine
from .attention_worker_scheduler import attention_worker_scheduler_
from .ffn_to_attention import ffn_to_attention
from .ffn_worker_batching import FfnBatch, ffn_worker_batching
from .ffn_worker_scheduler import ffn_worker_scheduler_
from .schedule_context import ScheduleContextError, ScheduleContextHolder, create_schedule_context_holder

__all__ = [
    "attention_worker_scheduler_", "attention_worker_combine", "ffn_to_attention", "attention_to_ffn",
    "ffn_worker_scheduler_", "ffn_worker_batching", "FfnBatch", "create_schedule_context_holder",
    "ScheduleContextHolder", "ScheduleContextError", "Stopped", "Waiting", "sched_yield", "strict",
    "strict_mode", "set_strict",
]
