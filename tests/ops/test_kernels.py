"""The compiled kernels against the numpy forms they replace (the combine's are in test_attention_worker_combine)."""
import ml_dtypes
import numpy as np
import pytest

from afd.config import load
from afd.model import Model

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.3719, 1.5, 3.0e38])
def test_scale_expert_rounds_every_bf16_pattern_like_ml_dtypes(p):
    from afd.ops._kernels import scale_pairs_bf16

    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(BF16).reshape(256, 256)
    out = np.empty_like(x)
    scale_pairs_bf16(x.view(np.uint32), np.float32(p), out.view(np.uint32))
    with np.errstate(all="ignore"):
        want = (x.astype(np.float32) * np.float32(p)).astype(BF16)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(out.astype(np.float32)), nan)
    assert np.array_equal(out.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_model_scale_expert_is_the_same_with_and_without_the_kernel():
    model = Model(load({"name": "k", "token_dtype": "bf16", "expert_kind": "scale", "hidden_size": 256}))
    x = np.random.default_rng(0).standard_normal((7, 256), np.float32).astype(BF16)
    odd = np.asfortranarray(x)  # not C-contiguous: the numpy form
    assert np.array_equal(model.expert(1, 3, x).view(np.uint16), model.expert(1, 3, odd).view(np.uint16))


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
    fast.put_rows_of(offset, stride, index, src, src_index)
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


@pytest.mark.parametrize("h, offset, strided, compiled", [(64, 512, False, True), (7168, 0, False, True),
                                                          (3, 512, False, True), (64, 516, False, True),
                                                          (64, 512, True, False)])
def test_the_compiled_row_copy_is_taken_where_the_layout_allows_it(monkeypatch, h, offset, strided, compiled):
    from afd.ops import _kernels
    calls = []
    real = _kernels.copy_rows
    monkeypatch.setattr(_kernels, "copy_rows", lambda *a: calls.append(1) or real(*a))
    src = np.ones((3, h + strided), BF16)[:, :h]
    _window(offset + 4 * h * 2).put_rows_of(offset, h * 2, np.array([2, 0]), src, np.array([1, 2]))
    assert bool(calls) is compiled


def test_a_row_wider_than_its_slot_is_an_error_not_a_write_into_the_next_slot():
    from afd.errors import KernelError
    win = _window(512 + 4 * 64)
    with pytest.raises(KernelError, match="do not fit slots 64 bytes apart"):
        win.put_rows_of(512, 64, np.array([0]), np.ones((1, 36), np.float16), np.array([0]))
    assert not win.bytes.any()
