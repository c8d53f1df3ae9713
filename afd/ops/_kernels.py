"""Compiled inner loops (numba) for the ops whose numpy form is several passes over the same bytes.

The combine's numpy form widens, multiplies, reduces and narrows in four passes (~10x a plain read of the
micro-batch); here each pair of 16-bit values is loaded once as a 32-bit word, widened by a shift or a mask, and
summed in registers. Results are bit-identical to the numpy form: fp32, k in order, multiply then add (numba
does not contract into FMA without fastmath), round-to-nearest-even on the way back to bfloat16. The `scale`
expert (the model's cheap expert) and the attention stand-in are the same widen-compute-round in one pass.
Compiled once per machine and cached on disk next to this module (numba's cache, keyed by the source); importing
this module costs ~0.5 s (numba), so the ops import it on first use.
"""
from __future__ import annotations

import platform

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic

_U16 = np.uint32(16)
_ONE = np.float32(1.0)
_F16_TO_F32_SCALE = np.float32(2.0 ** 112)  # rebias a 5-bit exponent into the 8-bit one (exact, subnormals too)
_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
_inline = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")


@intrinsic
def as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def as_u32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


# Numba widens integer arithmetic to 64 bits; every step here is cast back to uint32 (_u) so LLVM keeps 32-bit
# lanes (twice as many per vector: the scale expert 0.99 -> 0.73 ms on 432 x 7168 bf16). The values are the same.
_u = np.uint32


@_inline
def widen(bits16, half):
    """The 16 low bits as an fp32: bf16 is the top half of one; fp16 is rebiased exactly (inf/NaN kept)."""
    if not half:
        return as_f32(_u(bits16 << _U16))
    mag = _u(_u(bits16 & _u(0x7FFF)) << _u(13))
    sign = _u(_u(bits16 & _u(0x8000)) << _U16)
    v = as_u32(as_f32(mag) * _F16_TO_F32_SCALE)
    if mag >= _u(0x7C00 << 13):
        v = _u(mag | _u(0x7F800000))
    return as_f32(_u(v | sign))


@_inline
def lo(word, half):
    return widen(_u(word & _u(0xFFFF)), half)


@_inline
def hi(word, half):
    if not half:  # bf16: the high half already sits where an fp32's top bits go
        return as_f32(_u(word & _u(0xFFFF0000)))
    return widen(_u(word >> _U16), half)


@_inline
def to_bf16(v):
    """fp32 -> bf16 bits, round to nearest even; NaN -> the quiet NaN with v's sign (as ml_dtypes does)."""
    u = as_u32(v)
    rounded = _u(_u(_u(u + _u(0x7FFF)) + _u(_u(u >> _U16) & _u(1))) >> _U16)
    nan = _u(_u(_u(u >> _U16) & _u(0x8000)) | _u(0x7FC0))
    return nan if v != v else rounded


_F16_MAX_BITS = np.uint32((127 + 16) << 23)  # 65536.0: at or above it fp16 is inf (or NaN)
_F16_NORMAL_BITS = np.uint32(113 << 23)  # 2**-14, fp16's smallest normal
_DENORM_MAGIC = np.float32(0.5)  # 0.5 = 2**-1: adding it aligns fp16's 10 subnormal mantissa bits at the bottom
_F16_REBIAS = np.uint32(((127 - 15) << 23) - 0xFFF)  # exponent 127 -> 15, plus the rounding half-ulp


@_inline
def to_f16(v):
    """fp32 -> fp16 bits, round to nearest even, as numpy's cast: overflow to inf, subnormals rounded by one
    fp32 add (its RNE does the rounding), NaN kept a NaN with its sign and top payload bits."""
    u = as_u32(v)
    sign = _u(_u(u >> _U16) & _u(0x8000))
    a = _u(u & _u(0x7FFFFFFF))
    if a >= _F16_MAX_BITS:
        if a > _u(0x7F800000):  # NaN: numpy keeps the payload's top bits, and a NaN (never inf)
            payload = _u(_u(a >> _u(13)) & _u(0x3FF))
            return _u(_u(sign | _u(0x7C00)) | (payload if payload else _u(1)))
        return _u(sign | _u(0x7C00))
    if a < _F16_NORMAL_BITS:
        return _u(sign | _u(as_u32(as_f32(a) + _DENORM_MAGIC) - as_u32(_DENORM_MAGIC)))
    # rebias the exponent (127 -> 15) and round on the 13 dropped bits; a carry into the exponent is right
    return _u(sign | _u(_u(_u(a - _F16_REBIAS) + _u(_u(a >> _u(13)) & _u(1))) >> _u(13)))


@_inline
def narrow(v, half):
    """fp32 -> the 16 bits of the token dtype (fp16 or bf16), round to nearest even."""
    return to_f16(v) if half else to_bf16(v)


@_inline
def _combine_pairs(src, scales, half, acc, out):
    """src (BS, >=K+1, H/2) uint32 words of two 16-bit values; scales (BS, K) f32; acc (2, H/2) f32 scratch;
    out (BS, H/2) uint32 words of two values of the same dtype, rounded to nearest even."""
    bs = src.shape[0]
    h2 = src.shape[2]
    k = scales.shape[1]
    a0 = acc[0]
    a1 = acc[1]
    for i in range(bs):
        si = scales[i]
        # Four slots per pass keep the running sum in registers; the order of additions is unchanged.
        if k >= 4:
            r0, r1, r2, r3 = src[i, 0], src[i, 1], src[i, 2], src[i, 3]
            s0, s1, s2, s3 = si[0], si[1], si[2], si[3]
            for j in range(h2):
                w0, w1, w2, w3 = r0[j], r1[j], r2[j], r3[j]
                a0[j] = ((lo(w0, half) * s0 + lo(w1, half) * s1) + lo(w2, half) * s2) + lo(w3, half) * s3
                a1[j] = ((hi(w0, half) * s0 + hi(w1, half) * s1) + hi(w2, half) * s2) + hi(w3, half) * s3
            kk = 4
        elif k >= 1:
            r0 = src[i, 0]
            s0 = si[0]
            for j in range(h2):
                a0[j] = lo(r0[j], half) * s0
                a1[j] = hi(r0[j], half) * s0
            kk = 1
        else:  # no routed slot: only the shared one
            a0[:] = 0.0
            a1[:] = 0.0
            kk = 0
        while kk + 4 <= k:
            r0, r1, r2, r3 = src[i, kk], src[i, kk + 1], src[i, kk + 2], src[i, kk + 3]
            s0, s1, s2, s3 = si[kk], si[kk + 1], si[kk + 2], si[kk + 3]
            for j in range(h2):
                w0, w1, w2, w3 = r0[j], r1[j], r2[j], r3[j]
                a0[j] = (((a0[j] + lo(w0, half) * s0) + lo(w1, half) * s1) + lo(w2, half) * s2) + lo(w3, half) * s3
                a1[j] = (((a1[j] + hi(w0, half) * s0) + hi(w1, half) * s1) + hi(w2, half) * s2) + hi(w3, half) * s3
            kk += 4
        while kk < k:
            r0 = src[i, kk]
            s0 = si[kk]
            for j in range(h2):
                a0[j] = a0[j] + lo(r0[j], half) * s0
                a1[j] = a1[j] + hi(r0[j], half) * s0
            kk += 1
        shared = src[i, k]  # the shared expert's slot: weight 1.0, added as is
        ob = out[i]
        for j in range(h2):
            ob[j] = _u(narrow(a0[j] + lo(shared[j], half), half) | _u(narrow(a1[j] + hi(shared[j], half), half) << _U16))


@_jit
def combine_pairs_bf16(src, scales, acc, out):
    """bf16 slots -> bf16 y (out: BS x H/2 words); `half` is a constant here, so its branches compile away."""
    _combine_pairs(src, scales, False, acc, out)


@_jit
def combine_pairs_f16(src, scales, acc, out):
    """fp16 slots -> fp16 y (out: BS x H/2 words)."""
    _combine_pairs(src, scales, True, acc, out)


@_inline
def _scale_rows(src, start, stop, p, half, out):
    for i in range(start, stop):
        r = src[i]
        o = out[i]
        for j in range(src.shape[1]):
            w = r[j]
            o[j] = _u(narrow(lo(w, half) * p, half) | _u(narrow(hi(w, half) * p, half) << _U16))


def _group_walk(scale_rows):
    """The grouped `scale` expert's walk for a row kernel scale_rows(src, start, stop, p, half, out): group g
    (group_list[g] = [local expert id, count], in order, up to a [.., 0] row) scaled by params[id]; the rows done,
    or -1 - g for a bad group. (scale_rows is a constant of the walk: each kernel compiles its own, inlined.)"""
    @_inline
    def walk(src, group_list, params, half, out):
        start = 0
        rows = min(src.shape[0], out.shape[0])
        for g in range(group_list.shape[0]):
            expert, count = group_list[g, 0], group_list[g, 1]
            if count == 0:
                break
            if expert < 0 or expert >= params.shape[0] or count < 0 or start + count > rows:
                return -1 - g
            scale_rows(src, start, start + count, params[expert], half, out)
            start += count
        return start
    return walk


_scale_groups = _group_walk(_scale_rows)


@_jit
def scale_groups_bf16(src, group_list, params, out):
    """The `scale` expert over a whole batch: the rows of group g (group_list[g] = [local expert id, count], in
    order, up to a [.., 0] row) times params[id], in one pass; returns the rows done, or -1 - g for a bad group
    (an id past params, or rows past src or out)."""
    return _scale_groups(src, group_list, params, False, out)


# -- the bf16 `scale` expert with the CPU's own bf16 rounding (AVX512-BF16) ---------------------------------------
# The integer round-to-nearest-even above is ~20 vector instructions per 16 words; vcvtne2ps2bf16 rounds 32 fp32
# values to bf16 in one, the same bits except where it differs from ml_dtypes: it flushes subnormals (in and out)
# and keeps a NaN's payload. Products that are NaN or fp32-subnormal (one vfpclassps each) take the integer path,
# for those 16 words only: every output stays bit-identical. Measured on 432 x 7168 bf16 in place: 340-357 -> 168-198
# us side by side. Only where the CPU numba compiles for is this host with AVX512-BF16 (not a NUMBA_CPU_NAME
# build for other machines: the assembler and the intrinsic would not exist there).
_LANES = 16  # fp32 lanes of a 512-bit vector; 16 words = 32 bf16 values a step
_BF16_FEATURES = ("avx512f", "avx512bw", "avx512dq", "avx512bf16")
BF16_CONVERT = (platform.machine().lower() in ("x86_64", "amd64") and numba_config.CPU_NAME is None and numba_config.CPU_FEATURES is None
                and all(llvm.get_host_cpu_features().get(f) for f in _BF16_FEATURES))
if BF16_CONVERT:
    llvm.initialize_native_asmparser()  # (inline assembly; numba does not load the parser itself)


@intrinsic
def _scale_words_bf16(typingctx, src, dst, j, p):
    """dst[j:j+16] = the words src[j:j+16] (pairs of bf16) times p, rounded by vcvtne2ps2bf16; False, and nothing
    stored, when a product is NaN or fp32-subnormal (the instruction's rounding differs there)."""
    def codegen(context, builder, signature, args):
        def pointer(k):
            aryty = signature.args[k]
            return cgutils.get_item_pointer(context, builder, aryty,
                                            context.make_array(aryty)(context, builder, args[k]), [args[2]],
                                            wraparound=False, boundscheck=False)
        i32 = ir.IntType(32)
        words, floats = ir.VectorType(i32, _LANES), ir.VectorType(ir.FloatType(), _LANES)
        w = builder.load(builder.bitcast(pointer(0), words.as_pointer()), align=4)
        lo = builder.bitcast(builder.shl(w, ir.Constant(words, [16] * _LANES)), floats)
        hi = builder.bitcast(builder.and_(w, ir.Constant(words, [-(1 << 16)] * _LANES)), floats)
        p = builder.insert_element(ir.Constant(floats, ir.Undefined), args[3], ir.Constant(i32, 0))
        p = builder.shuffle_vector(p, p, ir.Constant(words, [0] * _LANES))
        a, b = builder.fmul(lo, p), builder.fmul(hi, p)
        fpclass = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VectorType(ir.IntType(1), _LANES), [floats, i32]),
            "llvm.x86.avx512.fpclass.ps.512")
        special = builder.or_(builder.call(fpclass, [a, ir.Constant(i32, 0xA1)]),  # QNaN | SNaN | subnormal
                              builder.call(fpclass, [b, ir.Constant(i32, 0xA1)]))
        lanes = ir.IntType(_LANES)
        ok = builder.icmp_unsigned("==", builder.bitcast(special, lanes), ir.Constant(lanes, 0))
        with builder.if_then(ok, likely=True):
            # low 256 bits: a's 16 bf16, high 256: b's; interleaved back into words (vpermw)
            packed = builder.asm(ir.FunctionType(words, [floats, floats]), "vcvtne2ps2bf16 $2, $1, $0", "=v,v,v",
                                 [b, a], side_effect=False)
            halves = ir.VectorType(ir.IntType(16), 2 * _LANES)
            order = ir.Constant(ir.VectorType(i32, 2 * _LANES), [x for k in range(_LANES) for x in (k, k + _LANES)])
            h = builder.bitcast(packed, halves)
            builder.store(builder.bitcast(builder.shuffle_vector(h, h, order), words),
                          builder.bitcast(pointer(1), words.as_pointer()), align=4)
        return ok
    return types.boolean(src, dst, j, p), codegen


@_inline
def _scale_rows_cvt(src, start, stop, p, half, out):  # (half: always False, bf16 only)
    h2 = src.shape[1]
    for i in range(start, stop):
        r = src[i]
        o = out[i]
        j = 0
        while j + _LANES <= h2:
            if not _scale_words_bf16(r, o, j, p):
                for t in range(j, j + _LANES):  # (out may be src: each word read before it is written)
                    w = r[t]
                    o[t] = _u(to_bf16(lo(w, False) * p) | _u(to_bf16(hi(w, False) * p) << _U16))
            j += _LANES
        for t in range(j, h2):
            w = r[t]
            o[t] = _u(to_bf16(lo(w, False) * p) | _u(to_bf16(hi(w, False) * p) << _U16))


_scale_groups_cvt = _group_walk(_scale_rows_cvt)


@_jit
def scale_groups_bf16_cvt(src, group_list, params, out):
    """scale_groups_bf16 rounding with AVX512-BF16 (BF16_CONVERT only): the same outputs, bit for bit."""
    return _scale_groups_cvt(src, group_list, params, False, out)


@_jit
def scale_groups_inplace_bf16_cvt(rows, group_list, params):
    """scale_groups_inplace_bf16 rounding with AVX512-BF16 (BF16_CONVERT only): the same outputs, bit for bit."""
    return _scale_groups_cvt(rows, group_list, params, False, rows)


@_jit
def scale_groups_f16(src, group_list, params, out):
    """scale_groups_bf16 for fp16 rows."""
    return _scale_groups(src, group_list, params, True, out)


@_jit
def scale_groups_inplace_bf16(rows, group_list, params):
    """scale_groups_bf16 with out = the rows themselves (one buffer instead of two; the out-of-place kernel on the
    same array runs scalar: LLVM's overlap check fails)."""
    return _scale_groups(rows, group_list, params, False, rows)



# the integer-rounding forms (what the tests hold the AVX512-BF16 ones to), and the ones the model calls
PORTABLE_BF16_SCALE = {"scale_groups_bf16": scale_groups_bf16, "scale_groups_inplace_bf16": scale_groups_inplace_bf16}
if BF16_CONVERT:
    scale_groups_bf16, scale_groups_inplace_bf16 = scale_groups_bf16_cvt, scale_groups_inplace_bf16_cvt


@_jit
def scale_groups_inplace_f16(rows, group_list, params):
    """scale_groups_inplace_bf16 for fp16 rows."""
    return _scale_groups(rows, group_list, params, True, rows)


@_inline
def _attention_rows(src, w_even, w_odd, half, out):
    for i in range(src.shape[0]):
        r = src[i]
        o = out[i]
        for j in range(src.shape[1]):
            word = r[j]
            v0 = lo(word, half) * w_even[j]
            v1 = hi(word, half) * w_odd[j]
            # softsign v / (1 + |v|): IEEE add, abs and divide, so every build and numpy agree bit for bit
            o[j] = _u(narrow(v0 / (_ONE + abs(v0)), half) | _u(narrow(v1 / (_ONE + abs(v1)), half) << _U16))



@_jit
def attention_pairs_bf16(src, w_even, w_odd, out):
    """The attention stand-in a = softsign(f32(h) * w) on rows of bf16 pairs (BS x H/2 words), in one pass. The
    weights come split into even and odd columns (w[0::2], w[1::2]), one per half of a word: with w whole, LLVM
    splits it in the loop with two 512-bit permutes per 16 values (measured on 48 x 7168: 121 -> 91 us with the
    data in cache, 248 -> 190 us with the output cold)."""
    _attention_rows(src, w_even, w_odd, False, out)


@_jit
def attention_pairs_f16(src, w_even, w_odd, out):
    """attention_pairs_bf16 for fp16 rows."""
    _attention_rows(src, w_even, w_odd, True, out)


@_inline
def _residual_rows(h, y, half, out):
    for i in range(h.shape[0]):
        a = h[i]
        b = y[i]
        o = out[i]
        for j in range(h.shape[1]):
            u = a[j]
            v = b[j]
            o[j] = _u(narrow(lo(u, half) + lo(v, half), half) | _u(narrow(hi(u, half) + hi(v, half), half) << _U16))


@_jit
def residual_pairs_bf16(h, y, out):
    """The residual h + y in fp32, rounded to bf16, on rows of bf16 pairs, in one pass (numpy's form is four:
    two widenings, the add, the rounding; 0.63 ms on 48 x 7168 with its data in cache)."""
    _residual_rows(h, y, False, out)


@_jit
def residual_pairs_f16(h, y, out):
    """residual_pairs_bf16 for fp16 rows."""
    _residual_rows(h, y, True, out)


@_jit
def residual_pairs_inplace_bf16(h, y):
    """h += y (residual_pairs_bf16 into h itself: given the same array twice, LLVM's overlap check fails and the
    two-buffer kernel runs scalar)."""
    _residual_rows(h, y, False, h)


@_jit
def residual_pairs_inplace_f16(h, y):
    """residual_pairs_inplace_bf16 for fp16 rows."""
    _residual_rows(h, y, True, h)


@_jit
def copy_rows(dst, dst_index, src, src_index, width):
    """dst[dst_index[i], :width] = src[src_index[i], :width] for every i (uint8 rows): a row scatter-gather in one
    pass (numpy's fancy indexing makes it two: a gather into a temporary, then the scatter). The byte loop is
    what LLVM turns into a vector copy (measured: 0.47 ms for 432 rows of 14336 B, np.copyto of them 0.45 ms;
    a loop over uint64 words 0.56 ms)."""
    for i in range(dst_index.shape[0]):
        d = dst[dst_index[i]]
        s = src[src_index[i]]
        for j in range(width):
            d[j] = s[j]


# Streaming (non-temporal) stores for the window writes, x86-64 only (they need its sfence). A row written into a
# peer's window is read by another process later, after megabytes of other traffic: a plain store first reads the
# line it writes (write-allocate) and then evicts something for it; a streaming store writes the line to memory
# without reading it. Measured on 432 rows of 14336 B with cold caches: 0.89 ms plain, 0.43 ms streaming.
STREAMING_STORES = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _stream_store(typingctx, arr, index, value):
    """arr[index] = value as a non-temporal store (LLVM's !nontemporal: movnti on x86-64)."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False,
                                       boundscheck=False)
        store = builder.store(context.cast(builder, args[2], signature.args[2], aryty.dtype), ptr)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(arr, index, value), codegen


_LINE_WORDS = 8  # 64 bytes: one cache line, one 512-bit streaming store


@intrinsic
def _stream_line(typingctx, dst, dst_word, src, src_word):
    """The 8 words of src from src_word to the 64-byte aligned dst[dst_word:dst_word + 8] as one vector streaming
    store (LLVM's !nontemporal on an aligned <8 x i64>: vmovntdq; the words one by one are 8 movnti)."""
    def codegen(context, builder, signature, args):
        dty, _, sty, _ = signature.args
        dptr = cgutils.get_item_pointer(context, builder, dty, context.make_array(dty)(context, builder, args[0]),
                                        [args[1]], wraparound=False, boundscheck=False)
        sptr = cgutils.get_item_pointer(context, builder, sty, context.make_array(sty)(context, builder, args[2]),
                                        [args[3]], wraparound=False, boundscheck=False)
        line = ir.VectorType(ir.IntType(64), _LINE_WORDS)
        value = builder.load(builder.bitcast(sptr, line.as_pointer()), align=8)
        store = builder.store(value, builder.bitcast(dptr, line.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(dst, dst_word, src, src_word), codegen


@intrinsic
def _line_offset(typingctx, arr, index):
    """The byte offset of &arr[index] within its 64-byte line."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ptr = cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, args[0]),
                                       [args[1]], wraparound=False, boundscheck=False)
        return builder.and_(builder.ptrtoint(ptr, ir.IntType(64)), ir.Constant(ir.IntType(64), 63))
    return types.int64(arr, index), codegen


@intrinsic
def _store_fence(typingctx):
    """sfence: every earlier store, streaming ones too, is visible before any later one (x86-64)."""
    def codegen(context, builder, signature, args):
        fence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                               "llvm.x86.sse.sfence")
        builder.call(fence, [])
        return context.get_dummy_value()
    return types.void(), codegen


@_jit
def stream_rows(dst, dst_index, src, src_index, words):
    """copy_rows over uint64 words with streaming stores, then a store fence, so a flag stored after the call is
    seen after the rows (as the protocol needs: data, then flag). Each destination row's whole 64-byte lines go
    as one vector store each, the words before the first and after the last one by one (measured on 432 rows of
    14336 B: 245 -> 233 us). x86-64 only (STREAMING_STORES)."""
    for i in range(dst_index.shape[0]):
        d = dst[dst_index[i]]
        s = src[src_index[i]]
        head = min(words, ((64 - _line_offset(d, 0)) & 63) >> 3)
        for j in range(head):
            _stream_store(d, j, s[j])
        j = head
        for _ in range((words - head) // _LINE_WORDS):
            _stream_line(d, j, s, j)
            j += _LINE_WORDS
        for t in range(j, words):
            _stream_store(d, t, s[t])
    _store_fence()


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def warm_up_copy_rows() -> None:
    """Load (once per machine: compile) what every window writer runs (copy_rows for the window writes' types,
    group_by_rank), before any watchdog runs. Read-only arrays are other types to numba, and an agent's are: the
    index it parses from a message's bytes, a body in a received frame (a container, whose cache held only the
    writable types, compiled those at its first puts inside the run: 160-290 ms)."""
    for index_ro in (False, True):
        for src_ro in (False, True):
            index = _read_only(np.zeros(1, np.int64)) if index_ro else np.zeros(1, np.int64)
            copy_rows(np.zeros((1, 1), np.uint8), index, _read_only(np.zeros((1, 1), np.uint8)) if src_ro
                      else np.zeros((1, 1), np.uint8), np.zeros(1, np.int64), 1)
            if STREAMING_STORES:
                stream_rows(np.zeros((1, 1), np.uint64), index, _read_only(np.zeros((1, 1), np.uint64)) if src_ro
                            else np.zeros((1, 1), np.uint64), np.zeros(1, np.int64), 1)
    group_by_rank(np.zeros(1, np.int64), 0, 1, np.zeros(1, np.int64), np.zeros(2, np.int64))


def warm_up_ffn_to_attention() -> None:
    """Load (once per machine: compile) FFNToAttention's destinations for the op's argument types."""
    i32 = [np.zeros(1, np.int32) for _ in range(5)]
    f2a_slots(*i32, 1, 1, 1, 2, np.zeros(1, np.int64), np.zeros(1, np.int64))


def warm_up_attention_to_ffn() -> None:
    """Load (once per machine: compile) AttentionToFFN's routes for the op's argument types."""
    i64 = [np.zeros(1, np.int64) for _ in range(4)]
    a2f_routes(np.zeros((1, 1), np.int32), np.zeros((2, 3), np.int32), 0, 1, 1, 0, 1, 0, i64[0],
               np.zeros(1, np.int32), *i64[1:])


def warm_up_batching() -> None:
    """Load (once per machine: compile) FfnWorkerBatching's sort for the op's argument types."""
    i32 = [np.zeros(1, np.int32) for _ in range(4)]
    batch_slots(np.zeros((1, 1), np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64), 1, 1, 1, 1, -1, -2,
                np.zeros(1, np.int64), np.zeros(1, np.int64), *i32, np.zeros((1, 2), np.int64), np.zeros((2, 1), np.int64))


def warm_up_attention(half: bool) -> None:
    """Load (once per machine: compile) the attention stand-in's and the residual's kernels for fp16 (half) or
    bf16."""
    words = [np.zeros((1, 1), np.uint32) for _ in range(3)]
    (attention_pairs_f16 if half else attention_pairs_bf16)(words[0], np.zeros(1, np.float32),
                                                            np.zeros(1, np.float32), words[1])
    (residual_pairs_f16 if half else residual_pairs_bf16)(*words)
    (residual_pairs_inplace_f16 if half else residual_pairs_inplace_bf16)(*words[:2])


def warm_up_scale(half: bool) -> None:
    """Load (once per machine: compile) the grouped `scale` expert's kernel for fp16 (half) or bf16."""
    (scale_groups_f16 if half else scale_groups_bf16)(
        np.zeros((1, 1), np.uint32), np.zeros((1, 2), np.int64), np.zeros(1, np.float32), np.zeros((1, 1), np.uint32))
    (scale_groups_inplace_f16 if half else scale_groups_inplace_bf16)(
        np.zeros((1, 1), np.uint32), np.zeros((1, 2), np.int64), np.zeros(1, np.float32))


# -- the ops' per-slot bookkeeping (ids, routes, counting sorts) in one pass each ---------------------------------
# Each returns a status instead of raising: >= 0 is the result, a negative one points the caller to the value its
# numpy checks then name (so the error messages stay the ops' own).

@_jit
def batch_slots(ids, sessions, mbs, expert_num, m, bs, k1, sentinel_a, sentinel_b, counts, src, sess_out, mb_out,
                tok_out, k_out, group_list, gather):
    """FfnWorkerBatching's sort: the valid (non-sentinel) ids of ids (rows x BS*(K+1)) counted by expert, then
    placed stably (flat order within an expert, as a stable argsort); src gets each placed slot's row in the FFN
    data region, the *_out arrays its session, micro-batch, token and k (zero past n), group_list [expert, count]
    rows in ascending expert order then zeros, gather (2, >= n) the same (batch row, data row) pairs in flat order:
    the data region's order, in which a gather reads one sequential stream (rows in batch order jump from slot to
    slot: measured 0.66-0.71 ms against 0.45-0.49 ms for 432 rows of 14336 B fresh from memory). Returns n, or
    -1 - i for the first flat index i of a bad id."""
    per_row = bs * k1
    counts[:] = 0
    flat = ids.reshape(ids.size)
    for i in range(flat.shape[0]):
        e = flat[i]
        if e == sentinel_a or e == sentinel_b:
            continue
        if e < 0 or e >= expert_num:
            return -1 - i
        counts[e] += 1
    n = 0
    g = 0
    group_list[:] = 0
    for e in range(expert_num):
        c = counts[e]
        counts[e] = n  # now the next free position of expert e
        if c:
            group_list[g, 0] = e
            group_list[g, 1] = c
            g += 1
            n += c
    placed = 0
    for i in range(flat.shape[0]):
        e = flat[i]
        if e == sentinel_a or e == sentinel_b:
            continue
        pos = counts[e]
        counts[e] = pos + 1
        row = i // per_row
        rest = i - row * per_row
        token = rest // k1
        k = rest - token * k1
        slot = ((sessions[row] * m + mbs[row]) * bs + token) * k1 + k
        src[pos] = slot
        gather[0, placed] = pos
        gather[1, placed] = slot
        placed += 1
        sess_out[pos] = sessions[row]
        mb_out[pos] = mbs[row]
        tok_out[pos] = token
        k_out[pos] = k
    for arr in (sess_out, mb_out, tok_out, k_out):
        arr[n:] = 0
    return n


@_jit
def group_by_rank(dst, rank_lo, rank_hi, order, starts):
    """A stable counting sort of dst (ranks) in [rank_lo, rank_hi): order gets the indices rank by rank, starts
    (rank_hi - rank_lo + 1) each rank's first position. Returns 0, or -1 - i for the first i out of range."""
    starts[:] = 0
    for i in range(dst.shape[0]):
        r = dst[i]
        if r < rank_lo or r >= rank_hi:
            return -1 - i
        starts[r - rank_lo + 1] += 1
    for j in range(1, starts.shape[0]):
        starts[j] += starts[j - 1]
    fill = starts[:-1].copy()
    for i in range(dst.shape[0]):
        j = dst[i] - rank_lo
        order[fill[j]] = i
        fill[j] += 1
    return 0


@_jit
def a2f_routes(routed, layer_table, session, moe_expert_num, shared, rank_lo, rank_hi, slot_base, dst, local, tok,
               info_index, slots):
    """AttentionToFFN's routes: for token t and slot k (K routed ids, then the shared experts moe_expert_num + j),
    the expert's table row [count, rank_0, local_0, ...] picks replica session % count; dst/local get its FFN rank
    and local id, tok the token, info_index t*(K+1) + k, slots slot_base + that. Returns 0, or 1 (an id outside
    [0, moe_expert_num)), 2 (a replica count outside [1, (Mtab-1)//2]) or 3 (a rank outside [rank_lo, rank_hi))."""
    cur_bs, k = routed.shape
    k1 = k + shared
    max_count = (layer_table.shape[1] - 1) // 2
    for t in range(cur_bs):
        for kk in range(k1):
            if kk < k:
                e = routed[t, kk]
                if e < 0 or e >= moe_expert_num:
                    return 1
            else:
                e = moe_expert_num + kk - k
            row = layer_table[e]
            count = row[0]
            if count < 1 or count > max_count:
                return 2
            replica = session % count
            r = row[1 + 2 * replica]
            if r < rank_lo or r >= rank_hi:
                return 3
            i = t * k1 + kk
            dst[i] = r
            local[i] = row[2 + 2 * replica]
            tok[i] = t
            info_index[i] = i
            slots[i] = slot_base + i
    return 0


@_jit
def f2a_slots(sessions, micro_batches, tokens, k_slots, rank_table, m, bs, k1, world_size, dst, slots):
    """FFNToAttention's destinations: row i goes to rank rank_table[session] (the session itself without a table,
    rank_table empty) at slot (mb * BS + token) * (K+1) + k. Returns 0, or 1 when any id or rank is out of range
    (the caller's numpy checks then name it)."""
    n_sessions = rank_table.shape[0] if rank_table.shape[0] else world_size
    for j in range(rank_table.shape[0]):  # the whole table, used or not
        if rank_table[j] < 0 or rank_table[j] >= world_size:
            return 1
    for i in range(sessions.shape[0]):
        s, mb, t, k = sessions[i], micro_batches[i], tokens[i], k_slots[i]
        if s < 0 or s >= n_sessions or mb < 0 or mb >= m or t < 0 or t >= bs or k < 0 or k >= k1:
            return 1
        dst[i] = rank_table[s] if rank_table.shape[0] else s
        slots[i] = (mb * bs + t) * k1 + k
    return 0


def warm_up_combine(half: bool) -> None:
    """Load (once per machine: compile) AttentionWorkerCombine's kernel for fp16 (half) or bf16 slots."""
    (combine_pairs_f16 if half else combine_pairs_bf16)(np.zeros((1, 2, 1), np.uint32), np.zeros((1, 1), np.float32),
                                                        np.zeros((2, 1), np.float32), np.zeros((1, 1), np.uint32))


def warm_ups() -> list:
    """Every kernel's warm-up for both token dtypes, one call each."""
    from functools import partial
    return [warm_up_copy_rows, warm_up_attention_to_ffn, warm_up_ffn_to_attention, warm_up_batching,
            *(partial(w, half) for half in (False, True) for w in (warm_up_attention, warm_up_scale,
                                                                   warm_up_combine))]


def warm_up_all() -> None:
    """Compile (once per machine) or load every kernel for both token dtypes: an image does this at build time."""
    for warm_up in warm_ups():
        warm_up()
