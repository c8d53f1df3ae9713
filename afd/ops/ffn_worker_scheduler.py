"""FfnWorkerScheduler: wait for ready (session, micro-batch) records, copy them to the out buffers, reset them."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, KERNEL_STATUS_OK, AclnnError, KernelError
from ..layout import (
    EXPERT_ID_SENTINEL,
    FFN_OUT_NUM_OFFSET,
    FFN_POLLING_INDEX_OFFSET,
    RUN_FLAG_OFFSET,
    VALID_FLAG,
    FfnWindowLayout,
    ScheduleContext,
)
from ._context import as_context, checked_product, device_of, prepared, require_buffer, require_positive
from ._polling import Idle, Waiting, sched_yield

log = logging.getLogger("afd.ops.ffn_worker_scheduler")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_OUT_NUM = FFN_OUT_NUM_OFFSET // 4
_POLLING_INDEX = FFN_POLLING_INDEX_OFFSET // 8


def check_polling_index(ctx: ScheduleContext, m: int) -> None:
    """polling_index < M (the one check on a field the ops change: made per call, outside prepared)."""
    polling_index = int(ctx.u64[_POLLING_INDEX])
    if polling_index >= m:
        raise KernelError("ffn.polling_index", f"polling_index[{polling_index}] is out of range [0,{m})")


def check_ffn_static(ctx: ScheduleContext) -> tuple[int, int, int, int]:
    """The kernel's context checks shared by the FFN-side ops, but polling_index's (check_polling_index): what depends
    on the static fields only; returns (A, M, BS, K+1)."""
    common, ffn = ctx.common, ctx.ffn
    if common.schedule_mode != 0:
        raise KernelError("common.schedule_mode", f"The scheduler mode must be 'ffn' (0), got {common.schedule_mode}")
    require_positive(common, "session_num", "micro_batch_num", "micro_batch_size", "selected_expert_num")
    a, m, bs, k1 = (common.session_num, common.micro_batch_num, common.micro_batch_size,
                    common.selected_expert_num)
    require_buffer(ffn, "token_info_buf", checked_product("ffn.token_info_buf_size", a, m, 8 + 4 * bs * k1))
    require_buffer(ffn, "token_data_buf")
    return a, m, bs, k1


def _scheduler_views(ctx: ScheduleContext):
    """(A, M, BS, K+1, out buffers, records, their header flags) after the static checks."""
    a, m, bs, k1 = check_ffn_static(ctx)
    out = _out_buffers(ctx, a, bs, k1)
    records = ffn_records(ctx, a, m, bs, k1)
    return a, m, bs, k1, out, records, records[:, :, 0]  # flags: a live (A, M) view


def ffn_records(ctx: ScheduleContext, a: int, m: int, bs: int, k1: int) -> np.ndarray:
    """Live int32 view [A, M, 2 + BS*(K+1)] of the FFN window's records (flag, layer_id, expert ids)."""
    layout = FfnWindowLayout(a, m, bs, k1, 512)
    return device_of(ctx).view(ctx.ffn.token_info_buf, layout.info_bytes, "<i4",
                               field="ffn.token_info_buf").reshape(layout.records_shape)


def _out_buffers(ctx: ScheduleContext, a: int, bs: int, k1: int) -> dict[str, np.ndarray]:
    ffn, dev = ctx.ffn, device_of(ctx)
    out = {}
    for name, count in (("layer_ids_buf", a), ("session_ids_buf", a), ("micro_batch_ids_buf", a),
                        ("expert_ids_buf", a * bs * k1)):
        require_buffer(ffn, name, 4 * count)
        out[name] = dev.view(getattr(ffn, name), 4 * count, "<i4", field=f"ffn.{name}")
    out["expert_ids_buf"] = out["expert_ids_buf"].reshape(a, bs * k1)
    return out


def _emit(ctx, records: np.ndarray, out: dict, m: int, first: int, count: int) -> None:
    """Copy records (s, m) of sessions [first, first + count) to out slots out_num.., then reset them: expert ids to
    0x7F7F7F7F, flag 0 last (slices throughout: fancy indexing cost ~1 us an access)."""
    base = int(ctx.u32[_OUT_NUM])
    idx, which = slice(base, base + count), slice(first, first + count)
    rec = records[which, m]
    out["layer_ids_buf"][idx] = rec[:, 1]
    out["session_ids_buf"][idx] = np.arange(first, first + count)
    out["micro_batch_ids_buf"][idx] = m
    out["expert_ids_buf"][idx] = rec[:, 2:]
    records[which, m, 2:] = EXPERT_ID_SENTINEL
    records[which, m, 0] = 0  # releases AttentionToFFN's backpressure on (s, m): only after the reset
    ctx.u32[_OUT_NUM] = base + count


def check_ffn_worker_scheduler_host(schedule_context, execute_mode: int = 0) -> None:
    """The aclnn host checks: null -> 161001; not 1-D, empty, or execute_mode != 0 -> 161002."""
    if schedule_context is None:
        raise AclnnError("schedule_context", "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    if not isinstance(schedule_context, ScheduleContext):
        arr = np.asarray(schedule_context)
        if arr.ndim != 1 or arr.size == 0:
            raise AclnnError("schedule_context", f"must be a non-empty 1-D tensor (1024), got shape {arr.shape}",
                             ACLNN_ERR_PARAM_INVALID)
    if execute_mode != 0:
        raise AclnnError("execute_mode", f"must be 0 (execute once), got {execute_mode}", ACLNN_ERR_PARAM_INVALID)


def ffn_worker_scheduler_(schedule_context, sync_group_size: int | None, execute_mode: int = 0, *,
                          idle: Idle = sched_yield) -> int:
    """In place: wait for ready records, emit them to the FFN out buffers, reset them; OK on run_flag = 0.

    sync_group_size == A (one group, "all-sync"): waits until every session's record at polling_index has
    flag 1, emits that micro-batch for all sessions and advances polling_index. Smaller groups: waits until
    some group is ready at some micro-batch, then emits, per group, its lowest ready micro-batch.
    out_num is 0 on entry and stays 0 if run_flag drops to 0. run_flag is re-read on every scan and idle()
    runs between scans in both branches (the real all-sync branch busy-loops without yielding).
    """
    check_ffn_worker_scheduler_host(schedule_context, execute_mode)
    ctx = as_context(schedule_context)
    a, m, bs, k1, out, records, flags = prepared(ctx, "ffn_worker_scheduler_", _scheduler_views)
    check_polling_index(ctx, m)
    group_size = a if sync_group_size is None else int(sync_group_size)
    if not 1 <= group_size <= a or a % group_size:
        raise KernelError("sync_group_size", f"must be in [1, {a}] and divide session_num {a}, got {group_size}")
    i32 = ctx.i32
    ctx.u32[_OUT_NUM] = 0
    group_num = a // group_size
    waiting = Waiting("ffn_worker_scheduler_", "ffn.token_info_buf header flags", needed=group_size, flags=flags)
    if group_num == 1:
        while i32[_RUN_FLAG] != 0:
            mb = int(ctx.u64[_POLLING_INDEX])
            ready = int(np.count_nonzero(flags[:, mb] == VALID_FLAG))
            if ready == a:
                _emit(ctx, records, out, mb, 0, a)
                ctx.u64[_POLLING_INDEX] = (mb + 1) % m
                log.info("FfnWorkerScheduler end, micro_batch_id=%d, out_num=%d", mb, a)
                return KERNEL_STATUS_OK
            waiting.micro_batch_id, waiting.ready = mb, ready
            waiting.iterations += 1
            idle(waiting)
        log.info("Compute FfnWorkerScheduler exit because run flag=0.")
        return KERNEL_STATUS_OK
    while i32[_RUN_FLAG] != 0:
        if _ready_groups(flags, group_num, group_size).any():
            break
        waiting.iterations += 1
        idle(waiting)
    if i32[_RUN_FLAG] == 0:
        log.info("Compute FfnWorkerScheduler exit because run flag=0.")
        return KERNEL_STATUS_OK
    ready = _ready_groups(flags, group_num, group_size)  # re-scanned: groups that became ready meanwhile count
    for g in range(group_num):
        ms = np.flatnonzero(ready[g])
        if ms.size:
            _emit(ctx, records, out, int(ms[0]), g * group_size, group_size)
    log.info("FfnWorkerScheduler end, out_num=%d", int(ctx.u32[_OUT_NUM]))
    return KERNEL_STATUS_OK


def _ready_groups(flags: np.ndarray, group_num: int, group_size: int) -> np.ndarray:
    """(groups, M) bool: every session of the group has flag 1 at that micro-batch."""
    return (flags == VALID_FLAG).reshape(group_num, group_size, -1).all(axis=1)
