"""Token dtypes, quant modes and row formats: what one slot of a window holds, per generation (A3, 950).

The one home of these facts: the operators (afd.ops), the front-ends (their dtype codes and output dtypes) and the
model read them from here. Pure data and arithmetic; no device memory, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

GENERATIONS = ("A3", "950")  # A3: torch_npu 2.14's V1 operators; 950: the V2 window operators, arch35 kernels

FP16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
INT8 = np.dtype(np.int8)
FP32 = np.dtype("<f4")
FP8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
FP8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP4_E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)  # two per byte in a window and in torch (float4_e2m1fn_x2)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)  # MX block scale: 2^(e - 127)

X_DTYPES = (FP16, BF16)  # what attention hidden states and FFN outputs are; F2A rows and combine slots carry them
DTYPE_NAMES = {FP16: "float16", BF16: "bfloat16", INT8: "int8", FP32: "float32", FP8_E5M2: "float8_e5m2",
               FP8_E4M3: "float8_e4m3fn", FP4_E2M1: "float4_e2m1fn_x2", E8M0: "float8_e8m0fnu"}  # torch's names
MX_BLOCK = 32  # elements per E8M0 scale


def align32(n: int) -> int:
    return (int(n) + 31) // 32 * 32


def check_generation(generation: str) -> str:
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    return generation


@dataclass(frozen=True)
class RowFormat:
    """One token row as a window slot holds it: the payload elements, then (quantised formats) its scale(s)."""

    name: str
    element: np.dtype  # the payload's element type
    scale: np.dtype | None = None  # FP32 (one per row) for int8, E8M0 (one per 32 elements) for MX, else None

    @property
    def mx(self) -> bool:
        return self.scale == E8M0

    def payload_bytes(self, h: int) -> int:
        return (int(h) + 1) // 2 if self.element == FP4_E2M1 else int(h) * self.element.itemsize

    def scale_count(self, h: int) -> int:
        """Scales a reader takes per row: 1 (int8), ceil(H/32) (MX), 0."""
        if self.scale is None:
            return 0
        return -(-int(h) // MX_BLOCK) if self.mx else 1

    def scale_at(self, h: int, generation: str = "A3", *, writer: bool = True) -> int:
        """Byte offset of the scale(s) in the slot. The int8 writer (A2F, both generations) puts the fp32 scale at
        align32(H); FfnWorkerBatching V1 reads it there too, V2's reads it at byte H (they agree when 32 | H).
        MX scales follow the payload directly."""
        if self.scale == FP32 and (writer or generation == "A3"):
            return align32(h)
        return self.payload_bytes(h)

    def row_bytes(self, h: int, generation: str = "A3") -> int:
        """Bytes the writer puts in a slot (MX scales padded to an even count, as A2F V2 writes them)."""
        if self.scale is None:
            return self.payload_bytes(h)
        count = self.scale_count(h)
        if self.mx:
            count += count % 2
        return self.scale_at(h, generation) + count * self.scale.itemsize


PLAIN = {FP16: RowFormat("fp16", FP16), BF16: RowFormat("bf16", BF16)}
INT8_ROW = RowFormat("int8 + fp32 scale", INT8, FP32)
MX_ROWS = {FP8_E5M2: RowFormat("mxfp8 e5m2", FP8_E5M2, E8M0), FP8_E4M3: RowFormat("mxfp8 e4m3fn", FP8_E4M3, E8M0),
           FP4_E2M1: RowFormat("mxfp4 e2m1", FP4_E2M1, E8M0)}


@dataclass(frozen=True)
class QuantMode:
    """An AttentionToFfn quant_mode: how x rows are turned into slot payloads."""

    code: int
    name: str
    element: np.dtype | None  # None: the payload is x's own dtype (mode 0)
    clip: bool = False  # MX_CLIP: the scale from ceil(log2(amax / fpmax)) instead of the exponent rule
    generations: tuple[str, ...] = GENERATIONS

    def row_format(self, x_dtype) -> RowFormat:
        if self.element is None:
            return PLAIN[np.dtype(x_dtype)]
        return INT8_ROW if self.element == INT8 else MX_ROWS[self.element]


QUANT_MODES = {q.code: q for q in (
    QuantMode(0, "none", None),
    QuantMode(2, "dynamic int8", INT8),
    QuantMode(3, "MX fp8 e5m2", FP8_E5M2, generations=("950",)),
    QuantMode(4, "MX fp8 e4m3fn", FP8_E4M3, generations=("950",)),
    QuantMode(5, "MX fp4 e2m1", FP4_E2M1, generations=("950",)),
    QuantMode(6, "MX_CLIP fp8 e5m2", FP8_E5M2, clip=True, generations=("950",)),
    QuantMode(7, "MX_CLIP fp8 e4m3fn", FP8_E4M3, clip=True, generations=("950",)),
)}

# FfnWorkerBatching's token_dtype: the row format it gathers (it copies bytes; it never converts).
BATCHING_TOKEN_DTYPES = {0: PLAIN[FP16], 1: PLAIN[BF16], 2: INT8_ROW, 3: MX_ROWS[FP8_E5M2], 4: MX_ROWS[FP8_E4M3],
                         5: MX_ROWS[FP4_E2M1]}
BATCHING_TOKEN_DTYPE_CODES = {"A3": (0, 1, 2), "950": (0, 1, 2, 3, 4, 5)}
# AttentionWorkerCombine's token_dtype: what its slots hold; the 950 (arch35) kernel also dequantises MX slots.
COMBINE_TOKEN_DTYPES = {0: PLAIN[FP16], 1: PLAIN[BF16], 2: MX_ROWS[FP8_E5M2], 3: MX_ROWS[FP8_E4M3],
                        4: MX_ROWS[FP4_E2M1]}
COMBINE_TOKEN_DTYPE_CODES = {"A3": (0, 1), "950": (0, 1, 2, 3, 4)}


def quant_modes(generation: str) -> tuple[int, ...]:
    return tuple(code for code, q in QUANT_MODES.items() if generation in q.generations)


def describe_codes(table: dict, codes) -> str:
    """'0 (fp16), 1 (bf16) or 2 (...)' for an error message."""
    parts = [f"{c} ({table[c].name})" for c in codes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row int8: q = rint(x * 127/max|x|), returned with the fp32 dequant scale max|x|/127.

    Rounding is round-half-even and an all-zero row gets scale 0 [INF: the kernel's cast mode is not documented].
    """
    amax = np.max(np.abs(rows), axis=1)
    dequant = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        quant = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(rows * quant[:, None]), -127, 127).astype(np.int8)
    return q, dequant
