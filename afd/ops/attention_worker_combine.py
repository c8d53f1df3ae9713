"""AttentionWorkerCombine: y = sum_k scale*slot_k + shared slot (or, MX on 950, sum of dequantised slots), in fp32."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import ATTENTION_MICRO_BATCH_ID_OFFSET, RUN_FLAG_OFFSET, VALID_FLAG, ScheduleContext
from ..tokens import (
    BF16,
    COMBINE_TOKEN_DTYPE_CODES,
    COMBINE_TOKEN_DTYPES,
    E8M0,
    MX_BLOCK,
    check_generation,
    describe_codes,
    mx_dequantize,
)
from ._context import as_context, device_of, prepared, require_buffer, require_positive
from ._polling import Idle, Stopped, Waiting, sched_yield

log = logging.getLogger("afd.ops.attention_worker_combine")

_RUN_FLAG = RUN_FLAG_OFFSET // 4
_MICRO_BATCH_ID = ATTENTION_MICRO_BATCH_ID_OFFSET // 4
TOKEN_DTYPES = {code: fmt.element for code, fmt in COMBINE_TOKEN_DTYPES.items() if not fmt.mx}  # fp16, bf16 slots
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


def combine_mx_tokens(data: np.ndarray, expert_scales: np.ndarray, element, h: int,
                      out: np.ndarray | None = None) -> np.ndarray:
    """The arch35 MXFP combine: y = bf16(sum_{k<K+1} dequant(d[i,k])), fp32, k in order from 0.0, no weights.

    data is (BS, K+1, payload bytes) uint8 (fp8, or fp4 packed low nibble first), expert_scales (BS, K+1, S) E8M0
    bytes; dequant is element * 2^(e - 127) with e = 0 -> 2^-127 and 255 -> NaN, one fp32 multiply, as the kernel's
    DecodeMxfpScale and Muls (fp32 subnormals kept [INF: whether the vector unit flushes them is not documented]).
    """
    bs, k1, _ = data.shape
    acc = np.zeros((bs, h), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(k1):  # the kernel adds expert after expert, no regrouping and no intermediate bf16
            acc += mx_dequantize(data[:, k], expert_scales[:, k], element, h)
    return _cast_into(acc, BF16, out)


def warm_up(token_dtype: int) -> None:
    """Load (or, once per machine, compile) the combine kernel for this dtype now, not inside a timed or watched op.

    The MX token dtypes (950) and unknown codes have nothing to compile: the numpy path, and the host check refuses
    an unknown code."""
    if token_dtype in TOKEN_DTYPES:
        from ._kernels import warm_up_combine
        warm_up_combine(token_dtype == 0)  # (code 0: fp16 slots)


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
                                        need_schedule, generation: str = "A3"):
    """The aclnn and tiling checks (nothing in device memory); returns (contiguous scales, layer id).

    On 950 an MX token_dtype (2, 3, 4) takes E8M0 expert_scales (BS, K+1, S), S = even(ceil(H/32)), as
    float8_e8m0fnu or raw uint8 (returned as uint8), as the arch35 tiling checks them."""
    check_generation(generation)
    for name, value in (("schedule_context", schedule_context), ("expert_scales", expert_scales),
                        ("layer_id", layer_id)):
        if value is None:
            raise AclnnError(name, "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    codes = COMBINE_TOKEN_DTYPE_CODES[generation]
    mx = token_dtype in codes and COMBINE_TOKEN_DTYPES[token_dtype].mx
    if generation == "950" or token_dtype in COMBINE_TOKEN_DTYPES:  # arch35 tiling: token_dtype before the scales
        _check_token_dtype(token_dtype, codes)
    scales = np.asarray(expert_scales)
    if mx and scales.dtype not in (E8M0, np.uint8):
        raise AclnnError("expert_scales", f"dtype must be float8_e8m0fnu (or its uint8 bytes) for an MX token_dtype "
                                          f"{token_dtype}, got {scales.dtype}", ACLNN_ERR_PARAM_INVALID)
    if not mx and scales.dtype != np.float32:
        raise AclnnError("expert_scales", f"dtype must be float32, got {scales.dtype}", ACLNN_ERR_PARAM_INVALID)
    lid = np.asarray(layer_id)
    if isinstance(layer_id, np.ndarray) and lid.dtype != np.int32:
        raise AclnnError("layer_id", f"dtype must be int32, got {lid.dtype}", ACLNN_ERR_PARAM_INVALID)
    if lid.size != 1:
        raise AclnnError("layer_id", f"shape must be (1,), got {lid.shape}", ACLNN_ERR_PARAM_INVALID)
    _check_token_dtype(token_dtype, codes)
    if need_schedule not in (0, 1):
        raise AclnnError("need_schedule", f"must be 0 or 1, got {need_schedule}", ACLNN_ERR_PARAM_INVALID)
    if mx:
        return _check_mx_scales(scales, hidden_size), int(lid.reshape(-1)[0])
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


def _check_token_dtype(token_dtype, codes) -> None:
    if token_dtype not in codes:
        mx_hint = " (the MX token dtypes 2-4 need generation 950)" if token_dtype in COMBINE_TOKEN_DTYPES else ""
        raise AclnnError("token_dtype", f"must be {describe_codes(COMBINE_TOKEN_DTYPES, codes)}, got {token_dtype}"
                                        f"{mx_hint}", ACLNN_ERR_PARAM_INVALID)


def _check_mx_scales(scales: np.ndarray, hidden_size) -> np.ndarray:
    """The arch35 tiling's MXFP shape rules: rank 3, BS > 0, routed K = dim 1 - 1 in [1, 64], H > 0,
    dim 2 = align_up(ceil(H/32), 2)."""
    if scales.ndim != 3:
        raise KernelError("expert_scales", f"must be 3-D (BS, K+1, S) for an MX token_dtype, got shape {scales.shape}")
    bs, k1, s = scales.shape
    if bs <= 0 or not 1 <= k1 - 1 <= MAX_K or int(hidden_size) <= 0:
        raise KernelError("expert_scales", f"BS and H must be > 0 and K (dim 1 less the shared slot) in [1, {MAX_K}], "
                                           f"got shape {scales.shape}, hidden_size {hidden_size}")
    count = -(-int(hidden_size) // MX_BLOCK)
    if s != count + count % 2:
        raise KernelError("expert_scales", f"dim 2 must equal align_up(ceil(H/32), 2) = {count + count % 2} for "
                                           f"H {hidden_size}, got {s}")
    return np.ascontiguousarray(scales).view(np.uint8)


def attention_worker_combine(schedule_context, expert_scales, layer_id, hidden_size: int, token_dtype: int = 0,
                             need_schedule: int = 0, *, idle: Idle = sched_yield,
                             out: np.ndarray | None = None, host_checked: bool = False,
                             generation: str = "A3") -> tuple[np.ndarray, np.ndarray]:
    """Combine one micro-batch's returned expert slots into y (BS, H); returns (y, next_layer_id = layer_id + 1).

    BS and K come from expert_scales (pitfall S7: the micro-batch base offset uses that BS too) and the slot
    stride is hidden_size elements; y is written into `out` when given (the torch front-end's output tensor,
    which has run the host checks itself: host_checked=True).
    need_schedule=0 reads micro-batch attention.micro_batch_id and touches no
    flag. need_schedule=1 polls the flags of the first BS tokens of (micro_batch_id + 1) % M until every one is
    exactly 1, combines, zeroes those flags and sets micro_batch_id.

    generation="950" is the arch35 kernel: token_dtype 0/1 as A3; 2 (MXFP8 e5m2), 3 (MXFP8 e4m3fn), 4 (MXFP4
    e2m1) dequantise: expert_scales is E8M0 (BS, K+1, S) block scales (not routing weights), y is bf16 =
    combine_mx_tokens. The MX slots are read as the arch35 MXFP kernel and its golden read them: packed rows of
    the payload only (H bytes, or ceil(H/2) for fp4), micro-batch mb's (BS, K+1) rows at token_data_buf +
    mb*BS*(K+1)*row_bytes; the scales come from expert_scales, never from the window. Nothing in the window
    layout ties this to the A2F/F2A slot strides (no 950 producer of MX rows in the attention window was found):
    the kernel uses neither hidden_size*2 nor ffn_to_attn_token_size as the stride here.

    Deviations from the real kernel, both only where it would otherwise spin forever or misread: it polls for
    "every flag == 1" where the kernel tests "sum of flags == count" (identical for 0/1 flags), and, having no
    exit, the kernel never looks at run_flag; here a scan that is not ready re-reads run_flag and raises
    Stopped when it is 0, and `idle(waiting)` runs between scans (it may raise too).
    """
    if host_checked:  # the caller ran check_attention_worker_combine_host on these very arrays already
        scales, lid = np.ascontiguousarray(expert_scales), int(np.asarray(layer_id).reshape(-1)[0])
        if COMBINE_TOKEN_DTYPES[token_dtype].mx:
            scales = scales.view(np.uint8)
    else:
        scales, lid = check_attention_worker_combine_host(schedule_context, expert_scales, layer_id, hidden_size,
                                                          token_dtype, need_schedule, generation)
    ctx = as_context(schedule_context)
    fmt = COMBINE_TOKEN_DTYPES[token_dtype]
    bs, k1, h = scales.shape[0], scales.shape[1] + (0 if fmt.mx else 1), int(hidden_size)
    dtype = BF16 if fmt.mx else TOKEN_DTYPES[token_dtype]
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
    y = combine_mx_tokens(data, scales, fmt.element, h, out) if fmt.mx else combine_tokens(data, scales, dtype, out)
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
    """Micro-batch mb's returned slots (BS, K+1, H) (MX: (BS, K+1, payload bytes) uint8) and, with need_schedule,
    its flags, after their bounds checks against the declared sizes (the real kernel would read past them
    silently)."""
    attention, dev, fmt = ctx.attention, device_of(ctx), COMBINE_TOKEN_DTYPES[token_dtype]
    slot = fmt.payload_bytes(h)
    dtype, width = (np.dtype(np.uint8), slot) if fmt.mx else (fmt.element, h)
    require_buffer(attention, "token_data_buf", (mb + 1) * bs * k1 * slot)
    data = dev.view(attention.token_data_buf + mb * bs * k1 * slot, bs * k1 * slot, dtype,
                    field="attention.token_data_buf").reshape(bs, k1, width)
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
