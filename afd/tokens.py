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
X_DTYPE_BY_NAME = {fmt.name: dtype for dtype, fmt in PLAIN.items()}  # the config's token_dtype names: fp16, bf16
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


MX_ELEMENT_MAX = {FP8_E5M2: 57344.0, FP8_E4M3: 448.0, FP4_E2M1: 6.0}  # the saturation bound of each element type
MX_EMAX = {FP8_E5M2: 15, FP8_E4M3: 8, FP4_E2M1: 2}  # the element's largest exponent: a block scale's offset
# The payload afd-sim writes for a block whose scale is 0xFF (an Inf or NaN in it): the element type's positive
# NaN, and 0 for e2m1, which has no NaN [INF: the kernel multiplies by a NaN and converts; its bytes are unspecified,
# the 0xFF scale alone marks the block NaN, and every reader decodes it so].
MX_NAN_CODE = {FP8_E5M2: 0x7E, FP8_E4M3: 0x7F, FP4_E2M1: 0x0}
_CLIP_INV_MAX = {FP8_E5M2: 0x37924925, FP8_E4M3: 0x3B124925}  # fp32 bits of fl(1/57344), fl(1/448), as the kernel
_CLIP_FLOOR = 0x38D1B717  # fp32 bits of 1e-4: MX_CLIP's lower bound on a block's amax


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, np.float32).view(np.uint32)


def _round_bf16(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round half even) -> fp32: the result of a bf16 multiply."""
    return values.astype(BF16).astype(np.float32)


def quantize_int8(rows: np.ndarray, generation: str = "A3") -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row int8 of rows (fp16, bf16 or fp32, [n, H]); returns (q int8 [n, H], fp32 dequant scale [n]).

    A3: q = rint(x * 127/max|x|) with the scale max|x|/127, an all-zero row gets scale 0 (afd-sim's long-standing
    rule, kept as the model and the tests use it). The V1 kernel stores fl32(1/fl32(127/max|x|)) with no zero guard
    [seen], as 950 does: it differs from max|x|/127 in the last bit for some rows (not changed here).
    950 (the arch35 A2F kernel): f = fp32(x); m = max|f|; d = fl32(127/m) with no zero guard; q = rint(f*d)
    (round half even; |f*d| <= 127.00002, so the int8 saturation never bites); scale = fl32(1/d). An all-zero row
    has d = inf and f*d = NaN: its payload is undefined on hardware (afd-sim writes 0) and its scale is 1/inf = 0.
    Rows holding Inf or NaN are likewise undefined there; afd-sim writes 0 for each NaN product.
    """
    check_generation(generation)
    if generation == "A3":
        amax = np.max(np.abs(rows), axis=1)
        dequant = (amax / np.float32(127)).astype(np.float32)
        # a subnormal max|x| overflows 127/max|x| to inf, as fp32 does on the device: the row's max then saturates
        # and its zeros (0 * inf = NaN) are written 0, as 950's NaN products are
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            quant = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
            v = np.rint(rows * quant[:, None])
        q = np.clip(np.nan_to_num(v, nan=0.0), -127, 127).astype(np.int8)
        return q, dequant
    f = np.asarray(rows).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = np.float32(127) / np.max(np.abs(f), axis=1)
        v = np.rint(f * d[:, None])
        scale = (np.float32(1) / d).astype(np.float32)
    q = np.clip(np.nan_to_num(v, nan=0.0), -128, 127).astype(np.int8)
    return q, scale


def _mx_blocks(rows: np.ndarray) -> np.ndarray:
    """rows [n, H] fp16/bf16 -> fp32 [n, ceil(H/32), 32], the partial last block padded with +0."""
    n, h = rows.shape
    nb = -(-h // MX_BLOCK)
    out = np.zeros((n, nb * MX_BLOCK), np.float32)
    out[:, :h] = rows
    return out.reshape(n, nb, MX_BLOCK)


def _mx_scales(x: np.ndarray, element: np.dtype, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Block scale bytes [n, nb] and the fp32 multiplier 2^(127 - scale) [n, nb] (NaN for 0xFF, 0 for a zero block),
    as quantize_functions.h's ComputeMaxExp/ComputeScale (MX) and ComputeMaxExpClip/ComputeScaleClip (MX_CLIP)."""
    bits = _bits(x)
    if not clip:
        # The largest exponent field (bf16's, an fp16 value truncated to bf16 keeps its exponent; Inf/NaN give 255).
        e = ((bits >> 23) & 0xFF).max(axis=2).astype(np.int32)
        emax = MX_EMAX[element]
        special, zero = e == 255, e == 0
        scale = np.maximum(e, emax) - emax
        mult = np.ldexp(np.float32(1), 127 - scale).astype(np.float32)  # 2^127 .. 2^-125, and 2^-127 at 254
    else:
        amax = np.max(np.abs(x), axis=2)  # NaN propagates; both are exact fp32 values of the input
        special, zero = ~np.isfinite(amax), amax == 0
        with np.errstate(invalid="ignore", over="ignore"):
            v = _bits(np.maximum(amax, _f32(_CLIP_FLOOR)) * _f32(_CLIP_INV_MAX[element]))
        exp, man = (v >> 23).astype(np.int32), v & 0x7FFFFF
        up = ((exp > 0) & (exp < 254) & (man > 0)) | ((exp == 0) & (man > 0x400000))  # ceil(log2(v)), biased
        scale = exp + up
        mult = _f32(((0x7F00 - (scale.astype(np.int64) << 7)) & 0xFFFF).astype(np.uint32) << 16)  # bf16 2^(127-s)
    scale = np.where(special, 255, np.where(zero, 0, scale)).astype(np.uint8)
    mult = np.where(special, np.float32(np.nan), np.where(zero, np.float32(0), mult)).astype(np.float32)
    return scale, mult


def mx_quantize(rows: np.ndarray, quant_mode: int) -> tuple[np.ndarray, np.ndarray]:
    """MX quantisation of rows (fp16 or bf16, [n, H]) for quant_mode 3-7, as the arch35 AttentionToFfn V2 kernel.

    Returns (payload uint8 [n, payload_bytes], scales uint8 [n, ceil(H/32)]): one E8M0 scale per 32-element block
    (a partial last block uses its own elements). MX (3, 4, 5): scale = max(e, emax) - emax with e the block's
    largest bf16 exponent field and emax 15 (e5m2), 8 (e4m3fn), 2 (e2m1); 0xFF when the block holds an Inf or NaN,
    0 when every e is 0 (all zeros, and bf16 subnormals, whose outputs are then +-0). MX_CLIP (6, 7): scale =
    ceil(log2(fl32(max(amax, 1e-4) * fl32(1/fpmax)))), fpmax 57344 (e5m2) or 448 (e4m3fn), same 0xFF / 0 rules.
    Elements: x * 2^(127 - scale), in fp32 for fp16 input to fp8, in bf16 otherwise (fp16 input to fp4 goes to
    bf16 by truncation after a sticky bit is set, as the kernel's FP16Convert: for fp16 subnormals this differs
    from rounding x itself), then round half even with saturation to +-fpmax (the fp8 casts saturate [seen]; e2m1's
    cast mode is unspecified, and it has no Inf [INF]). fp4 packs two per byte, the low nibble the even element (an
    odd H's last high nibble 0). A partial last block's scale comes from its own elements: the kernel's vector
    masks also let lanes past H (stale buffer contents) into that block's max, undefined on hardware [INF: taken as
    zeros]; the even-count padding scale byte encode_rows adds is 0 for the same reason.
    """
    mode = QUANT_MODES[quant_mode]
    row_format = mode.row_format(FP16)
    if not row_format.mx:
        raise ValueError(f"quant_mode {quant_mode} ({mode.name}) is not an MX mode")
    rows = np.asarray(rows)
    if rows.dtype not in X_DTYPES or rows.ndim != 2:
        raise ValueError(f"rows must be 2-D float16 or bfloat16, got {rows.dtype} {rows.shape}")
    element = mode.element
    n, h = rows.shape
    x = _mx_blocks(rows)
    scale, mult = _mx_scales(x, element, mode.clip)
    if element == FP4_E2M1 and rows.dtype == FP16:
        # FP16Convert: a set low bit below bf16's mantissa (bits 0-2, bits 3-7 clear) sets bit 3, so that the
        # truncation to bf16 keeps it sticky for the rounding to e2m1.
        b = np.zeros((n, x.shape[1] * MX_BLOCK), np.uint16)
        b[:, :h] = rows.view(np.uint16)
        low = b & 0xFF
        b = np.where((low > 0) & (low < 8), b | 0x0008, b)
        x = _f32(_bits(b.view(np.float16).astype(np.float32)) & 0xFFFF0000).reshape(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        p = x * mult[:, :, None]
    if not (element != FP4_E2M1 and rows.dtype == FP16):
        p = _round_bf16(p)
    bound = np.float32(MX_ELEMENT_MAX[element])
    codes = np.clip(p, -bound, bound).astype(element).view(np.uint8)
    codes = np.where((scale == 255)[:, :, None], np.uint8(MX_NAN_CODE[element]), codes).reshape(n, x.shape[1] * MX_BLOCK)[:, :h]
    if element == FP4_E2M1:
        codes = _pack_fp4(codes)
    return np.ascontiguousarray(codes), scale


def _pack_fp4(codes: np.ndarray) -> np.ndarray:
    n, h = codes.shape
    padded = np.zeros((n, h + h % 2), np.uint8)
    padded[:, :h] = codes
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def decode_e8m0(scales: np.ndarray) -> np.ndarray:
    """E8M0 bytes -> fp32 2^(e - 127): 0 is 2^-127 (an fp32 subnormal), 255 NaN (the combine kernel's decode)."""
    e = np.asarray(scales).view(np.uint8).astype(np.uint32)
    return _f32(np.where(e == 0, 0x00400000, np.where(e == 255, 0x7FC00000, e << 23)))


def mx_elements(payload: np.ndarray, element_dtype, h: int) -> np.ndarray:
    """An MX payload's elements as fp32 [n, h] (exact: every fp8/fp4 value is an fp32)."""
    element = np.dtype(element_dtype)
    payload = np.ascontiguousarray(payload).view(np.uint8)
    if element == FP4_E2M1:
        codes = np.empty((payload.shape[0], payload.shape[1] * 2), np.uint8)
        codes[:, 0::2], codes[:, 1::2] = payload & 0x0F, payload >> 4
    else:
        codes = payload
    return codes[:, :h].view(element).astype(np.float32)


def mx_dequantize(payload: np.ndarray, scales: np.ndarray, element_dtype, h: int) -> np.ndarray:
    """fp32 [n, h] = element * 2^(e - 127) per 32-element block (one fp32 multiply; e = 255 gives NaN).

    scales may carry the even-count padding byte (it is ignored)."""
    values = mx_elements(payload, element_dtype, h)
    nb = -(-int(h) // MX_BLOCK)
    factor = np.repeat(decode_e8m0(np.asarray(scales)[:, :nb]), MX_BLOCK, axis=1)[:, :h]
    with np.errstate(invalid="ignore", under="ignore", over="ignore"):
        return values * factor  # e5m2's top values times 2^127 overflow to inf, as an fp32 multiply does


def encode_rows(rows: np.ndarray, quant_mode: int, generation: str = "A3", smooth=None) -> np.ndarray:
    """The slot rows AttentionToFfn writes for x rows (fp16/bf16 [n, H]): uint8 [n, row_bytes] as RowFormat lays them.

    Mode 0: the rows' bytes. Mode 2: int8 payload, zeros up to align32(H), the fp32 scale there (quantize_int8 of
    fp32(x) * smooth when smooth (fp32, [H] or [n, H]) is given). MX modes (950 only, no smooth): payload, block
    scales, and a 0 padding byte when ceil(H/32) is odd.
    """
    check_generation(generation)
    mode = QUANT_MODES.get(quant_mode)
    if mode is None or generation not in mode.generations:
        raise ValueError(f"quant_mode must be one of {quant_modes(generation)} on {generation}, got {quant_mode}")
    rows = np.asarray(rows)
    if rows.dtype not in X_DTYPES or rows.ndim != 2:
        raise ValueError(f"rows must be 2-D float16 or bfloat16, got {rows.dtype} {rows.shape}")
    n, h = rows.shape
    fmt = mode.row_format(rows.dtype)
    if mode.element is None:
        return np.ascontiguousarray(rows).view(np.uint8).reshape(n, fmt.row_bytes(h, generation))
    out = np.zeros((n, fmt.row_bytes(h, generation)), np.uint8)
    at = fmt.scale_at(h, generation)
    if fmt.scale == FP32:
        f = rows.astype(np.float32)
        if smooth is not None:
            f = f * np.asarray(smooth, np.float32)
        q, scale = quantize_int8(f, generation)
        out[:, :h] = q.view(np.uint8)
        out[:, at:at + 4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
        return out
    if smooth is not None:
        raise ValueError(f"smooth scales go with quant_mode 0 or 2, not {quant_mode} ({mode.name})")
    payload, scales = mx_quantize(rows, quant_mode)
    out[:, :payload.shape[1]] = payload
    out[:, at:at + scales.shape[1]] = scales
    return out
