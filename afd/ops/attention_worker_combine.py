"""AttentionWorkerCombine: y = sum_k scale*slot_k + shared slot, in fp32, for one micro-batch of the attention window."""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np

from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import ATTENTION_MICRO_BATCH_ID_OFFSET, RUN_FLAG_OFFSET, VALID_FLAG, ScheduleContext
from ._context import as_context, device_of, prepared, require_buffer, require_positive
from ._polling import Idle, Stopped, Waiting, sched_yield

log = logging.getLogger("afd.ops.attention_worker_combine")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_MICRO_BATCH_ID = ATTENTION_MICRO_BATCH_ID_OFFSET // 4
TOKEN_DTYPES = {0: np.dtype(np.float16), 1: np.dtype(ml_dtypes.bfloat16)}
MAX_K = 64
# fp32 scratch per chunk of tokens. Measured at BS=48 K=8+1 H=7168 bf16 (2-core EPYC VM): 3 MB (12 tokens) is the
# sweet spot (~1.01 ms); 4 MB 1.03-1.09 ms, 1 token (L2-sized) 1.34 ms: numpy per-call overhead beats locality.
_CHUNK_BYTES = 3 << 20
_F16_TO_F32_SCALE = np.float32(2.0 ** 112)  # rebias a 5-bit exponent into the 8-bit one (exact, subnormals too)


def _widen_f16(src_u16: np.ndarray, w: np.ndarray, sign: np.ndarray, special: np.ndarray) -> None:
    """fp16 bits -> fp32 bits in w, exactly; numpy's own float16 cast is ~5x slower here (no SIMD path)."""
    w[...] = src_u16
    np.bitwise_and(w, 0x8000, out=sign)
    np.left_shift(sign, 16, out=sign)
    np.bitwise_and(w, 0x7FFF, out=w)
    np.greater_equal(w, 0x7C00, out=special)  # inf / NaN: exponent all ones
    np.left_shift(w, 13, out=w)
    f = w.view(np.float32)
    np.multiply(f, _F16_TO_F32_SCALE, out=f)
    if special.any():
        np.bitwise_or(w, 0x7F800000, out=w, where=special)
    np.bitwise_or(w, sign, out=w)


def combine_tokens(data: np.ndarray, expert_scales: np.ndarray, out_dtype, out: np.ndarray | None = None) -> np.ndarray:
    """y[i] = cast(sum_{k<K} f32(s[i,k])*f32(d[i,k]) + f32(d[i,K])): fp32, k in order, multiply then add (no FMA).

    data is (BS, K+1, H) fp16 or bf16 (any extra trailing slots are ignored); the sum is bit-exact with a plain
    sequential numpy loop: the shared slot is added unweighted (weight 1.0 would be an exact multiply).
    """
    bs, k = expert_scales.shape
    h = data.shape[2]
    if (h % 2 == 0 and data.strides[2] == 2 and np.dtype(out_dtype) == data.dtype
            and data.view(np.uint32).flags.aligned):  # (words at aligned addresses and strides)
        return _combine_compiled(data, np.ascontiguousarray(expert_scales, np.float32), out_dtype, out)
    k1 = k + 1
    scales = np.asarray(expert_scales, np.float32)[:, :, None]
    src = data[:, :k1]
    acc = np.empty((bs, h), np.float32)
    chunk = max(1, min(bs, _CHUNK_BYTES // max(1, k1 * h * 4)))
    w_all = np.empty((chunk, k1, h), np.uint32)
    is_bf16 = np.dtype(data.dtype) == TOKEN_DTYPES[1]
    if not is_bf16:
        sign_all = np.empty_like(w_all)
        special_all = np.empty(w_all.shape, bool)
    for i0 in range(0, bs, chunk):
        i1 = min(bs, i0 + chunk)
        w = w_all[:i1 - i0]
        f = w.view(np.float32)
        if is_bf16:
            f[...] = src[i0:i1]  # exact widening (bf16 is the high half of an fp32); ml_dtypes' cast is SIMD
        else:
            _widen_f16(src[i0:i1].view(np.uint16), w, sign_all[:i1 - i0], special_all[:i1 - i0])
        # Only the K routed slots: the shared slot's weight is 1.0, and skipping that exact multiply changes no bit.
        np.multiply(f[:, :k], scales[i0:i1], out=f[:, :k])
        # A reduce over a non-inner axis adds the k rows in order: ((p0 + p1) + p2) + ... exactly.
        np.add.reduce(f, axis=1, out=acc[i0:i1])
    return _cast_into(acc, out_dtype, out)  # fp16: numpy RNE; bf16: ml_dtypes RNE (CAST_RINT)


def _cast_into(sums: np.ndarray, out_dtype, out: np.ndarray | None) -> np.ndarray:
    """The fp32 sums cast to the output dtype (round to nearest even), into `out` when given."""
    if out is None:
        return sums.astype(out_dtype)
    out[...] = sums
    return out


def warm_up(token_dtype: int) -> None:
    """Load (or, once per machine, compile) the combine kernel for this dtype now, not inside a timed or watched op."""
    dtype = TOKEN_DTYPES[token_dtype]
    combine_tokens(np.zeros((1, 2, 2), dtype), np.zeros((1, 1), np.float32), dtype)


def _combine_compiled(data: np.ndarray, scales: np.ndarray, out_dtype, out: np.ndarray | None = None) -> np.ndarray:
    """combine_tokens through the compiled kernel: every row read once, as 32-bit words of two 16-bit values."""
    from ._kernels import combine_pairs_bf16, combine_pairs_f16

    bs, _, h = data.shape
    words = data.view(np.uint32)  # (BS, K1, H/2): rows start 4-byte aligned, checked by the caller
    acc = np.empty((2, h // 2), np.float32)
    dtype = np.dtype(data.dtype)
    kernel = combine_pairs_f16 if dtype == TOKEN_DTYPES[0] else combine_pairs_bf16  # each rounds to its dtype
    if out is not None and out.flags.c_contiguous and out.dtype == dtype:  # straight into the caller's y
        kernel(words, scales, acc, out.view(np.uint32).reshape(bs, h // 2))
        return out
    pairs = np.empty((bs, h // 2), np.uint32)
    kernel(words, scales, acc, pairs)
    if out is not None:
        out[...] = pairs.view(dtype)
        return out
    return pairs.view(dtype)


def check_attention_worker_combine_host(schedule_context, expert_scales, layer_id, hidden_size, token_dtype,
                                        need_schedule):
    """The aclnn and tiling checks (nothing in device memory); returns (contiguous scales, layer id)."""
    for name, value in (("schedule_context", schedule_context), ("expert_scales", expert_scales),
                        ("layer_id", layer_id)):
        if value is None:
            raise AclnnError(name, "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    scales = np.asarray(expert_scales)
    if scales.dtype != np.float32:
        raise AclnnError("expert_scales", f"dtype must be float32, got {scales.dtype}", ACLNN_ERR_PARAM_INVALID)
    lid = np.asarray(layer_id)
    if isinstance(layer_id, np.ndarray) and lid.dtype != np.int32:
        raise AclnnError("layer_id", f"dtype must be int32, got {lid.dtype}", ACLNN_ERR_PARAM_INVALID)
    if lid.size != 1:
        raise AclnnError("layer_id", f"shape must be (1,), got {lid.shape}", ACLNN_ERR_PARAM_INVALID)
    if token_dtype not in TOKEN_DTYPES:
        raise AclnnError("token_dtype", f"must be 0 (fp16) or 1 (bf16), got {token_dtype}", ACLNN_ERR_PARAM_INVALID)
    if need_schedule not in (0, 1):
        raise AclnnError("need_schedule", f"must be 0 or 1, got {need_schedule}", ACLNN_ERR_PARAM_INVALID)
    if scales.ndim != 2:
        raise KernelError("expert_scales", f"must be 2-D (BS, K), got shape {scales.shape}")
    bs, k = scales.shape
    if bs <= 0 or k <= 0:
        raise KernelError("expert_scales", f"BS and K must be > 0, got shape {scales.shape}")
    if k > MAX_K:
        raise KernelError("expert_scales", f"K must be <= {MAX_K}, got {k}")
    if int(hidden_size) <= 0:
        raise KernelError("hidden_size", f"must be > 0, got {hidden_size}")
    return np.ascontiguousarray(scales), int(lid.reshape(-1)[0])


def attention_worker_combine(schedule_context, expert_scales, layer_id, hidden_size: int, token_dtype: int = 0,
                             need_schedule: int = 0, *, idle: Idle = sched_yield,
                             out: np.ndarray | None = None,
                             host_checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Combine one micro-batch's returned expert slots into y (BS, H); returns (y, next_layer_id = layer_id + 1).

    BS and K come from expert_scales (pitfall S7: the micro-batch base offset uses that BS too) and the slot
    stride is hidden_size elements; y is written into `out` when given (the torch front-end's output tensor,
    which has run the host checks itself: host_checked=True).
    need_schedule=0 reads micro-batch attention.micro_batch_id and touches no
    flag. need_schedule=1 polls the flags of the first BS tokens of (micro_batch_id + 1) % M until every one is
    exactly 1, combines, zeroes those flags and sets micro_batch_id.

    Deviations from the real kernel, both only where it would otherwise spin forever or misread: it polls for
    "every flag == 1" where the kernel tests "sum of flags == count" (identical for 0/1 flags), and, having no
    exit, the kernel never looks at run_flag; here a scan that is not ready re-reads run_flag and raises
    Stopped when it is 0, and `idle(waiting)` runs between scans (it may raise too).
    """
    if host_checked:  # the caller ran check_attention_worker_combine_host on these very arrays already
        scales, lid = np.ascontiguousarray(expert_scales), int(np.asarray(layer_id).reshape(-1)[0])
    else:
        scales, lid = check_attention_worker_combine_host(schedule_context, expert_scales, layer_id, hidden_size,
                                                          token_dtype, need_schedule)
    ctx = as_context(schedule_context)
    bs, k = scales.shape
    k1, h = k + 1, int(hidden_size)
    dtype = TOKEN_DTYPES[token_dtype]
    m = prepared(ctx, "attention_worker_combine", _micro_batch_num)
    mb = int(ctx.u32[_MICRO_BATCH_ID])
    if need_schedule:
        mb = (mb + 1) % m
    elif mb >= m:
        raise KernelError("attention.micro_batch_id", f"micro_batch_id[{mb}] is out of range [0,{m})")
    data, flags = prepared(ctx, "attention_worker_combine views", _micro_batch_views, mb, bs, k1, h, token_dtype,
                           need_schedule)
    if need_schedule:
        _wait_flags(ctx, flags, mb, bs, k1, idle)
    if out is not None and (out.shape != (bs, h) or out.dtype != dtype):
        raise KernelError("y", f"the output must be ({bs}, {h}) {dtype}, got {out.shape} {out.dtype}")
    y = combine_tokens(data, scales, dtype, out)
    if need_schedule:
        flags[:] = 0
        ctx.u32[_MICRO_BATCH_ID] = mb
        log.debug("combined micro_batch_id=%d, flags cleared", mb)
    return y, np.array([lid + 1], dtype=np.int32)


def _micro_batch_num(ctx: ScheduleContext) -> int:
    require_positive(ctx.common, "micro_batch_num")
    return ctx.common.micro_batch_num


def _micro_batch_views(ctx: ScheduleContext, mb: int, bs: int, k1: int, h: int, token_dtype: int,
                       need_schedule: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Micro-batch mb's returned slots (BS, K+1, H) and, with need_schedule, its flags, after their bounds checks
    against the declared sizes (the real kernel would read past them silently)."""
    attention, dev, itemsize = ctx.attention, device_of(ctx), TOKEN_DTYPES[token_dtype].itemsize
    require_buffer(attention, "token_data_buf", (mb + 1) * bs * k1 * h * itemsize)
    data = dev.view(attention.token_data_buf + mb * bs * k1 * h * itemsize, bs * k1 * h * itemsize,
                    TOKEN_DTYPES[token_dtype], field="attention.token_data_buf").reshape(bs, k1, h)
    if not need_schedule:
        return data, None
    require_buffer(attention, "token_info_buf", (mb + 1) * bs * k1 * 4)
    return data, dev.view(attention.token_info_buf + mb * bs * k1 * 4, bs * k1 * 4, "<i4",
                          field="attention.token_info_buf")


def _wait_flags(ctx, flags: np.ndarray, mb: int, bs: int, k1: int, idle: Idle) -> None:
    waiting = Waiting("attention_worker_combine", "attention.token_info_buf flags", mb, needed=flags.size,
                      flags=flags.reshape(bs, k1))
    i32 = ctx.i32
    while True:
        ready = int(np.count_nonzero(flags == VALID_FLAG))
        if ready == flags.size:
            return
        if i32[_RUN_FLAG] == 0:  # sim-only exit: the real kernel would spin here forever
            raise Stopped(waiting, "run_flag is 0")
        waiting.ready = ready
        waiting.iterations += 1
        idle(waiting)
