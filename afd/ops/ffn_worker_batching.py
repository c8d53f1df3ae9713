"""FfnWorkerBatching: sort the received (token, k) slots by local expert and gather their rows into one batch."""
from __future__ import annotations

import logging
from typing import NamedTuple

import ml_dtypes
import numpy as np

from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import (EXPERT_ID_INIT, EXPERT_ID_SENTINEL, FFN_OUT_NUM_OFFSET, FFN_POLLING_INDEX_OFFSET,
                      RUN_FLAG_OFFSET, VALID_FLAG, ScheduleContext)
from ._context import as_context, device_of, prepared, require_buffer
from ._polling import Idle, Stopped, Waiting, sched_yield
from .ffn_worker_scheduler import check_ffn_static, check_polling_index, ffn_records

log = logging.getLogger("afd.ops.ffn_worker_batching")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_OUT_NUM = FFN_OUT_NUM_OFFSET // 4
_POLLING_INDEX = FFN_POLLING_INDEX_OFFSET // 8
TOKEN_DTYPES = {0: np.dtype(np.float16), 1: np.dtype(ml_dtypes.bfloat16), 2: np.dtype(np.int8)}
MAX_SESSIONS, MAX_MICRO_BATCHES, MAX_K1, MAX_EXPERTS = 1024, 64, 64, 8192


class FfnBatch(NamedTuple):
    """The op's outputs; rows [0, actual_token_num) are valid, the rest are zero."""

    y: np.ndarray  # (Y, H) fp16 / bf16 / int8
    group_list: np.ndarray  # (expert_num, 2) int64: [local expert id, count] rows, then a [0, 0] terminator
    session_ids: np.ndarray  # (Y,) int32
    micro_batch_ids: np.ndarray  # (Y,) int32
    token_ids: np.ndarray  # (Y,) int32
    expert_offsets: np.ndarray  # (Y,) int32: the k slot (what FFNToAttention takes), not an in-group offset
    dynamic_scale: np.ndarray  # (Y,) float32: the fp32 after an int8 payload (token_dtype 2), else 0
    actual_token_num: np.ndarray  # (1,) int64


def check_ffn_worker_batching_host(schedule_context, expert_num: int, max_out_shape, token_dtype: int = 0,
                                   need_schedule: int = 0, layer_num: int = 0) -> None:
    """The aclnn and tiling checks (attributes only: the context's own fields are checked by the kernel)."""
    if schedule_context is None:
        raise AclnnError("schedule_context", "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    if token_dtype not in TOKEN_DTYPES:
        raise AclnnError("token_dtype", f"must be 0 (fp16), 1 (bf16) or 2 (int8 + fp32 scale), got {token_dtype}",
                         ACLNN_ERR_PARAM_INVALID)
    if need_schedule not in (0, 1):
        raise AclnnError("need_schedule", f"must be 0 or 1, got {need_schedule}", ACLNN_ERR_PARAM_INVALID)
    shape = tuple(int(v) for v in max_out_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise KernelError("max_out_shape", f"must be 4 positive entries [A, BS, K+1, H], got {list(shape)}")
    expert_num, layer_num = int(expert_num), int(layer_num)
    if not 0 < expert_num <= MAX_EXPERTS:
        raise KernelError("expert_num", f"must be in (0, {MAX_EXPERTS}], got {expert_num}")
    if layer_num < 0 or (layer_num > 0 and expert_num % layer_num):
        raise KernelError("layer_num", f"must be >= 0 and divide expert_num {expert_num}, got {layer_num}")


def _token_data(ctx: ScheduleContext, slots: int, hs: int) -> np.ndarray:
    """The FFN window's data region as (slots, HS) bytes, after its size check."""
    require_buffer(ctx.ffn, "token_data_buf", slots * hs)
    return device_of(ctx).view(ctx.ffn.token_data_buf, slots * hs, field="ffn.token_data_buf").reshape(-1, hs)


def _outputs(out: FfnBatch | None, y_cap: int, h: int, dtype: np.dtype, expert_num: int) -> FfnBatch:
    """The caller's output arrays where each has the op's shape and dtype (and is C-contiguous), else new ones:
    like the aclnn op, which writes into tensors its caller allocated (a role reuses one FfnBatch: a new y of
    6 MB per call also costs its page faults, ~10% of the gather measured)."""
    want = FfnBatch(((y_cap, h), dtype), ((expert_num, 2), np.int64), *[((y_cap,), np.int32)] * 4,
                    ((y_cap,), np.float32), ((1,), np.int64))
    given = out if out is not None else [None] * len(want)
    return FfnBatch(*(a if a is not None and a.shape == shape and a.dtype == dt and a.flags.c_contiguous
                      and a.flags.aligned and a.flags.writeable  # (unaligned: another kernel type, a compile)
                      else np.empty(shape, dt) for a, (shape, dt) in zip(given, want)))


def ffn_worker_batching(schedule_context, expert_num: int, max_out_shape, token_dtype: int = 0,
                        need_schedule: int = 0, layer_num: int = 0, *, idle: Idle = sched_yield,
                        out: FfnBatch | None = None) -> FfnBatch:
    """Batch the slots received from the attention sessions, sorted (stably) by local expert id.

    need_schedule=0 reads what FfnWorkerScheduler emitted (out_num sessions: session/mb ids and expert ids).
    need_schedule=1 waits itself for every session's header flag at polling_index, advances polling_index,
    takes that micro-batch's expert ids straight from the records, and after gathering resets them
    (expert ids INT32_MAX, flag 0). The real kernel has no exit from that wait; here a scan that is not ready
    re-reads run_flag and raises Stopped when it is 0, and idle(waiting) runs between scans.
    Sentinel ids (0x7F7F7F7F, INT32_MAX) are dropped; any other id outside [0, expert_num) is an error.
    Row g of y is the slot ((s*M + mb)*BS + token)*(K+1) + k of the FFN data region, HS =
    attn_to_ffn_token_size bytes apart. With layer_num > 0 the ids are already per layer (expert_num =
    local experts x layers) and must divide evenly.
    """
    check_ffn_worker_batching_host(schedule_context, expert_num, max_out_shape, token_dtype, need_schedule,
                                   layer_num)
    ctx = as_context(schedule_context)
    a, m, bs, k1 = prepared(ctx, "ffn_worker_batching", check_ffn_static)
    check_polling_index(ctx, m)
    shape = tuple(int(v) for v in max_out_shape)
    if shape[:3] != (a, bs, k1):
        raise KernelError("max_out_shape", f"must be [A={a}, BS={bs}, K+1={k1}, H>0], got {list(shape)}")
    h = shape[3]
    expert_num, layer_num = int(expert_num), int(layer_num)
    for name, value, hi in (("session_num", a, MAX_SESSIONS), ("micro_batch_num", m, MAX_MICRO_BATCHES),
                            ("selected_expert_num", k1, MAX_K1)):
        if not 0 < value <= hi:
            raise KernelError(name, f"must be in (0, {hi}], got {value}")
    dtype = TOKEN_DTYPES[token_dtype]
    hs = ctx.common.attn_to_ffn_token_size
    scale_at = (h + 31) // 32 * 32  # int8 payload: the fp32 scale sits at byte align32(H)
    row_bytes = scale_at + 4 if token_dtype == 2 else h * dtype.itemsize
    if row_bytes > hs:
        raise KernelError("common.attn_to_ffn_token_size", f"{hs} bytes per slot cannot hold a {row_bytes}-byte "
                                                           f"token (H={h}, token_dtype={token_dtype})")
    y_cap = a * bs * k1
    data = prepared(ctx, "ffn_worker_batching data", _token_data, a * m * bs * k1, hs)

    records = None
    if need_schedule:
        records = ffn_records(ctx, a, m, bs, k1)
        mb = _wait_all_sessions(ctx, records, a, idle)
        ctx.u64[_POLLING_INDEX] = (mb + 1) % m
        sessions = np.arange(a, dtype=np.int64)
        mbs = np.full(a, mb, np.int64)
        ids = records[:, mb, 2:].copy()
    else:
        sessions, mbs, ids = _emitted(ctx, a, m, bs, k1)

    # The sort by expert (a stable counting sort), each slot's source row and ids, and group_list in one compiled
    # pass; then each slot's token straight into its row of y, once, and only the rows past n zeroed (numpy's form
    # was an argsort, a unique, three passes over y and a temporary of whole slots).
    from ._kernels import batch_slots, copy_rows
    res = _outputs(out, y_cap, h, dtype, expert_num)
    src = np.empty(y_cap, np.int64)
    y, group_list, sess, mb_of, token, k, dynamic_scale = res[:7]
    n = batch_slots(np.ascontiguousarray(ids, np.int32), sessions, mbs, expert_num, m, bs, k1, EXPERT_ID_SENTINEL,
                    EXPERT_ID_INIT, np.empty(expert_num, np.int64), src, sess, mb_of, token, k, group_list)
    if n < 0:
        raise KernelError("expert_ids", f"id {int(ids.reshape(-1)[-1 - n])} is neither in [0, "
                                        f"expert_num={expert_num}) nor a sentinel")
    width = h * dtype.itemsize
    copy_rows(y.view(np.uint8).reshape(y_cap, width), np.arange(n, dtype=np.int64), data, src[:n], width)
    y[n:] = 0
    dynamic_scale[:] = 0
    if token_dtype == 2:
        dynamic_scale[:n] = np.ascontiguousarray(data[src[:n], scale_at:scale_at + 4]).view("<f4").reshape(n)

    if records is not None:  # the kernel's last core: release the records only after the gather
        records[:, mb, 2:] = EXPERT_ID_INIT
        records[:, mb, 0] = 0
    log.debug("batched %d slots", n)
    res.actual_token_num[0] = n
    return res


def _emitted_views(ctx: ScheduleContext, a: int, slots: int) -> dict[str, np.ndarray]:
    ffn, dev = ctx.ffn, device_of(ctx)
    views = {}
    for name, count in (("session_ids_buf", a), ("micro_batch_ids_buf", a), ("expert_ids_buf", a * slots)):
        require_buffer(ffn, name, 4 * count)
        views[name] = dev.view(getattr(ffn, name), 4 * count, "<i4", field=f"ffn.{name}")
    return views


def _emitted(ctx: ScheduleContext, a: int, m: int, bs: int, k1: int):
    """(session ids, micro-batch ids, expert ids [out_num, BS*(K+1)]) from FfnWorkerScheduler's out buffers."""
    out_num = int(ctx.u32[_OUT_NUM])
    if out_num > a:
        raise KernelError("ffn.out_num", f"{out_num} must be <= session_num {a}")
    views = prepared(ctx, "ffn_worker_batching emitted", _emitted_views, a, bs * k1)
    sessions = views["session_ids_buf"][:out_num].astype(np.int64)
    mbs = views["micro_batch_ids_buf"][:out_num].astype(np.int64)
    if sessions.size and (sessions.min() < 0 or sessions.max() >= a):
        raise KernelError("ffn.session_ids_buf", f"session ids must be in [0, {a}), got {sessions.tolist()}")
    if mbs.size and (mbs.min() < 0 or mbs.max() >= m):
        raise KernelError("ffn.micro_batch_ids_buf", f"micro-batch ids must be in [0, {m}), got {mbs.tolist()}")
    ids = views["expert_ids_buf"].reshape(a, bs * k1)[:out_num].copy()
    return sessions, mbs, ids


def _wait_all_sessions(ctx: ScheduleContext, records: np.ndarray, a: int, idle: Idle) -> int:
    """Spin until every session's header flag at polling_index is 1; returns that micro-batch."""
    mb = int(ctx.u64[_POLLING_INDEX])
    flags = records[:, mb, 0]
    waiting = Waiting("ffn_worker_batching", "ffn.token_info_buf header flags at polling_index", mb, needed=a,
                      flags=flags)
    while True:
        ready = int(np.count_nonzero(flags == VALID_FLAG))
        if ready == a:
            return mb
        if ctx.i32[_RUN_FLAG] == 0:  # sim-only exit: the real kernel would spin here forever
            raise Stopped(waiting, "run_flag is 0")
        waiting.ready = ready
        waiting.iterations += 1
        idle(waiting)
