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
