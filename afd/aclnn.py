"""The aclnn two-phase facade of aclnnInplaceAttentionWorkerScheduler, with the real status codes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import aclrt
from . import device as _device
from .errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, ACLNN_SUCCESS, AfdError, KernelError
from .layout import ScheduleContext
from .ops._polling import Idle, sched_yield
from .ops.attention_worker_scheduler import attention_worker_scheduler_
from .tokens import INT8

# aclDataType values used here (acl_base.h).
ACL_INT8 = 2
ACL_FORMAT_ND = 2
_ACL_DTYPES = {ACL_INT8: INT8}  # aclDataType -> the element type

# A failed AICPU kernel surfaces as this runtime status (the real phase 2 only launches, and the failure
# shows at aclrtSynchronizeStream; here the kernel runs at launch, so phase 2 returns it and the stream keeps it).
ACL_ERROR_RT_AICPU_EXCEPTION = aclrt.ACL_ERROR_RT_AICPU_EXCEPTION


def aclCreateTensor(shape, data_type: int, device_address: int) -> np.ndarray:
    """A contiguous ND tensor over device memory: a numpy view of `prod(shape)` elements at `device_address`."""
    dtype = _ACL_DTYPES.get(data_type)
    if dtype is None:
        raise AfdError("data_type", f"unsupported aclDataType {data_type}; the simulator knows {sorted(_ACL_DTYPES)}")
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape)) if shape else 1
    return _device.current().view(device_address, count * np.dtype(dtype).itemsize, dtype,
                                  field="deviceAddr").reshape(shape)


def aclDestroyTensor(tensor) -> int:
    return ACLNN_SUCCESS


@dataclass
class AclOpExecutor:
    """What phase 1 captured: the op and its context (a ScheduleContext or the int8 tensor); runs once."""

    op: str
    context: ScheduleContext | np.ndarray
    workspace_size: int = 0
    used: bool = False
    kernel_status: int | None = None  # KERNEL_STATUS_* of the run, once it ran
    error: KernelError | None = field(default=None, repr=False)


def _fail(status: int, message: str) -> int:
    return aclrt._fail(status, message)


def aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(schedule_context_ref):
    """Phase 1: the host checks. Returns (status, workspace_size, executor); executor is None on failure.

    Host checks of the real op_api: null -> 161001, rank != 1 -> 161002, empty -> 161002. The size (1024) is NOT
    checked here; the kernel checks it. Dtype: the op registers DT_INT8 only, and a tensor of another dtype would
    never reach an int8 kernel, so the simulator rejects it here with 161002 rather than guessing a later failure.
    """
    if schedule_context_ref is None:
        return _fail(ACLNN_ERR_PARAM_NULLPTR, "scheduleContextRef: is a null pointer"), 0, None
    if isinstance(schedule_context_ref, ScheduleContext):
        ctx = schedule_context_ref
    else:
        if not isinstance(schedule_context_ref, np.ndarray):
            return _fail(ACLNN_ERR_PARAM_INVALID,
                         f"scheduleContextRef: must be an int8 tensor (numpy array), "
                         f"got {type(schedule_context_ref).__name__}"), 0, None
        t = schedule_context_ref
        if t.ndim != 1:
            return _fail(ACLNN_ERR_PARAM_INVALID,
                         f"scheduleContextRef: dim must be 1 with shape (1024), got {t.ndim}-D {t.shape}"), 0, None
        if t.size == 0:
            return _fail(ACLNN_ERR_PARAM_INVALID, "scheduleContextRef: empty tensor is not supported"), 0, None
        if t.dtype != np.int8:
            return _fail(ACLNN_ERR_PARAM_INVALID,
                         f"scheduleContextRef: dtype must be int8 (DT_INT8), got {t.dtype}"), 0, None
        if not t.flags.c_contiguous:
            return _fail(ACLNN_ERR_PARAM_INVALID, "scheduleContextRef: non-contiguous tensor is not supported"), 0, None
        # The size (1024) is not checked here: the kernel's as_context rejects a short tensor at launch.
        ctx = t
    return ACLNN_SUCCESS, 0, AclOpExecutor("AttentionWorkerScheduler", ctx)


def aclnnInplaceAttentionWorkerScheduler(workspace, workspace_size: int, executor: AclOpExecutor | None,
                                         stream: aclrt.Stream | None = None, *, idle: Idle = sched_yield) -> int:
    """Phase 2: run the kernel in place (synchronously). 0 on success or on a run_flag=0 exit.

    A kernel check failure (KernelError, e.g. schedule_mode != 1) returns ACL_ERROR_RT_AICPU_EXCEPTION (507018)
    and is also kept on `stream` for aclrtSynchronizeStream; the kernel's own KERNEL_STATUS_* and the error are
    on the executor, and the message is in aclrt.aclGetRecentErrMsg().
    """
    if executor is None:
        return _fail(ACLNN_ERR_PARAM_NULLPTR, "executor: is a null pointer")
    if executor.used:
        return _fail(ACLNN_ERR_PARAM_INVALID, "executor: already ran; an aclOpExecutor runs once (call phase 1 again)")
    if int(workspace_size) < executor.workspace_size:
        return _fail(ACLNN_ERR_PARAM_INVALID,
                     f"workspaceSize: {workspace_size} is less than the {executor.workspace_size} phase 1 asked for")
    executor.used = True
    try:
        executor.kernel_status = attention_worker_scheduler_(executor.context, idle=idle)
    except KernelError as exc:
        executor.kernel_status, executor.error = exc.status, exc
        status = _fail(ACL_ERROR_RT_AICPU_EXCEPTION, f"AttentionWorkerScheduler kernel failed: {exc}")
        if stream is not None:
            stream.record(status)
        return status
    return ACLNN_SUCCESS
