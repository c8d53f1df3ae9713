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
