"""AttentionWorkerCombine: the formula with the shared slot (fp16, bf16), micro-batch choice, need_schedule, checks."""
import timeit

import ml_dtypes
import numpy as np
import pytest

from afd.errors import AclnnError, KernelError
from afd.layout import ScheduleContext, align512
from afd.ops import Stopped, attention_worker_combine
from afd.ops.attention_worker_combine import _widen_f16, combine_tokens

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {0: np.dtype(np.float16), 1: BF16}




def make_ctx(dev, m, bs, k1, h, itemsize=2, micro_batch_id=0):
    info = m * bs * k1 * 4
    data_bytes = m * bs * k1 * h * itemsize
    win = dev.malloc(align512(info) + data_bytes)
    ctx = ScheduleContext.on_device(dev, dev.malloc(1024).address)
    ctx.set_fields({"common": {"schedule_mode": 1, "micro_batch_num": m, "micro_batch_size": bs,
                               "selected_expert_num": k1},
                    "control": {"run_flag": 1},
                    "attention": {"token_info_buf": win.address, "token_info_buf_size": info,
                                  "token_data_buf": win.address + align512(info), "token_data_buf_size": data_bytes,
                                  "micro_batch_id": micro_batch_id}})
    flags = win.view("<i4", (m, bs, k1))
    raw = win.view(np.uint8, (data_bytes,), align512(info))
    return ctx, flags, raw


def reference(data_mb, scales, dtype):
    """Straightforward: fp32 accumulator, one k at a time, then the unweighted shared slot K."""
    bs, k = scales.shape
    d = data_mb.astype(np.float32)
    acc = np.zeros((bs, d.shape[2]), np.float32)
    for kk in range(k):
        acc = acc + scales[:, kk:kk + 1] * d[:, kk, :]
    acc = acc + d[:, k, :]
    return acc.astype(dtype)


def fill(raw, dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape, dtype=np.float32) * 4).astype(dtype)
    raw.view(dtype)[:] = values.reshape(-1)
    return values


@pytest.mark.parametrize("token_dtype", [0, 1])
def test_formula_includes_the_unweighted_shared_slot(dev, token_dtype):
    m, bs, k, h = 2, 6, 4, 256
    dtype = DTYPES[token_dtype]
    ctx, flags, raw = make_ctx(dev, m, bs, k + 1, h, micro_batch_id=1)
    data = fill(raw, dtype, (m, bs, k + 1, h))
    scales = np.random.default_rng(1).random((bs, k), dtype=np.float32)
    y, nxt = attention_worker_combine(ctx, scales, np.array([7], np.int32), h, token_dtype)
    want = reference(data[1], scales, dtype)
    assert y.dtype == dtype and y.shape == (bs, h)
    assert np.array_equal(y.view(np.uint16), want.view(np.uint16))
    without_shared = reference(np.concatenate([data[1][:, :k], np.zeros_like(data[1][:, :1])], axis=1), scales,
                               dtype)
    assert not np.array_equal(y.view(np.uint16), without_shared.view(np.uint16))
    assert nxt.dtype == np.int32 and nxt.shape == (1,) and nxt[0] == 8
    assert ctx.attention.micro_batch_id == 1 and not flags.any()  # need_schedule=0 touches nothing


def test_bf16_output_rounds_to_nearest_even_like_ml_dtypes():
    # 1 + 2^-8 is exactly halfway between two bf16 values: RNE rounds to the even one (1.0).
    data = np.zeros((1, 2, 1), BF16)
    data[0, 0, 0] = 1.0
    scales = np.array([[1.0 + 2.0 ** -8]], np.float32)  # scale * 1.0 = halfway value in fp32
    y = combine_tokens(data, scales, BF16)
    assert y.view(np.uint16)[0, 0] == np.array(1.0, BF16).view(np.uint16)
    scales = np.array([[1.0 + 3 * 2.0 ** -8]], np.float32)  # halfway again: rounds up to the even mantissa
    assert float(combine_tokens(data, scales, BF16)[0, 0]) == 1.0 + 2 * 2.0 ** -7


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_special_values_match_the_reference(dtype):
    rng = np.random.default_rng(3)
    bs, k, h = 4, 3, 64
    data = rng.standard_normal((bs, k + 1, h), dtype=np.float32).astype(dtype)
    flat = data.reshape(-1)
    flat[:8] = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-7, -6e-5, 65504], np.float32).astype(dtype)
    flat[h:h + 4] = np.array([60000, 60000, -60000, 3e-8], np.float32).astype(dtype)  # overflow in the output cast
    scales = rng.random((bs, k), dtype=np.float32) * 2
    with np.errstate(all="ignore"):
        got = combine_tokens(data, scales, dtype).astype(np.float32)
        want = reference(data, scales, dtype).astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("h", [256, 255], ids=["compiled-even-H", "numpy-odd-H"])
def test_every_bit_pattern_combines_bit_exactly_like_the_reference(dtype, k, h):
    # Every 16-bit pattern (NaNs, infinities, subnormals, -0.0) in every slot, through both code paths: the
    # compiled kernel (even H: rows read as 32-bit words) and the numpy one (odd H).
    rng = np.random.default_rng(k)
    bits = rng.permuted(np.tile(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16), k + 1))
    data = bits[:(bits.size // (h * (k + 1))) * h * (k + 1)].view(dtype).reshape(-1, k + 1, h)
    scales = (rng.random((data.shape[0], k), np.float32) * 4 - 2).astype(np.float32)
    unaligned = np.empty(data.size + 1, np.uint16)[1:].view(dtype).reshape(data.shape)  # takes the numpy path
    unaligned[...] = data
    with np.errstate(all="ignore"):
        got = combine_tokens(data, scales, dtype)
        numpy_path = combine_tokens(unaligned, scales, dtype)
        want = reference(data, scales, dtype)
    nan = np.isnan(got.astype(np.float32))
    assert np.array_equal(nan, np.isnan(numpy_path.astype(np.float32)))
    # The two paths agree on every bit but a NaN's sign and payload (LLVM may commute an add of two NaNs).
    assert np.array_equal(got.view(np.uint16)[~nan], numpy_path.view(np.uint16)[~nan])
    # The reference starts from 0.0 (so -0.0 sums may come out +0.0) and may pick another NaN's payload.
    assert np.array_equal(got.astype(np.float32), want.astype(np.float32), equal_nan=True)


def test_fp16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    w = np.empty(bits.shape, np.uint32)
    _widen_f16(bits, w, np.empty_like(w), np.empty(bits.shape, bool))
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(w[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(w.view(np.float32)[nan]).all()
    assert np.array_equal(np.signbit(w.view(np.float32)), np.signbit(want))


def test_bs_and_base_offset_come_from_expert_scales(dev):
    # Pitfall S7: with BS(scales)=2 < micro_batch_size=4, mb 1 starts at 1*2*(K+1)*H elements, not 1*4*(K+1)*H.
    m, bs_ctx, bs, k, h = 2, 4, 2, 2, 128
    ctx, _, raw = make_ctx(dev, m, bs_ctx, k + 1, h, micro_batch_id=1)
    flat = fill(raw, np.float16, (m * bs_ctx * (k + 1) * h,))
    scales = np.full((bs, k), 0.5, np.float32)
    y, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, 0)
    start = 1 * bs * (k + 1) * h
    want = reference(flat[start:start + bs * (k + 1) * h].reshape(bs, k + 1, h), scales, np.float16)
    assert np.array_equal(y.view(np.uint16), want.view(np.uint16))


@pytest.mark.timeout(10)
def test_need_schedule_polls_next_micro_batch_then_clears_and_advances(dev):
    m, bs, k, h = 2, 3, 2, 64
    ctx, flags, raw = make_ctx(dev, m, bs, k + 1, h, micro_batch_id=1)  # polls mb 0
    data = fill(raw, BF16, (m, bs, k + 1, h))
    flags[0] = 1
    flags[0, 2, 1] = 2  # not ready: exactly 1 is required
    flags[1] = 1
    calls = []

    def idle(waiting):
        calls.append((waiting.micro_batch_id, waiting.ready))
        if len(calls) == 4:
            flags[0, 2, 1] = 1

    scales = np.ones((bs, k), np.float32)
    y, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, 1, 1, idle=idle)
    assert calls == [(0, bs * (k + 1) - 1)] * 4
    assert np.array_equal(y.view(np.uint16), reference(data[0], scales, BF16).view(np.uint16))
    assert ctx.attention.micro_batch_id == 0
    assert not flags[0].any() and (flags[1] == 1).all()


@pytest.mark.timeout(10)
def test_need_schedule_raises_stopped_when_run_flag_drops(dev):
    ctx, flags, _ = make_ctx(dev, 2, 2, 3, 64, micro_batch_id=0)
    flags[1, 0] = 1
    n = []

    def idle(waiting):
        n.append(1)
        if len(n) == 2:
            ctx.control.run_flag = 0

    with pytest.raises(Stopped, match="run_flag is 0"):
        attention_worker_combine(ctx, np.ones((2, 2), np.float32), np.array([0], np.int32), 64, 0, 1, idle=idle)
    assert ctx.attention.micro_batch_id == 0 and flags[1, 0].tolist() == [1, 1, 1]


def test_need_schedule_ready_flags_win_over_run_flag_zero(dev):
    # The real op never reads run_flag: ready data is combined even when run_flag is 0.
    ctx, flags, _ = make_ctx(dev, 1, 2, 3, 64, micro_batch_id=0)
    flags[:] = 1
    ctx.control.run_flag = 0
    attention_worker_combine(ctx, np.ones((2, 2), np.float32), np.array([0], np.int32), 64, 0, 1)
    assert not flags.any()


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(expert_scales=None), AclnnError, "expert_scales: must not be null.*161001"),
    (dict(layer_id=None), AclnnError, "layer_id: must not be null"),
    (dict(expert_scales=np.ones((2, 2), np.float64)), AclnnError, "expert_scales: dtype.*161002"),
    (dict(layer_id=np.array([0], np.int64)), AclnnError, "layer_id: dtype"),
    (dict(expert_scales=np.ones(4, np.float32)), KernelError, "expert_scales: must be 2-D"),
    (dict(expert_scales=np.ones((2, 65), np.float32)), KernelError, "K must be <= 64"),
    (dict(token_dtype=2), AclnnError, "token_dtype"),
    (dict(need_schedule=3), AclnnError, "need_schedule"),
])
def test_input_checks(dev, kwargs, err, match):
    ctx, _, _ = make_ctx(dev, 1, 2, 3, 64)
    args = dict(schedule_context=ctx, expert_scales=np.ones((2, 2), np.float32),
                layer_id=np.array([0], np.int32), hidden_size=64, token_dtype=0, need_schedule=0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        attention_worker_combine(**args)


def test_too_small_data_buffer_names_the_field(dev):
    ctx, _, _ = make_ctx(dev, 1, 2, 3, 64)
    ctx.attention.token_data_buf_size = 2 * 3 * 64 * 2 - 1
    with pytest.raises(KernelError, match="attention.token_data_buf_size"):
        attention_worker_combine(ctx, np.ones((2, 2), np.float32), np.array([0], np.int32), 64)
    ctx.attention.token_data_buf = 0
    with pytest.raises(KernelError, match="attention.token_data_buf: must be a non-null"):
        attention_worker_combine(ctx, np.ones((2, 2), np.float32), np.array([0], np.int32), 64)


def test_speed_bf16_48x9x7168_against_a_full_read(dev):
    bs, k, h = 48, 8, 7168
    ctx, _, raw = make_ctx(dev, 1, bs, k + 1, h)
    fill(raw, BF16, (bs, k + 1, h))
    scales = np.random.default_rng(0).random((bs, k), dtype=np.float32)
    lid = np.array([0], np.int32)
    u16 = raw.view(np.uint16)

    def best(fn):
        fn()
        return min(timeit.repeat(fn, number=1, repeat=60))

    combine = best(lambda: attention_worker_combine(ctx, scales, lid, h, 1))
    read_sum = best(lambda: u16.sum())
    read_or = best(lambda: np.bitwise_or.reduce(raw.view(np.uint64)))
    print(f"\ncombine {combine * 1e3:.3f} ms; read {raw.nbytes} B: uint16 sum {read_sum * 1e3:.3f} ms, "
          f"uint64 or-reduce {read_or * 1e3:.3f} ms")
    assert combine <= 3 * read_sum


# --- 950: the arch35 MXFP combine ----------------------------------------------------------------------------------
# An independent reference: codes decoded from their bit fields with integer arithmetic (no ml_dtypes), E8M0 decoded
# by its definition, fp32 products summed slot after slot from 0.0, then bf16 round-half-even on the fp32 bits.
MX_FIELDS = {2: (5, 2, 15), 3: (4, 3, 7), 4: (2, 1, 1)}  # token_dtype: exponent bits, mantissa bits, bias


def ref_decode(codes: np.ndarray, token_dtype: int) -> np.ndarray:
    ebits, mbits, bias = MX_FIELDS[token_dtype]
    codes = codes.astype(np.int64)
    sign = np.where(codes >> (ebits + mbits) & 1, -1.0, 1.0)
    e, m = codes >> mbits & ((1 << ebits) - 1), codes & ((1 << mbits) - 1)
    value = np.where(e == 0, m * 2.0 ** (1 - bias - mbits), (1 + m / (1 << mbits)) * 2.0 ** (e - bias))
    if token_dtype == 2:
        value = np.where(e == 31, np.where(m == 0, np.inf, np.nan), value)
    if token_dtype == 3:
        value = np.where((e == 15) & (m == 7), np.nan, value)
    return (sign * value).astype(np.float32)  # every code is exact in fp32


def ref_mx_combine(rows: np.ndarray, scales: np.ndarray, token_dtype: int, h: int) -> np.ndarray:
    """rows (BS, K+1, bytes) uint8, scales (BS, K+1, S) uint8 -> bf16 bits (BS, H) as uint16."""
    if token_dtype == 4:
        codes = np.stack([rows & 0xF, rows >> 4], axis=-1).reshape(*rows.shape[:2], -1)[..., :h]
    else:
        codes = rows[..., :h]
    values = ref_decode(codes, token_dtype)
    e = scales[..., np.arange(h) // 32].astype(np.int64)
    factor = np.where(e == 255, np.nan, np.where(e == 0, 2.0 ** -127, 2.0 ** (e - 127.0))).astype(np.float32)
    acc = np.zeros((rows.shape[0], h), np.float32)
    with np.errstate(all="ignore"):
        for k in range(rows.shape[1]):
            acc = acc + values[:, k] * factor[:, k]
    bits = acc.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + (bits >> 16 & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(acc), np.uint16(0x7FC0), rounded)


def make_mx(dev, token_dtype, m, bs, k1, h, micro_batch_id=0, seed=0, scale_choices=None):
    rng = np.random.default_rng(seed)
    row = (h + 1) // 2 if token_dtype == 4 else h
    ctx, flags, raw = make_ctx(dev, m, bs, k1, row, itemsize=1, micro_batch_id=micro_batch_id)
    raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
    count = -(-h // 32)
    if scale_choices is None:
        scales = rng.integers(100, 150, (bs, k1, count + count % 2), dtype=np.uint8)
    else:
        scales = rng.choice(np.array(scale_choices, np.uint8), (bs, k1, count + count % 2))
    return ctx, flags, raw.reshape(m, bs, k1, row), scales


def assert_bf16_equal(y, want_bits):
    assert y.dtype == BF16
    got = y.view(np.uint16)
    nan = np.isnan(y.astype(np.float32))
    assert np.array_equal(nan, (want_bits & 0x7FFF) > 0x7F80)
    assert np.array_equal(got[~nan], want_bits[~nan])


@pytest.mark.parametrize("token_dtype", [2, 3, 4])
@pytest.mark.parametrize("h", [31, 33, 64, 7168])
def test_950_mx_combine_matches_the_reference(dev, token_dtype, h):
    m, bs, k1 = 3, 4, 5
    ctx, flags, rows, scales = make_mx(dev, token_dtype, m, bs, k1, h, micro_batch_id=2, seed=h + token_dtype)
    y, nxt = attention_worker_combine(ctx, scales, np.array([4], np.int32), h, token_dtype, generation="950")
    assert y.shape == (bs, h) and nxt.tolist() == [5]
    assert_bf16_equal(y, ref_mx_combine(rows[2], scales, token_dtype, h))
    assert ctx.attention.micro_batch_id == 2 and not flags.any()  # need_schedule=0 touches nothing


@pytest.mark.parametrize("token_dtype", [2, 3, 4])
def test_950_mx_combine_special_scales_and_codes(dev, token_dtype):
    # E8M0 0 (2^-127: products go subnormal or to zero), 1, 254 (overflow to inf), 255 (NaN), random codes
    # (e5m2 Inf/NaN, e4m3fn NaN, every fp4 code, -0).
    m, bs, k1, h = 1, 8, 9, 96
    ctx, _, rows, scales = make_mx(dev, token_dtype, m, bs, k1, h, seed=7, scale_choices=[0, 1, 126, 127, 254, 255])
    y, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, token_dtype, generation="950")
    assert_bf16_equal(y, ref_mx_combine(rows[0], scales, token_dtype, h))
    assert np.isnan(y.astype(np.float32)).any()


def test_950_mx_combine_of_quantised_rows_is_their_sum(dev):
    # The MX rows afd.tokens writes, combined: close to the sum of the original rows (no routing weights).
    from afd import tokens

    bs, k1, h = 3, 4, 100
    x = np.random.default_rng(5).standard_normal((bs, k1, h)).astype(BF16)
    ctx, _, rows, scales = make_mx(dev, 3, 1, bs, k1, h)
    for k in range(k1):
        payload, block_scales = tokens.mx_quantize(x[:, k], 4)
        rows[0, :, k] = payload
        scales[:, k, :block_scales.shape[1]] = block_scales
    y, _ = attention_worker_combine(ctx, scales.view(tokens.E8M0), np.array([0], np.int32), h, 3,
                                    generation="950")
    want = x.astype(np.float32).sum(axis=1)
    assert np.abs(y.astype(np.float32) - want).max() < 0.25 * k1


def test_950_mx_need_schedule_polls_clears_and_advances(dev):
    m, bs, k1, h = 2, 2, 3, 40
    ctx, flags, rows, scales = make_mx(dev, 4, m, bs, k1, h, micro_batch_id=1)
    flags[0] = 1
    flags[1] = 7  # the other micro-batch: untouched
    y, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, 4, need_schedule=1, generation="950")
    assert_bf16_equal(y, ref_mx_combine(rows[0], scales, 4, h))
    assert not flags[0].any() and (flags[1] == 7).all() and ctx.attention.micro_batch_id == 0
    ctx.control.run_flag = 0
    with pytest.raises(Stopped, match="run_flag is 0"):  # micro-batch 1 never becomes ready
        attention_worker_combine(ctx, scales, np.array([0], np.int32), h, 4, need_schedule=1, generation="950")


@pytest.mark.parametrize("token_dtype", [0, 1])
def test_950_plain_token_dtypes_combine_as_a3(dev, token_dtype):
    m, bs, k, h = 1, 3, 2, 64
    ctx, _, raw = make_ctx(dev, m, bs, k + 1, h)
    data = fill(raw, DTYPES[token_dtype], (m, bs, k + 1, h), seed=4)
    scales = np.random.default_rng(2).random((bs, k), dtype=np.float32)
    a3, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, token_dtype)
    y950, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), h, token_dtype, generation="950")
    assert np.array_equal(a3.view(np.uint16), y950.view(np.uint16))
    assert np.array_equal(a3.view(np.uint16), reference(data[0], scales, DTYPES[token_dtype]).view(np.uint16))


def _mx_scales(bs=2, k1=3, s=2, dtype=np.uint8):
    return np.zeros((bs, k1, s), dtype)


@pytest.mark.parametrize("kwargs, err, status, match", [
    (dict(token_dtype=2), AclnnError, 161002, r"token_dtype: must be 0 \(fp16\) or 1 \(bf16\), got 2 "
                                              r"\(the MX token dtypes 2-4 need generation 950\)"),
    (dict(token_dtype=5, generation="950"), AclnnError, 161002, r"token_dtype: must be 0 \(fp16\), 1 \(bf16\), "
                                                                r"2 \(mxfp8 e5m2\), 3 \(mxfp8 e4m3fn\) or 4"),
    (dict(generation="950", expert_scales=_mx_scales(dtype=np.float32)), AclnnError, 161002,
     "expert_scales: dtype must be float8_e8m0fnu"),
    (dict(generation="950", expert_scales=np.zeros((2, 3), np.uint8)), KernelError, 1, "must be 3-D"),
    (dict(generation="950", expert_scales=_mx_scales(s=1)), KernelError, 1,
     r"dim 2 must equal align_up\(ceil\(H/32\), 2\) = 2"),
    (dict(generation="950", expert_scales=_mx_scales(k1=1)), KernelError, 1, r"K \(dim 1 less the shared slot\)"),
    (dict(generation="950", expert_scales=_mx_scales(k1=66)), KernelError, 1, r"in \[1, 64\]"),
    (dict(generation="950", need_schedule=2), AclnnError, 161002, "need_schedule: must be 0 or 1"),
    (dict(generation="B1"), ValueError, None, "generation must be one of"),
])
def test_950_mx_refusals(dev, kwargs, err, status, match):
    ctx, _, _, _ = make_mx(dev, 2, 1, 2, 3, 40)
    args = dict(schedule_context=ctx, expert_scales=_mx_scales(), layer_id=np.array([0], np.int32),
                hidden_size=40, token_dtype=2, need_schedule=0)
    args.update(kwargs)
    with pytest.raises(err, match=match) as info:
        attention_worker_combine(**args)
    assert getattr(info.value, "status", None) == status


def test_950_mx_output_must_be_bf16(dev):
    ctx, _, _, scales = make_mx(dev, 3, 1, 2, 3, 40)
    with pytest.raises(KernelError, match=r"y: the output must be \(2, 40\) bfloat16"):
        attention_worker_combine(ctx, scales, np.array([0], np.int32), 40, 3, generation="950",
                                 out=np.empty((2, 40), np.float16))
    out = np.empty((2, 40), BF16)
    y, _ = attention_worker_combine(ctx, scales, np.array([0], np.int32), 40, 3, generation="950", out=out)
    assert y is out
