"""AttentionWorkerScheduler: poll the flags of micro-batch (micro_batch_id+1) % M until all are 1 or run_flag is 0."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import KERNEL_STATUS_OK, KernelError
from ..layout import ATTENTION_MICRO_BATCH_ID_OFFSET, RUN_FLAG_OFFSET, VALID_FLAG, ScheduleContext
from ._context import as_context, checked_product, device_of, prepared, require_buffer, require_positive
from ._polling import Idle, Waiting, sched_yield

log = logging.getLogger("afd.ops.attention_worker_scheduler")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_MICRO_BATCH_ID = ATTENTION_MICRO_BATCH_ID_OFFSET // 4


def checked_micro_batch_id(ctx: ScheduleContext, m: int) -> int:
    """attention.micro_batch_id, which must be < M (read per call: the ops change it)."""
    micro_batch_id = int(ctx.u32[_MICRO_BATCH_ID])
    if micro_batch_id >= m:
        raise KernelError("attention.micro_batch_id", f"micro_batch_id[{micro_batch_id}] is out of range [0,{m})")
    return micro_batch_id


def check_attention_static(ctx: ScheduleContext) -> tuple[int, int, int]:
    """The kernel's parameter checks but micro_batch_id's (checked_micro_batch_id, per call: the ops change it): the
    static fields only; returns (M, BS, K+1)."""
    common, attention = ctx.common, ctx.attention
    if common.schedule_mode != 1:
        raise KernelError("common.schedule_mode",
                          f"The scheduler mode must be 'attention' (1), got {common.schedule_mode}")
    require_positive(common, "micro_batch_num", "micro_batch_size", "selected_expert_num")
    m, bs, k1 = common.micro_batch_num, common.micro_batch_size, common.selected_expert_num
    require_buffer(attention, "token_info_buf", checked_product("attention.token_info_buf_size", m, bs, k1, 4))
    require_buffer(attention, "token_data_buf")
    return m, bs, k1


def _flag_views(ctx: ScheduleContext) -> tuple:
    """After the static checks: (M, BS, K+1, each micro-batch's live [BS, K+1] flags, the same flags as byte
    memoryviews, the all-ready pattern, the all-zero one)."""
    m, bs, k1 = check_attention_static(ctx)
    views = [attention_flags(ctx, mb, m, bs, k1) for mb in range(m)]
    all_ready = np.full(bs * k1, VALID_FLAG, "<i4").tobytes()
    return m, bs, k1, views, [memoryview(v).cast("B") for v in views], all_ready, bytes(len(all_ready))


def attention_flags(ctx: ScheduleContext, micro_batch_id: int, m: int, bs: int, k1: int) -> np.ndarray:
    """Live int32 view [BS, K+1] of one micro-batch's flags in the attention window."""
    flag_num = bs * k1
    return device_of(ctx).view(ctx.attention.token_info_buf + micro_batch_id * flag_num * 4, flag_num * 4, "<i4",
                               field="attention.token_info_buf").reshape(bs, k1)


def attention_worker_scheduler_(schedule_context, *, idle: Idle = sched_yield) -> int:
    """In place: wait for every flag of the next micro-batch, zero them, set micro_batch_id; OK on run_flag=0."""
    ctx = as_context(schedule_context)
    m, bs, k1, flag_views, flag_bytes, all_ready, zeros = prepared(ctx, "attention_worker_scheduler_", _flag_views)
    target = (checked_micro_batch_id(ctx, m) + 1) % m
    flags2d = flag_views[target]
    flags = flags2d.reshape(-1)
    flag_num = flags.size
    # run_flag and micro_batch_id through memoryviews (a plain int, no numpy scalar): ~2 us less right after a wake-up
    i32, u32 = memoryview(ctx.i32), memoryview(ctx.u32)
    waiting = Waiting("attention_worker_scheduler_", "attention.token_info_buf flags", target, needed=flag_num,
                      flags=flags2d)
    last_ready = 0
    ready = 0
    # "every flag exactly 1" is a byte compare with the all-ones pattern (2 or -1 never match); the count
    # itself only feeds the log and the watchdog, so it is taken when logging or every 64th scan.
    verbose = log.isEnabledFor(logging.DEBUG)
    info = log.isEnabledFor(logging.INFO)
    while i32[_RUN_FLAG] != 0:  # re-read every iteration: another process may stop us
        if flags.tobytes() == all_ready:
            ready = flag_num
            if info:
                log.info("micro_batch_id[%u] all %zu flags ready", target, flag_num)
            break
        if not verbose and waiting.iterations & 63:
            waiting.iterations += 1
            idle(waiting)
            continue
        ready = int(np.count_nonzero(flags == VALID_FLAG))  # exactly 1; 2 or -1 are not ready
        if ready != last_ready:
            last_ready = ready
            if log.isEnabledFor(logging.DEBUG):
                log.debug("micro_batch_id[%u] ready count=%d, need flag_num=%d, flags=%s", target, ready, flag_num,
                          flags2d.tolist())
        waiting.ready = ready
        waiting.iterations += 1
        idle(waiting)
    if i32[_RUN_FLAG] == 0:  # checked after the loop too: a stop wins over a simultaneous "ready"
        # ready_cnt is logged as 0: the real kernel passes last_ready_cnt by value (a cosmetic bug kept as is).
        log.info("Compute AttentionWorkerScheduler exit because run_flag=0, ready_cnt=%d, flag_num=%d.", 0, flag_num)
        return KERNEL_STATUS_OK
    # Zeroed through a memoryview and logged only when enabled: this runs right after the wake-up, when on this VM
    # every call takes ~15x its warm time, and numpy's scalar assignment is many more calls than a memmove.
    flag_bytes[target][:] = zeros
    u32[_MICRO_BATCH_ID] = target
    if info:
        log.info("Compute AttentionWorkerScheduler end, micro_batch_id=%u", target)
    return KERNEL_STATUS_OK
