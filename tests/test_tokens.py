"""afd.tokens: row formats and the quantisation arithmetic against an independent per-element reference."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from afd import tokens


@pytest.mark.parametrize("mode", [0, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("h", [31, 33, 64])
def test_encode_rows_is_row_bytes_wide(mode, h):
    rows = np.random.default_rng(h).standard_normal((3, h)).astype(ml_dtypes.bfloat16)
    out = tokens.encode_rows(rows, mode, "950")
    fmt = tokens.QUANT_MODES[mode].row_format(rows.dtype)
    assert out.shape == (3, fmt.row_bytes(h, "950")) and out.dtype == np.uint8
