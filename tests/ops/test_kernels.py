"""The compiled kernels against the numpy forms they replace (the combine's are in test_attention_worker_combine)."""
import ml_dtypes
import numpy as np
import pytest

from afd.config import load
from afd.model import Model

BF16 = np.dtype(ml_dtypes.bfloat16)


F16 = np.dtype(np.float16)
EVERY_16_BIT_PATTERN = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)


def _same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bit for bit; NaNs only need to be NaNs in the same places (their payloads are the cast's business)."""
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.3719, 1.5, 3.0e38, 1.0e-30])
def test_scale_expert_rounds_every_16_bit_pattern_like_numpy(dtype, p):
    from afd.ops._kernels import scale_groups_bf16, scale_groups_f16

    x = EVERY_16_BIT_PATTERN.view(dtype)
    out = np.empty_like(x)
    kernel = scale_groups_bf16 if dtype == BF16 else scale_groups_f16
    assert kernel(x.view(np.uint32), np.array([[0, 256]], np.int64), np.array([p], np.float32),
                  out.view(np.uint32)) == 256
    with np.errstate(all="ignore"):
        _same_bits(out, (x.astype(np.float32) * np.float32(p)).astype(dtype))


@pytest.mark.parametrize("p", [0.5, 1.3719, -2.5, 3.0e38, 1.0e-30, 1.0e-39, 0.0, np.inf, np.nan])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_the_bf16_scale_expert_with_the_cpus_rounding_gives_the_integer_roundings_bits(p, in_place):
    """Where the CPU has AVX512-BF16 the bf16 `scale` kernels round with vcvtne2ps2bf16 and send the words whose
    products it would round differently (NaN payloads, subnormals) through the integer rounding: every bit the same,
    NaNs included (but for a NaN parameter), for every 16-bit pattern beside another in one word, widths off the
    16-word step too."""
    from afd.ops import _kernels

    if not _kernels.BF16_CONVERT:
        pytest.skip("this CPU has no AVX512-BF16 (the integer rounding is the only one)")
    rng = np.random.default_rng(7)
    words = (EVERY_16_BIT_PATTERN.astype(np.uint32).reshape(-1)
             | (rng.permutation(1 << 16).astype(np.uint32) << 16)).reshape(256, 256)
    name = "scale_groups_inplace_bf16" if in_place else "scale_groups_bf16"
    fast, portable = getattr(_kernels, name), _kernels.PORTABLE_BF16_SCALE[name]
    assert fast is not portable
    params = np.array([p, 0.75], np.float32)
    for width in (256, 255, 17, 15):
        x = np.ascontiguousarray(words[:, :width])
        groups = np.array([[0, 200], [1, 56], [0, 0]], np.int64)
        if in_place:
            got, want = x.copy(), x.copy()
            assert fast(got, groups, params) == portable(want, groups, params) == 256
        else:
            got, want = np.zeros_like(x), np.zeros_like(x)
            assert fast(x, groups, params, got) == portable(x, groups, params, want) == 256
        if np.isnan(p):  # a NaN times a NaN is either NaN (the compiled multiply's operand order): as the cast's
            _same_bits(got.view(BF16), want.view(BF16))
        else:
            assert np.array_equal(got, want), (width, int(np.count_nonzero(got != want)))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_attention_stand_in_rounds_every_16_bit_pattern_like_numpy(dtype):
    from afd.model import attention_reference
    from afd.ops._kernels import attention_pairs_bf16, attention_pairs_f16

    h = EVERY_16_BIT_PATTERN.view(dtype)
    w = np.random.default_rng(1).uniform(0.5, 1.5, 256).astype(np.float32)
    w[:3] = [1.0, 3.0e38, 1.0e-30]  # exact, overflowing and underflowing products too
    out = np.empty_like(h)
    (attention_pairs_bf16 if dtype == BF16 else attention_pairs_f16)(h.view(np.uint32), w[0::2].copy(), w[1::2].copy(),
                                                                    out.view(np.uint32))
    with np.errstate(all="ignore"):
        _same_bits(out, attention_reference(h, w, dtype))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_residual_rounds_every_16_bit_pattern_pair_like_numpy(dtype):
    """Every pattern as h against a shuffled copy of every pattern (and itself) as y: overflow, cancellation,
    subnormal sums, infinities of both signs, NaNs."""
    from afd.ops._kernels import residual_pairs_bf16, residual_pairs_f16

    h = EVERY_16_BIT_PATTERN.view(dtype)
    for y in (h[::-1, ::-1].copy(), np.random.default_rng(2).permutation(h.reshape(-1)).reshape(h.shape), h):
        out = np.empty_like(h)
        (residual_pairs_bf16 if dtype == BF16 else residual_pairs_f16)(h.view(np.uint32), y.view(np.uint32),
                                                                       out.view(np.uint32))
        with np.errstate(all="ignore"):
            _same_bits(out, (h.astype(np.float32) + y.astype(np.float32)).astype(dtype))


@pytest.mark.parametrize("token_dtype", ["bf16", "fp16"])
def test_model_residual_is_the_same_with_and_without_the_kernel(token_dtype):
    model = Model(load({"name": "k", "token_dtype": token_dtype, "hidden_size": 256}))
    rng = np.random.default_rng(0)
    h, y = (rng.uniform(-3, 3, (7, 256)).astype(model.dtype) for _ in range(2))
    got = model.residual(h, y)
    assert got.ctypes.data % 64 == 0
    assert np.array_equal(got.view(np.uint16), model.residual(np.asfortranarray(h), y).view(np.uint16))
    assert np.array_equal(got.view(np.uint16), (h.astype(np.float32) + y.astype(np.float32)).astype(model.dtype)
                          .view(np.uint16))
    into = np.empty_like(h)
    assert model.residual(h, y, out=into) is into and np.array_equal(into.view(np.uint16), got.view(np.uint16))
    odd = np.asfortranarray(np.empty_like(h))  # an out the kernel cannot take: the numpy form's assignment
    assert model.residual(h, y, out=odd) is odd and np.array_equal(odd.view(np.uint16), got.view(np.uint16))
    with pytest.raises(ValueError, match="overlaps"):
        model.residual(h, y, out=y)
    assert model.residual(h, y, out=h) is h and np.array_equal(h.view(np.uint16), got.view(np.uint16))  # in place


def test_fp32_to_fp16_rounds_like_numpy_on_every_boundary():
    """to_f16 against numpy's cast: random patterns, the subnormal and overflow boundaries bit by bit, every NaN
    payload class (an exhaustive pass over all 2**32 patterns matched too, run once by hand: 8 minutes)."""
    import numba

    from afd.ops._kernels import as_f32, to_f16

    @numba.njit
    def narrow_all(bits, out):
        for i in range(bits.shape[0]):
            out[i] = to_f16(as_f32(bits[i]))

    rng = np.random.default_rng(0)
    edges = [np.arange(b - 2048, b + 2048, dtype=np.int64) for b in
             (0x33000000, 0x33800000, 0x38000000, 0x38800000, 0x477FF000, 0x47800000, 0x7F800000)]
    payloads = (np.arange(1, 1 << 10) << 13) | rng.integers(0, 1 << 13, 1023)  # each top-10-bit payload
    nans = [np.arange(0x7F800001, 0x7F800001 + (1 << 14)), 0x7F800000 | payloads, 0x7FC00000 | payloads]
    bits = np.concatenate([rng.integers(0, 1 << 32, 1 << 20), *edges, *nans])
    bits = np.concatenate([bits, bits | (1 << 31)]).astype(np.uint32)
    out = np.empty(bits.size, np.uint32)
    narrow_all(bits, out)
    with np.errstate(all="ignore"):
        want = bits.view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(out.astype(np.uint16), want)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_grouped_scale_expert_is_each_group_through_its_own_expert(dtype):
    """run_experts' one pass over every group equals the model's experts group by group (the numpy form)."""
    from afd.ops.ffn_worker_batching import FfnBatch
    from afd.roles.ffn_worker import run_experts

    cfg = load({"name": "k", "token_dtype": "bf16" if dtype == BF16 else "fp16", "expert_kind": "scale",
                "hidden_size": 256, "routed_experts": 8, "layers": 3})
    model = Model(cfg)
    local = [1, 4, 5, 8]  # global ids held by this rank (8: the shared expert)
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 9, 6)
    ids = rng.choice(len(local) * cfg.layers, 6, replace=False)
    group_list = np.zeros((len(local) * cfg.layers, 2), np.int64)
    group_list[:6, 0], group_list[:6, 1] = ids, counts
    group_list[np.flatnonzero(counts == 0)[:1], 1] = 0  # a zero count ends the list, as the op writes it
    n = int(group_list[:, 1].sum()) if not (counts == 0).any() else int(counts[:np.argmax(counts == 0)].sum())
    y = rng.standard_normal((60, 256), np.float32).astype(dtype)
    batch = FfnBatch(y, group_list, *(np.zeros(60, np.int32),) * 4, np.zeros(60, np.float32),
                     np.array([n], np.int64))
    got = run_experts(model, local, batch, np.full((n, 256), 7, dtype))
    want, start = [], 0
    for local_id, count in group_list.tolist():
        if count == 0:
            break
        layer, j = divmod(local_id, len(local))
        want.append((y[start:start + count].astype(np.float32) * model.expert_param(layer, local[j])).astype(dtype))
        start += count
    assert np.array_equal(got.view(np.uint16), np.concatenate(want or [y[:0]]).view(np.uint16))
    # in place, as the FFN role runs it (out = y[:n]): the same values
    in_place = y.copy()
    run_experts(model, local, batch._replace(y=in_place), in_place[:n])
    assert np.array_equal(in_place[:n].view(np.uint16), got.view(np.uint16))
    assert np.array_equal(in_place[n:].view(np.uint16), y[n:].view(np.uint16))


def test_grouped_scale_expert_refuses_a_group_past_its_experts():
    from afd.errors import KernelError
    from afd.ops.ffn_worker_batching import FfnBatch
    from afd.roles.ffn_worker import run_experts

    model = Model(load({"name": "k", "token_dtype": "bf16", "expert_kind": "scale", "hidden_size": 256}))
    y = np.zeros((4, 256), BF16)
    batch = FfnBatch(y, np.array([[0, 2], [99, 2]], np.int64), *(np.zeros(4, np.int32),) * 4,
                     np.zeros(4, np.float32), np.array([4], np.int64))
    with pytest.raises(KernelError, match="group_list: group 1 \\[99, 2\\] names no local expert"):
        run_experts(model, [0, 1], batch, np.empty((4, 256), BF16))


def test_compiled_paths_refuse_what_the_numpy_forms_refuse():
    """Shapes the kernels would read or write past (they run without bounds checks) are errors, as in numpy."""
    from afd.errors import KernelError
    from afd.ops.ffn_worker_batching import FfnBatch
    from afd.roles.ffn_worker import run_experts

    model = Model(load({"name": "k", "token_dtype": "bf16", "expert_kind": "scale", "hidden_size": 256}))
    x = np.ones((7, 256), BF16)
    big = np.zeros((16, 256), BF16)
    with pytest.raises(ValueError):
        model.expert(1, 3, x, out=big[:2])  # out smaller than x
    assert not big[2:].view(np.uint16).any()
    with pytest.raises(ValueError):
        model.attention(0, np.ones((2, 512), BF16))  # wider than the model's H
    y = np.ones((8, 256), BF16)
    batch = FfnBatch(y, np.array([[0, 6], [0, 0]], np.int64), *(np.zeros(8, np.int32),) * 4,
                     np.zeros(8, np.float32), np.array([6], np.int64))
    with pytest.raises((KernelError, ValueError)):
        run_experts(model, [0, 1], batch, big[:2])  # out too short for the batch
    assert not big[2:].view(np.uint16).any()
    with pytest.raises(KernelError, match="out: overlaps batch.y"):
        run_experts(model, [0, 1], batch, y[1:7])


def test_model_scale_expert_is_the_same_with_and_without_the_kernel():
    model = Model(load({"name": "k", "token_dtype": "bf16", "expert_kind": "scale", "hidden_size": 256}))
    x = np.random.default_rng(0).standard_normal((7, 256), np.float32).astype(BF16)
    odd = np.asfortranarray(x)  # not C-contiguous: the numpy form
    assert np.array_equal(model.expert(1, 3, x).view(np.uint16), model.expert(1, 3, odd).view(np.uint16))
    out = np.empty_like(x)
    assert model.expert(1, 3, x, out=out) is out and np.array_equal(out.view(np.uint16), model.expert(1, 3, odd).view(np.uint16))


@pytest.mark.parametrize("token_dtype", ["bf16", "fp16"])
def test_model_attention_is_the_same_with_and_without_the_kernel(token_dtype):
    model = Model(load({"name": "k", "token_dtype": token_dtype, "hidden_size": 256}))
    h = np.random.default_rng(0).uniform(-3, 3, (7, 256)).astype(model.dtype)
    odd = np.asfortranarray(h)
    a = model.attention(2, h)
    assert np.array_equal(a.view(np.uint16), model.attention(2, odd).view(np.uint16))
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous  # its own output starts on a cache line (empty_lines)


def _window(nbytes: int):
    from afd.comm import LocalWindow
    return LocalWindow.over(np.zeros(nbytes, np.uint8))


@pytest.mark.parametrize("seed", range(12))
def test_rows_copied_once_land_as_the_numpy_scatter_puts_them(seed):
    """put_rows_of (the compiled row copy; numpy's two passes for a strided source) writes exactly the bytes
    put_rows(.., src[src_index]) writes: odd widths, unaligned offsets, both dtypes."""
    rng = np.random.default_rng(seed)
    dtype = [np.dtype(np.float16), BF16][seed % 2]
    h = int(rng.choice([1, 3, 4, 7, 64, 255, 256, 7168 // 8]))
    hs = h + int(rng.integers(0, 5))
    stride = hs * dtype.itemsize
    offset = int(rng.choice([0, 512, 516, 3]))
    y, slots = int(rng.integers(1, 40)), int(rng.integers(1, 50))
    src = rng.standard_normal((y, h + (seed % 3 == 0)), np.float32).astype(dtype)[:, :h]  # every third strided
    n = int(rng.integers(0, min(y, slots) + 1))
    index = rng.permutation(slots)[:n]
    src_index = rng.integers(0, y, n)
    size = offset + slots * stride
    fast, slow = _window(size), _window(size)
    fast.bytes[:] = slow.bytes[:] = rng.integers(0, 255, size, dtype=np.uint8)
    fast.put_rows_of(offset, stride, index, src, src_index, streaming=bool(seed % 2))
    slow.put_rows(offset, stride, index, src[src_index])
    assert np.array_equal(fast.bytes, slow.bytes)


def test_a_row_copy_past_the_window_or_from_a_missing_row_is_an_error():
    from afd.errors import KernelError
    win = _window(512 + 4 * 64)
    src = np.ones((2, 32), np.float16)  # 64-byte rows: the compiled path
    with pytest.raises(KernelError, match="runs past the 768-byte window"):
        win.put_rows_of(512, 64, np.array([4]), src, np.array([0]))
    with pytest.raises(KernelError, match="source rows"):
        win.put_rows_of(512, 64, np.array([1]), src, np.array([2]))
    assert not win.bytes.any()


@pytest.mark.parametrize("h, offset, strided, path", [(64, 512, False, "stream_rows"), (7168, 0, False, "stream_rows"),
                                                      (3, 512, False, "copy_rows"), (64, 516, False, "copy_rows"),
                                                      (64, 512, True, None)])
def test_the_compiled_row_copy_is_taken_where_the_layout_allows_it(monkeypatch, h, offset, strided, path):
    """Whole aligned 8-byte words: streaming stores (x86-64); other widths or offsets: the byte copy; a strided
    source: numpy's gather."""
    from afd.ops import _kernels
    calls = []
    for name in ("copy_rows", "stream_rows"):
        real = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    if path == "stream_rows" and not _kernels.STREAMING_STORES:
        path = "copy_rows"  # (not x86-64: no streaming stores)
    src = np.ones((3, h + strided), BF16)[:, :h]
    win = _window(offset + 4 * h * 2)
    win.put_rows_of(offset, h * 2, np.array([2, 0]), src, np.array([1, 2]), streaming=True)
    assert calls == ([path] if path else [])
    assert win.bytes[offset:].reshape(4, h * 2)[[0, 2]].view(BF16).tolist() == [[1.0] * h] * 2


def test_a_row_wider_than_its_slot_is_an_error_not_a_write_into_the_next_slot():
    from afd.errors import KernelError
    win = _window(512 + 4 * 64)
    with pytest.raises(KernelError, match="do not fit slots 64 bytes apart"):
        win.put_rows_of(512, 64, np.array([0]), np.ones((1, 36), np.float16), np.array([0]))
    assert not win.bytes.any()
