"""FfnWorkerBatching: sort the received (token, k) slots by local expert and gather their rows into one batch."""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import (
    CONTEXT_SIZE,
    EXPERT_ID_INIT,
    EXPERT_ID_SENTINEL,
    FFN_OUT_NUM_OFFSET,
    FFN_POLLING_INDEX_OFFSET,
    RUN_FLAG_OFFSET,
    VALID_FLAG,
    ScheduleContext,
)
from ..tokens import (
    BATCHING_TOKEN_DTYPE_CODES,
    BATCHING_TOKEN_DTYPES,
    DTYPE_NAMES,
    FP4_E2M1,
    FP32,
    check_generation,
    describe_codes,
)
from ._context import as_context, device_of, prepared, require_buffer
from ._polling import Idle, Stopped, Waiting, sched_yield
from ._spec import OutputSpec
from .ffn_worker_scheduler import check_ffn_static, check_polling_index, ffn_records

log = logging.getLogger("afd.ops.ffn_worker_batching")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_OUT_NUM = FFN_OUT_NUM_OFFSET // 4
_POLLING_INDEX = FFN_POLLING_INDEX_OFFSET // 8
MAX_SESSIONS, MAX_MICRO_BATCHES, MAX_K1, MAX_EXPERTS = 1024, 64, 64, 8192
MASK_ID = 1000000  # V2: a slot whose id is >= this (signed compare) is masked
UINT8 = np.dtype(np.uint8)


class FfnBatch(NamedTuple):
    """The op's outputs (shapes and dtypes: output_spec); rows [0, actual_token_num) are valid, the rest zero."""

    y: np.ndarray  # (Y, H) fp16 / bf16 / int8 / fp8; fp4 (950): (Y, H/2) uint8, two elements a byte
    group_list: np.ndarray  # (expert_num, 2) int64: [local expert id, count] rows in ascending id, then zeros
    session_ids: np.ndarray  # (Y,) int32
    micro_batch_ids: np.ndarray  # (Y,) int32
    token_ids: np.ndarray  # (Y,) int32
    expert_offsets: np.ndarray  # (Y,) int32: the k slot (what FFNToAttention takes), not an in-group offset
    dynamic_scale: np.ndarray  # (Y,) float32: an int8 row's scale, else 0; MX (950): (Y, ceil(H/32)) E8M0
    actual_token_num: np.ndarray  # (1,) int64


def output_spec(expert_num: int, max_out_shape, token_dtype: int = 0, generation: str = "A3",
                mx_output_uint8: bool = False) -> tuple[OutputSpec, ...]:
    """The one rule for FfnWorkerBatching's eight outputs, in FfnBatch order: (name, shape, numpy dtype, torch
    dtype name) each, from the call's attributes; Y = A*BS*(K+1) of max_out_shape = [A, BS, K+1, H].

    y: [Y, H] of the token dtype's element (fp16, bf16, int8, float8_e5m2, float8_e4m3fn); fp4 (token_dtype 5):
    [Y, H/2] bytes, numpy uint8 (two e2m1 a byte), torch float4_e2m1fn_x2. dynamic_scale: float32 [Y] for token
    dtypes 0-2, E8M0 [Y, ceil(H/32)] (torch float8_e8m0fnu) for 3-5. group_list [expert_num, 2] int64; the four
    id outputs int32 [Y]; actual_token_num int64 [1]. mx_output_uint8 (cann_ops_transformer's wrapper only): E8M0
    scales (numpy and torch) and fp4 y (torch) as uint8 (fp8 y keeps its dtype). The real wrapper also re-strides
    an fp4 y of shape (1, 1) to strides (2, 1): a torch detail a front-end adds. A token dtype the generation
    lacks raises as the host check does. Memoised: the op asks for it on every call."""
    shape = tuple(int(v) for v in max_out_shape)
    if len(shape) != 4:
        raise AclnnError("max_out_shape", f"must be [A, BS, K, H], got {list(shape)}", ACLNN_ERR_PARAM_INVALID)
    return _output_spec(int(expert_num), shape, int(token_dtype), check_generation(generation),
                        bool(mx_output_uint8))


@lru_cache(maxsize=64)
def _output_spec(expert_num: int, shape: tuple[int, ...], token_dtype: int, generation: str,
                 mx_output_uint8: bool) -> tuple[OutputSpec, ...]:
    _check_token_dtype(token_dtype, generation)
    a, bs, k1, h = shape
    y_rows = a * bs * k1
    fmt = BATCHING_TOKEN_DTYPES[token_dtype]
    if fmt.element == FP4_E2M1:  # two elements a byte
        y = (y_rows, fmt.payload_bytes(h)), UINT8, "uint8" if mx_output_uint8 else DTYPE_NAMES[fmt.element]
    else:
        y = (y_rows, h), fmt.element, DTYPE_NAMES[fmt.element]
    if fmt.mx:
        scale = ((y_rows, fmt.scale_count(h)), UINT8, "uint8") if mx_output_uint8 else (
            (y_rows, fmt.scale_count(h)), fmt.scale, DTYPE_NAMES[fmt.scale])
    else:
        scale = (y_rows,), FP32, DTYPE_NAMES[FP32]
    int32, int64 = np.dtype(np.int32), np.dtype(np.int64)
    rows = ((y_rows,), int32, "int32")
    rules = (y, ((expert_num, 2), int64, "int64"), rows, rows, rows, rows, scale, ((1,), int64, "int64"))
    return tuple(OutputSpec(name, tuple(shp), np.dtype(dt), torch)
                 for name, (shp, dt, torch) in zip(FfnBatch._fields, rules))


def _check_token_dtype(token_dtype: int, generation: str) -> None:
    codes = BATCHING_TOKEN_DTYPE_CODES[generation]
    if token_dtype not in codes:
        raise AclnnError("token_dtype", f"must be {describe_codes(BATCHING_TOKEN_DTYPES, codes)}, got {token_dtype}",
                         ACLNN_ERR_PARAM_INVALID)


def check_ffn_worker_batching_host(schedule_context, expert_num: int, max_out_shape, token_dtype: int = 0,
                                   need_schedule: int = 0, layer_num: int = 0, *, sync_flag: bool = False,
                                   generation: str = "A3") -> None:
    """The aclnn and tiling checks (attributes only: the context's own fields are checked by the kernel).
    A3: V1's (sync_flag is a V2 attribute: True is refused). 950: V2's, in the order of the real wrapper's
    _validate, every one 161002 (161001 for a null context)."""
    check_generation(generation)
    if schedule_context is None:
        raise AclnnError("schedule_context", "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    if generation == "950":
        _check_v2_host(schedule_context, expert_num, max_out_shape, token_dtype, need_schedule, layer_num,
                       sync_flag)
        return
    if sync_flag:
        raise AclnnError("sync_flag", "is an FfnWorkerBatching V2 (Ascend 950) attribute: must be False on A3",
                         ACLNN_ERR_PARAM_INVALID)
    _check_token_dtype(token_dtype, generation)
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


def _check_v2_host(schedule_context, expert_num, max_out_shape, token_dtype, need_schedule, layer_num,
                   sync_flag) -> None:
    def invalid(field: str, rule: str):
        raise AclnnError(field, rule, ACLNN_ERR_PARAM_INVALID)

    if not isinstance(schedule_context, ScheduleContext):
        arr = np.asarray(schedule_context)
        if arr.dtype != np.int8:
            invalid("schedule_context", f"must have dtype int8, got {arr.dtype}")
        if arr.ndim != 1:
            invalid("schedule_context", f"must be one-dimensional, got {arr.ndim} dimensions")
        if arr.nbytes < CONTEXT_SIZE:
            invalid("schedule_context", f"needs at least {CONTEXT_SIZE} bytes, got {arr.nbytes}")
    shape = [int(v) for v in max_out_shape]
    if len(shape) != 4:
        invalid("max_out_shape", f"must be [A, BS, K, H], got {shape}")
    a, bs, k1, h = shape
    if not 0 < a <= MAX_SESSIONS:
        invalid("max_out_shape", f"A must be in [1, {MAX_SESSIONS}], got {a}")
    if bs <= 0:
        invalid("max_out_shape", f"BS must be positive, got {bs}")
    if not 0 < k1 <= MAX_K1:
        invalid("max_out_shape", f"K must be in [1, {MAX_K1}], got {k1}")
    if h <= 0:
        invalid("max_out_shape", f"H must be positive, got {h}")
    if a * bs * k1 > EXPERT_ID_INIT:
        invalid("max_out_shape", f"A*BS*K = {a}*{bs}*{k1} must be <= INT32_MAX ({EXPERT_ID_INIT})")
    expert_num, layer_num = int(expert_num), int(layer_num)
    if not 0 < expert_num <= MAX_EXPERTS:
        invalid("expert_num", f"must be in [1, {MAX_EXPERTS}], got {expert_num}")
    _check_token_dtype(token_dtype, "950")
    if need_schedule not in (0, 1):
        invalid("need_schedule", f"must be 0 or 1, got {need_schedule}")
    if not isinstance(sync_flag, (bool, np.bool_)) and sync_flag not in (0, 1):
        invalid("sync_flag", f"must be bool, got {sync_flag!r}")
    if not 0 <= layer_num <= expert_num:
        invalid("layer_num", f"must be in [0, expert_num={expert_num}], got {layer_num}")
    if need_schedule == 1 and sync_flag:
        if layer_num == 0:
            invalid("layer_num", "async RECV (need_schedule=1, sync_flag=True) requires layer_num > 0")
        if expert_num % layer_num:
            invalid("layer_num", f"async RECV requires expert_num {expert_num} divisible by layer_num {layer_num}")
    if token_dtype == 5 and h % 2:
        invalid("max_out_shape", f"FP4 (token_dtype 5) requires even H, got {h}")


def _token_data(ctx: ScheduleContext, slots: int, hs: int) -> np.ndarray:
    """The FFN window's data region as (slots, HS) bytes, after its size check."""
    require_buffer(ctx.ffn, "token_data_buf", slots * hs)
    return device_of(ctx).view(ctx.ffn.token_data_buf, slots * hs, field="ffn.token_data_buf").reshape(-1, hs)


def _outputs(out: FfnBatch | None, expert_num: int, shape: tuple[int, ...], token_dtype: int,
             generation: str) -> FfnBatch:
    """The caller's output arrays where each has the op's shape and dtype (output_spec's, or its mx_output_uint8
    twin) and is C-contiguous, else new ones: like the aclnn op, which writes into tensors its caller allocated
    (a role reuses one FfnBatch: a new y of 6 MB per call also costs its page faults, ~10% of the gather
    measured)."""
    want = _output_spec(expert_num, shape, token_dtype, generation, False)
    twin = _output_spec(expert_num, shape, token_dtype, generation, True)
    given = out if out is not None else [None] * len(want)
    return FfnBatch(*(a if a is not None and a.shape == spec.shape and a.dtype in (spec.dtype, alt.dtype)
                      and a.flags.c_contiguous and a.flags.aligned and a.flags.writeable
                      # (unaligned: another kernel type, a compile)
                      else np.empty(spec.shape, spec.dtype) for a, spec, alt in zip(given, want, twin)))


def ffn_worker_batching(schedule_context, expert_num: int, max_out_shape, token_dtype: int = 0,
                        need_schedule: int = 0, layer_num: int = 0, *, sync_flag: bool = False,
                        generation: str = "A3", idle: Idle = sched_yield, out: FfnBatch | None = None) -> FfnBatch:
    """Batch the slots received from the attention sessions, sorted (stably) by local expert id.

    generation "A3" (V1, aclnnFfnWorkerBatching): need_schedule=0 reads what FfnWorkerScheduler emitted (out_num
    sessions: session/mb ids and expert ids). need_schedule=1 waits itself for every session's header flag at
    polling_index, advances polling_index, takes that micro-batch's expert ids straight from the records, and
    after gathering resets them (expert ids INT32_MAX, flag 0). The real kernel has no exit from that wait; here
    a scan that is not ready re-reads run_flag and raises Stopped when it is 0, and idle(waiting) runs between
    scans. Sentinel ids (0x7F7F7F7F, INT32_MAX) are dropped; any other id outside [0, expert_num) is an error.
    Row g of y is the slot ((s*M + mb)*BS + token)*(K+1) + k of the FFN data region, HS =
    attn_to_ffn_token_size bytes apart. With layer_num > 0 the ids are already per layer (expert_num =
    local experts x layers) and must divide evenly. sync_flag must be False.

    generation "950" (V2, aclnnFfnWorkerBatchingV2): token dtypes 0-5 copied as bytes, ids < 1000000 valid
    (no error for any id), the wait-all receive (flag sum >= A) or with sync_flag the snapshot receive and the
    layer regroup; details, and what afd-sim does where the hardware leaves things undefined, in _batch_v2.
    """
    check_ffn_worker_batching_host(schedule_context, expert_num, max_out_shape, token_dtype, need_schedule,
                                   layer_num, sync_flag=sync_flag, generation=generation)
    ctx = as_context(schedule_context)
    a, m, bs, k1 = prepared(ctx, "ffn_worker_batching", check_ffn_static)
    check_polling_index(ctx, m)
    shape = tuple(int(v) for v in max_out_shape)
    expert_num, layer_num = int(expert_num), int(layer_num)
    if generation == "950":
        return _batch_v2(ctx, (a, m, bs, k1), expert_num, shape, token_dtype, need_schedule, layer_num,
                         bool(sync_flag), idle, out)
    if shape[:3] != (a, bs, k1):
        raise KernelError("max_out_shape", f"must be [A={a}, BS={bs}, K+1={k1}, H>0], got {list(shape)}")
    h = shape[3]
    for name, value, hi in (("session_num", a, MAX_SESSIONS), ("micro_batch_num", m, MAX_MICRO_BATCHES),
                            ("selected_expert_num", k1, MAX_K1)):
        if not 0 < value <= hi:
            raise KernelError(name, f"must be in (0, {hi}], got {value}")
    fmt = BATCHING_TOKEN_DTYPES[token_dtype]
    hs = ctx.common.attn_to_ffn_token_size
    scale_at = fmt.scale_at(h, generation, writer=False)  # int8 payload: the fp32 scale sits at byte align32(H)
    row_bytes = fmt.row_bytes(h, generation)
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
    res = _outputs(out, expert_num, shape, token_dtype, generation)
    src = np.empty(y_cap, np.int64)
    gather = np.empty((2, y_cap), np.int64)
    y, group_list, sess, mb_of, token, k, dynamic_scale = res[:7]
    n = batch_slots(np.ascontiguousarray(ids, np.int32), sessions, mbs, expert_num, m, bs, k1, EXPERT_ID_SENTINEL,
                    EXPERT_ID_INIT, np.empty(expert_num, np.int64), src, sess, mb_of, token, k, group_list, gather)
    if n < 0:
        raise KernelError("expert_ids", f"id {int(ids.reshape(-1)[-1 - n])} is neither in [0, "
                                        f"expert_num={expert_num}) nor a sentinel")
    width = fmt.payload_bytes(h)
    # in the data region's order (one sequential read), each row to its place in y
    copy_rows(y.view(np.uint8).reshape(y_cap, width), gather[0, :n], data, gather[1, :n], width)
    y[n:] = 0
    dynamic_scale[:] = 0
    if fmt.scale is not None:
        dynamic_scale[:n] = np.ascontiguousarray(data[src[:n], scale_at:scale_at + 4]).view("<f4").reshape(n)

    if records is not None:  # the kernel's last core: release the records only after the gather
        records[:, mb, 2:] = EXPERT_ID_INIT
        records[:, mb, 0] = 0
    log.debug("batched %d slots", n)
    res.actual_token_num[0] = n
    return res


def _batch_v2(ctx: ScheduleContext, geometry: tuple[int, int, int, int], expert_num: int, shape: tuple[int, ...],
              token_dtype: int, need_schedule: int, layer_num: int, sync_flag: bool, idle: Idle,
              out: FfnBatch | None) -> FfnBatch:
    """FfnWorkerBatching V2 (the Ascend 950 arch35 kernel). Geometry A, M, BS, K+1 and HS =
    attn_to_ffn_token_size come from the context; max_out_shape gives H and the output sizes (Y rows, which must
    hold the context's A*BS*(K+1) slots). The op copies bytes, never converts: a row is the token dtype's payload
    (2H fp16/bf16, H int8/fp8, H/2 fp4), the int8 fp32 scale is read at byte H (A2F V2 writes it at align32(H):
    they agree when 32 | H), MX E8M0 scales (ceil(H/32) bytes) follow the payload.

    need_schedule=0 (NORM): ids from ffn.expert_ids_buf for out_num rows, each row's session and micro-batch
    from the FFN scheduler's out buffers; no wait and no context write. sync_flag is ignored there.
    need_schedule=1, sync_flag False: wait until the A header flags at polling_index add up to >= A (the
    kernel's ReduceSum), set polling_index to the next micro-batch, take every session's raw ids.
    need_schedule=1, sync_flag True (the snapshot receive): from polling_index, read the A flags of a
    micro-batch once; if they add up to > 0 that read is the snapshot, else move to the next micro-batch
    (empty ones are skipped without any write). polling_index is set once, to (selected + 1) % M. Only the
    sessions whose flag was exactly 1 in the snapshot are taken; the others are masked and their records left
    untouched (a later call takes them). A taken session's ids are regrouped by its layer (record word 1):
    id' = id + layer*(expert_num/layer_num) when id < expert_num/layer_num as an unsigned compare (so negative
    ids are masked), else masked; a layer outside [0, layer_num) masks the whole session.
    Taken records are consumed after the gather: ids := INT32_MAX, flag := 0 (the layer word is left alone);
    the wait-all receive consumes all A. The hardware clears them right after reading the ids, its producers
    never overwrite a slot in use; afd-sim releases them after the gather, as its V1 does.

    A slot is valid when its (regrouped) id < 1000000, signed: negative ids are valid and sort first in NORM and
    the wait-all receive. Rows are sorted stably by id (ties by flat index: (session, token, k) in RECV, the
    row of expert_ids_buf in NORM). group_list: [id, count] rows in ascending id, at most expert_num of them
    (further distinct ids are dropped), the remaining rows zero. Rows >= actual_token_num and fp16/bf16
    dynamic_scale are undefined on hardware; afd-sim writes zeros there. Not reproduced: the kernel marks group
    boundaries with an id of -1 internally, so a real id of -1 at a run's edge (sorted second or last) gives wrong
    counts there; and its fp32 sort keys merge ids below -2^24 that differ. afd-sim's group_list is exact.

    Neither wait on hardware has a run_flag check, a timeout or a yield: here a wait-all scan that is not ready,
    and a snapshot scan that found nothing in a whole cycle of M micro-batches, re-read run_flag (Stopped when 0)
    and call idle(waiting), so afd-sim's stall watchdog works."""
    a, m, bs, k1 = geometry
    h = shape[3]
    y_cap = shape[0] * shape[1] * shape[2]
    if a * bs * k1 > y_cap:
        raise KernelError("max_out_shape", f"{list(shape)} has {y_cap} rows, fewer than the context's "
                                           f"A*BS*(K+1) = {a}*{bs}*{k1} slots")
    fmt = BATCHING_TOKEN_DTYPES[token_dtype]
    hs = ctx.common.attn_to_ffn_token_size
    payload = fmt.payload_bytes(h)
    scale_at = fmt.scale_at(h, "950", writer=False)
    scale_bytes = fmt.scale_count(h) * (fmt.scale.itemsize if fmt.scale is not None else 0)
    if scale_at + scale_bytes > hs:
        raise KernelError("common.attn_to_ffn_token_size", f"{hs} bytes per slot cannot hold a "
                                                           f"{scale_at + scale_bytes}-byte token (H={h}, "
                                                           f"token_dtype={token_dtype})")
    data = prepared(ctx, "ffn_worker_batching data", _token_data, a * m * bs * k1, hs)

    records, taken = None, None
    if need_schedule:
        records = ffn_records(ctx, a, m, bs, k1)
        if sync_flag:
            mb, taken = _snapshot_wait(ctx, records, a, m, idle)
            ids = _regroup(records[:, mb], taken, expert_num // layer_num, layer_num)
        else:
            mb = _wait_all_sessions(ctx, records, a, idle, flag_sum=True)
            taken = np.arange(a)
            ids = records[:, mb, 2:].copy()
        ctx.u64[_POLLING_INDEX] = (mb + 1) % m
        sessions, mbs = np.arange(a, dtype=np.int64), np.full(a, mb, np.int64)
    else:
        sessions, mbs, ids = _emitted(ctx, a, m, bs, k1)

    flat = ids.reshape(-1)
    valid = np.flatnonzero(flat < MASK_ID)
    by_id = np.argsort(flat[valid], kind="stable")
    order = valid[by_id]
    n = order.size
    row, rest = np.divmod(order, bs * k1)
    token, k = np.divmod(rest, k1)
    src = ((sessions[row] * m + mbs[row]) * bs + token) * k1 + k

    from ._kernels import copy_rows
    res = _outputs(out, expert_num, shape, token_dtype, "950")
    y, group_list, dynamic_scale = res.y.view(np.uint8).reshape(y_cap, -1), res.group_list, res.dynamic_scale
    # in flat order, the data region's (one sequential read; see _kernels.batch_slots), each row to its place in y
    rows, slots = np.empty(n, np.int64), np.empty(n, np.int64)
    rows[by_id], slots[by_id] = np.arange(n), src
    copy_rows(y, rows, data, slots, payload)
    y[n:] = 0
    for arr, values in ((res.session_ids, sessions[row]), (res.micro_batch_ids, mbs[row]), (res.token_ids, token),
                        (res.expert_offsets, k)):
        arr[:n] = values
        arr[n:] = 0
    scales = dynamic_scale.view(np.uint8).reshape(y_cap, -1)
    scales[:] = 0
    if fmt.scale is not None:
        scales[:n] = data[src, scale_at:scale_at + scale_bytes]
    experts, counts = np.unique(flat[order], return_counts=True)
    rows = min(experts.size, expert_num)
    group_list[:] = 0
    group_list[:rows, 0] = experts[:rows]
    group_list[:rows, 1] = counts[:rows]

    if records is not None:  # consume what was taken, only after the gather (see the docstring)
        records[taken, mb, 2:] = EXPERT_ID_INIT
        records[taken, mb, 0] = 0
    log.debug("batched %d slots (V2)", n)
    res.actual_token_num[0] = n
    return res


def _snapshot_wait(ctx: ScheduleContext, records: np.ndarray, a: int, m: int, idle: Idle) -> tuple[int, np.ndarray]:
    """The snapshot receive's scan: (the selected micro-batch, the sessions whose flag was exactly 1 in the one
    read of its A flags). A micro-batch is selected when that read's flags add up to > 0 (the kernel's rule)."""
    mb = int(ctx.u64[_POLLING_INDEX])
    waiting = Waiting("ffn_worker_batching", "ffn.token_info_buf header flags, any session (snapshot receive)", mb,
                      needed=1, flags=records[:, mb, 0])
    scanned = 0
    while True:
        flags = records[:, mb, 0].copy()  # the one read: flags arriving after it wait for a later call
        if flags.sum(dtype=np.int64) > 0:
            return mb, np.flatnonzero(flags == VALID_FLAG)
        mb = (mb + 1) % m
        scanned += 1
        if scanned % m == 0:  # a whole cycle found nothing
            if ctx.i32[_RUN_FLAG] == 0:  # sim-only exit: the real kernel would scan forever
                raise Stopped(waiting, "run_flag is 0")
            waiting.iterations += 1
            idle(waiting)


def _regroup(records_mb: np.ndarray, taken: np.ndarray, per_layer: int, layer_num: int) -> np.ndarray:
    """[A, BS*(K+1)] ids of the snapshot: a taken session's ids moved to its layer's range, everything else (a
    session outside the snapshot, an id not in [0, per_layer) unsigned, a session with a bad layer) INT32_MAX."""
    ids = np.full((records_mb.shape[0], records_mb.shape[1] - 2), EXPERT_ID_INIT, np.int32)
    for s in taken:
        layer = int(records_mb[s, 1])
        if 0 <= layer < layer_num:
            raw = records_mb[s, 2:]
            ids[s] = np.where(raw.view(np.uint32) < per_layer, raw + np.int32(layer * per_layer), EXPERT_ID_INIT)
    return ids

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


def _wait_all_sessions(ctx: ScheduleContext, records: np.ndarray, a: int, idle: Idle, flag_sum: bool = False) -> int:
    """Spin until every session's header flag at polling_index is ready; returns that micro-batch. Ready: A
    flags equal to 1 (V1), or the flags' sum >= A (V2's rule: its kernel adds the A flags up)."""
    mb = int(ctx.u64[_POLLING_INDEX])
    flags = records[:, mb, 0]
    waiting = Waiting("ffn_worker_batching", "ffn.token_info_buf header flags at polling_index", mb, needed=a,
                      flags=flags)
    while True:
        ready = int(flags.sum(dtype=np.int64)) if flag_sum else int(np.count_nonzero(flags == VALID_FLAG))
        if ready >= a:
            return mb
        if ctx.i32[_RUN_FLAG] == 0:  # sim-only exit: the real kernel would spin here forever
            raise Stopped(waiting, "run_flag is 0")
        waiting.ready = ready
        waiting.iterations += 1
        idle(waiting)
