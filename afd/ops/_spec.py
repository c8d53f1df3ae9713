"""OutputSpec: one output of an operator as its output rule describes it (shape, numpy dtype, torch dtype name)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OutputSpec(NamedTuple):
    """One output of an operator: its name, shape, numpy dtype (the bytes afd-sim writes) and torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    torch_dtype: str
