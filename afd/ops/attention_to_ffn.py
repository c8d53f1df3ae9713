"""AttentionToFFN: send one micro-batch's tokens to the FFN ranks owning their experts, then the record headers."""
from __future__ import annotations

import logging

import numpy as np

from .. import comm, tokens
from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import INVALID_FLAG, VALID_FLAG, align512
from ..tokens import X_DTYPES, align32, check_generation
from . import _limits
from ._polling import Idle, Waiting, sched_yield

log = logging.getLogger("afd.ops.attention_to_ffn")

MAX_WORLD_SIZE_950 = 1024  # the V2 tiling's maxWorldSize (V1: 768)
SHARED_EXPERT_MAX_NUM = 4
MIB = 1 << 20


def _arr(name: str, value, dtype, ndim: int | None = None):
    if value is None:
        raise AclnnError(name, "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    arr = np.asarray(value)
    ok = arr.dtype in dtype if isinstance(dtype, tuple) else arr.dtype == dtype
    if not ok:
        want = " or ".join(str(np.dtype(d)) for d in (dtype if isinstance(dtype, tuple) else (dtype,)))
        raise AclnnError(name, f"dtype must be {want}, got {arr.dtype}", ACLNN_ERR_PARAM_INVALID)
    if ndim is not None and arr.ndim != ndim:
        raise KernelError(name, f"must be {ndim}-D, got shape {arr.shape}")
    return arr


def _shape(name: str, value, length: int) -> tuple[int, ...]:
    shape = tuple(int(v) for v in value)
    if len(shape) != length or any(v <= 0 for v in shape):
        raise KernelError(name, f"must be {length} positive entries, got {list(shape)}")
    return shape


def _in_range(name: str, values: np.ndarray, lo: int, hi: int) -> None:
    values = np.asarray(values)
    if values.size and (int(values.min()) < lo or int(values.max()) >= hi):
        bad = values[(values < lo) | (values >= hi)].reshape(-1)[0]
        raise KernelError(name, f"values must be in [{lo}, {hi}), found {int(bad)}")


def _scalar_in_range(name: str, value: int, lo: int, hi: int) -> None:
    """_in_range for the one value of a (1,) input, without numpy's reductions."""
    if not lo <= value < hi:
        raise KernelError(name, f"values must be in [{lo}, {hi}), found {value}")


def check_attention_to_ffn_host(x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, scales,
                                active_mask, *, group, world_size: int, ffn_token_info_table_shape,
                                ffn_token_data_shape, attn_token_info_table_shape, moe_expert_num: int,
                                quant_mode: int = 0, sync_flag: int = 0, ffn_start_rank_id: int = 0,
                                rank: int, generation: str = "A3", ccl_buffer_size: int | None = None) -> dict:
    """The aclnn and tiling checks of attention_to_ffn (dtypes, shapes, attributes: nothing in device memory).
    Returns the checked arrays and the dimensions the kernel uses. generation "950": the V2 tiling's checks
    (_check_tiling_950); ccl_buffer_size (950 only, optional) is then checked against what the V2 window needs."""
    check_generation(generation)
    group = comm.resolve(group)
    x = _arr("x", x, X_DTYPES, 3)
    session_id = _arr("session_id", session_id, np.int32, 1)
    micro_batch_id = _arr("micro_batch_id", micro_batch_id, np.int32, 1)
    layer_id = _arr("layer_id", layer_id, np.int32, 1)
    expert_ids = _arr("expert_ids", expert_ids, np.int32, 3)
    table = _arr("expert_rank_table", expert_rank_table, np.int32, 3)
    if scales is not None:
        scales = _arr("scales", scales, np.float32, 3)
    if active_mask is not None:
        active_mask = _arr("active_mask", active_mask, np.bool_, 2)
    if generation == "950":
        return _check_tiling_950(group, x, session_id, micro_batch_id, layer_id, expert_ids, table, scales,
                                 active_mask, world_size, ffn_token_info_table_shape, ffn_token_data_shape,
                                 attn_token_info_table_shape, moe_expert_num, quant_mode, sync_flag,
                                 ffn_start_rank_id, rank, ccl_buffer_size)
    if quant_mode not in (0, 2):
        raise AclnnError("quant_mode", f"must be 0 (none) or 2 (dynamic int8), got {quant_mode}",
                         ACLNN_ERR_PARAM_INVALID)
    if sync_flag not in (0, 1):
        raise AclnnError("sync_flag", f"must be 0 or 1, got {sync_flag}", ACLNN_ERR_PARAM_INVALID)

    # Tiling checks.
    xn, bs, h = x.shape
    if xn != 1:
        raise KernelError("x", f"X (dim 0) must be 1, got {xn}")
    for name, arr in (("session_id", session_id), ("micro_batch_id", micro_batch_id), ("layer_id", layer_id)):
        if arr.shape != (1,):
            raise KernelError(name, f"shape must be (X,) = (1,), got {arr.shape}")
    if expert_ids.shape[:2] != (1, bs):
        raise KernelError("expert_ids", f"shape must be (1, BS={bs}, K), got {expert_ids.shape}")
    k = expert_ids.shape[2]
    a, m, info_ints = _shape("ffn_token_info_table_shape", ffn_token_info_table_shape, 3)
    data_shape = _shape("ffn_token_data_shape", ffn_token_data_shape, 5)
    attn_shape = _shape("attn_token_info_table_shape", attn_token_info_table_shape, 3)
    if data_shape[:2] != (a, m):
        raise KernelError("ffn_token_data_shape", f"[A, M] = {list(data_shape[:2])} must equal "
                                                  f"ffn_token_info_table_shape[0:2] = {[a, m]}")
    _, _, fbs, k1, hs = data_shape
    if fbs != bs:
        raise KernelError("ffn_token_data_shape", f"BS = {fbs} must equal x's BS = {bs}")
    if info_ints != 2 + bs * k1:
        raise KernelError("ffn_token_info_table_shape", f"[2] must be 2 + BS*(K+1) = {2 + bs * k1}, got {info_ints}")
    if attn_shape[1:] != (bs, k1):
        raise KernelError("attn_token_info_table_shape", f"must be [M, BS={bs}, K+1={k1}], got {list(attn_shape)}")
    shared = k1 - k
    if not 0 <= shared <= 4:
        raise KernelError("ffn_token_data_shape", f"K+1 - K = {shared} shared experts must be in [0, 4] "
                                                  f"(K = {k} from expert_ids)")
    moe_expert_num = int(moe_expert_num)
    if moe_expert_num <= 0:
        raise KernelError("moe_expert_num", f"must be > 0, got {moe_expert_num}")
    world_size = int(world_size)
    if not 2 <= world_size <= 768:
        raise KernelError("world_size", f"must be in [2, 768], got {world_size}")
    if group.world_size != world_size:
        raise KernelError("world_size", f"is {world_size} but group {group.name!r} has {group.world_size} ranks")
    ffn_start, ffn_num = int(ffn_start_rank_id), world_size - a
    if ffn_num < 1:
        raise KernelError("world_size", f"world_size {world_size} leaves no FFN rank beside A={a} attention ranks")
    if ffn_start < 0 or ffn_start + ffn_num > world_size:
        raise KernelError("ffn_start_rank_id", f"FFN ranks [{ffn_start}, {ffn_start + ffn_num}) must lie in "
                                               f"[0, world_size={world_size})")
    if not 0 <= int(rank) < world_size:
        raise KernelError("rank", f"must be in [0, world_size={world_size}), got {rank}")
    n_layers, n_experts, mtab = table.shape
    if n_experts < moe_expert_num + shared:
        raise KernelError("expert_rank_table", f"dim 1 must be >= moeExpertNum + shared = "
                                               f"{moe_expert_num + shared}, got {n_experts}")
    if not 1 < mtab <= 2 * ffn_num + 1:
        raise KernelError("expert_rank_table", f"width Mtab must satisfy 1 < Mtab <= 2*ffn_num+1 = "
                                               f"{2 * ffn_num + 1}, got {mtab}")
    if scales is not None and (scales.shape[0] != n_layers or scales.shape[1] < moe_expert_num + shared
                               or scales.shape[2] != h):
        raise KernelError("scales", f"shape must be (L={n_layers}, E>={moe_expert_num + shared}, H={h}), "
                                    f"got {scales.shape}")
    itemsize = 1 if quant_mode == 2 else x.dtype.itemsize
    row_bytes = align32(h) + 4 if quant_mode == 2 else h * itemsize
    if row_bytes > hs * itemsize:
        raise KernelError("ffn_token_data_shape", f"HS = {hs} holds {hs * itemsize} bytes per slot, "
                                                  f"a token needs {row_bytes}")
    if _limits.strict():
        if not 1 <= bs <= 512:
            raise KernelError("x", f"BS={bs} must be in (0, 512] (strict A3 limit)")
        if not 1024 <= h <= 8192:
            raise KernelError("x", f"H={h} must be in [1024, 8192] (strict A3 limit)")
        if not 1 <= k <= 16:
            raise KernelError("expert_ids", f"K={k} must be in (0, 16] (strict A3 limit)")
        if moe_expert_num > 1024:
            raise KernelError("moe_expert_num", f"{moe_expert_num} must be in (0, 1024] (strict A3 limit)")

    return dict(group=group, x=x, session_id=session_id, micro_batch_id=micro_batch_id, layer_id=layer_id,
                expert_ids=expert_ids, table=table, scales=scales, active_mask=active_mask, bs=bs, h=h, k=k, a=a,
                m=m, info_ints=info_ints, k1=k1, hs=hs, attn_m=attn_shape[0], shared=shared,
                moe_expert_num=moe_expert_num, ffn_start=ffn_start, ffn_num=ffn_num, n_layers=n_layers,
                mtab=mtab, itemsize=itemsize, world_size=world_size, generation="A3")


def _invalid(field: str, value, expected: str) -> KernelError:
    """The V2 tiling's "invalid value" failure: the field, its value and what the tiling expects."""
    return KernelError(field, f"actual {value}, expected {expected}")


def _refused(field: str, value, reason: str) -> KernelError:
    """The V2 tiling's failure with a reason (OP_LOGE_FOR_INVALID_*_WITH_REASON)."""
    return KernelError(field, f"actual {value}, reason: {reason}")


def slot_transfer_bytes(row_format: tokens.RowFormat, h: int) -> int:
    """Bytes A2F V2 transfers per slot (the kernel's hCommuSize_): the row, and for quantised modes its scale pad:
    int8 H + 128 (the fp32 scale at align32(H) inside it), MX align256(payload) + the even scale count. The bytes
    past RowFormat.row_bytes are staging leftovers on hardware [undefined]; afd-sim leaves them untouched."""
    if row_format.scale is None:
        return row_format.payload_bytes(h)
    if not row_format.mx:
        return int(h) + 128
    count = row_format.scale_count(h)
    return (row_format.payload_bytes(h) + 255) // 256 * 256 + count + count % 2


def _check_tiling_950(group, x, session_id, micro_batch_id, layer_id, expert_ids, table, scales, active_mask,
                      world_size, info_shape, data_shape, attn_shape, moe_expert_num, quant_mode, sync_flag,
                      ffn_start_rank_id, rank, ccl_buffer_size) -> dict:
    """AttentionToFfnV2's tiling checks (attention_to_ffn_v2_tiling.cpp over the shared base tiling), in its order.
    The limits afd-sim's A3 path enforces only in strict mode (BS <= 512, H in [1024, 8192], K <= 16,
    moe_expert_num <= 1024) stay strict-only here; every other rule holds always. Two rules the real tiling checks
    only in the MX modes (data[3] = K + shared, info[2] = 2 + BS*(K + shared)) hold for every mode here: a
    mismatch would put slot words outside their record."""
    modes = tokens.quant_modes("950")
    if quant_mode not in modes:
        raise _invalid("quant_mode", quant_mode, ", ".join(map(str, modes[:-1])) + f" or {modes[-1]}")
    fmt = tokens.QUANT_MODES[quant_mode].row_format(x.dtype)
    if fmt.mx and scales is not None:
        raise KernelError("scales", "scales must be absent in MX/MX_CLIP modes")
    moe_expert_num, world_size = int(moe_expert_num), int(world_size)
    if moe_expert_num <= 0 or (_limits.strict() and moe_expert_num > 1024):
        raise _invalid("moe_expert_num", moe_expert_num, "(0, 1024]")
    if sync_flag not in (0, 1):
        raise _invalid("sync_flag", sync_flag, "0 or 1")
    ffn_start = int(ffn_start_rank_id)
    if not 0 <= ffn_start < world_size:
        raise _invalid("ffn_start_rank_id", ffn_start, f"[0, {world_size})")
    if not 2 <= world_size <= MAX_WORLD_SIZE_950:
        raise _invalid("world_size", world_size, f"[2, {MAX_WORLD_SIZE_950}]")
    if group.world_size != world_size:
        raise KernelError("world_size", f"is {world_size} but group {group.name!r} has {group.world_size} ranks")

    info = _shape("ffn_token_info_table_shape", info_shape, 3)
    data = _shape("ffn_token_data_shape", data_shape, 5)
    attn = _shape("attn_token_info_table_shape", attn_shape, 3)
    xn, bs, h = x.shape
    for bad, field, value, reason in (
            (info[0] != data[0], "ffn_token_info_table_shape", info[0],
             "Dim0 of ffn_token_info_table_shape must be equal to dim0 of ffn_token_data_shape"),
            (info[1] != data[1], "ffn_token_info_table_shape", info[1],
             "Dim1 of ffn_token_info_table_shape must be equal to dim1 of ffn_token_data_shape"),
            (data[2] != bs, "ffn_token_data_shape", data[2], "Dim2 of ffn_token_data_shape must be equal to bs"),
            (attn[0] != info[1], "attn_token_info_table_shape", attn[0],
             "Dim0 of attn_token_info_table_shape must be equal to dim1 of ffn_token_info_table_shape"),
            (attn[1] != bs, "attn_token_info_table_shape", attn[1],
             "Dim1 of attn_token_info_table_shape must be equal to dim1 of x"),
            (attn[2] != data[3], "attn_token_info_table_shape", attn[2],
             "Dim2 of attn_token_info_table_shape must be equal to dim3 of ffn_token_data_shape")):
        if bad:
            raise _refused(field, f"[{value}]", reason)
    a, m, _, k1, hs = data
    if not 0 < a < world_size:
        raise _invalid("ffn_token_data_shape", a, f"(0, worldSize={world_size})")
    if scales is not None and quant_mode == 0:
        raise _refused("scales and quant_mode", f"isScales=1, quantMode={quant_mode}",
                       "The value of scales must match quant_mode")

    if xn != 1:
        raise _refused("x", f"[{xn}]", "Dim0 of x must be 1")
    if _limits.strict() and not 0 < bs <= 512:
        raise _invalid("x", bs, "(0, 512]")
    if _limits.strict() and not 1024 <= h <= 8192:
        raise _invalid("x", h, "[1024, 8192]")
    dims0 = [session_id.shape[0], micro_batch_id.shape[0], layer_id.shape[0], expert_ids.shape[0]]
    if any(d != xn for d in dims0):
        raise _refused("session_id, micro_batch_id, layer_id and expert_ids", str(dims0),
                       "Dim0 of session_id, micro_batch_id, layer_id and expert_ids must be 1")
    if expert_ids.shape[1] != bs:
        raise _refused("expert_ids and x", f"[{expert_ids.shape[1]}, {bs}]",
                       "Dim1 of expert_ids must be equal to dim1 of x")
    k = expert_ids.shape[2]
    if k <= 0 or k > moe_expert_num or (_limits.strict() and k > 16):
        raise _invalid("expert_ids", k, f"(0, min(16, moe_expert_num={moe_expert_num})]")
    n_layers, e_tab, m_tab = table.shape
    if n_layers < 1:
        raise _refused("expert_rank_table", f"[{n_layers}]", "Dim0 of expert_rank_table must greater than 0")
    if not moe_expert_num <= e_tab <= moe_expert_num + SHARED_EXPERT_MAX_NUM:
        raise _invalid("expert_rank_table", e_tab, f"[{moe_expert_num}, {moe_expert_num + SHARED_EXPERT_MAX_NUM}]")
    if not 1 <= m_tab <= 2 * MAX_WORLD_SIZE_950 + 1:
        raise _invalid("expert_rank_table", m_tab, f"[1, {2 * MAX_WORLD_SIZE_950 + 1}]")
    if scales is not None:
        for dim, want, reason in ((0, n_layers, "Dim0 of scales must be equal to dim0 of expertRankTable"),
                                  (1, e_tab, "Dim1 of scales must be equal to dim1 of expertRankTable"),
                                  (2, h, "Dim2 of scales must be equal to dim2 of x")):
            if scales.shape[dim] != want:
                raise _refused("scales", f"[{scales.shape[dim]}]", reason)
    if active_mask is not None:
        for dim, want, reason in ((0, xn, "Dim0 of active_mask must be equal to dim0 of x"),
                                  (1, bs, "Dim1 of active_mask must be equal to dim1 of x")):
            if active_mask.shape[dim] != want:
                raise _refused("active_mask", f"[{active_mask.shape[dim]}]", reason)
    ffn_num = world_size - a
    if ffn_start + ffn_num > world_size:
        raise _invalid("ffn_start_rank_id", ffn_start,
                       f"[0, {a}] (ffn_start_rank_id + ffn_num must not exceed world_size)")

    shared = e_tab - moe_expert_num
    if k1 != k + shared:
        raise KernelError("ffn_token_data_shape", "ffn_token_data_shape[3] must be equal to K + sharedExpertNum")
    if info[2] != 2 + bs * k1:
        raise KernelError("ffn_token_info_table_shape", "ffn_token_info_table_shape[2] is inconsistent with inputs")
    elem = x.dtype.itemsize if quant_mode == 0 else 1
    commu = slot_transfer_bytes(fmt, h)
    if hs * elem < commu:
        raise _refused("ffn_token_data_shape[4]", hs, f"HS * elemSize ({hs * elem} bytes) must be >= per-token "
                       f"payload {commu} bytes (data + quant scale pad), otherwise the win slot overflows")
    data_region = align512(a * m * bs * k1 * hs * elem)
    f2a_return = m * bs * k1 * hs * 2
    if data_region < f2a_return:
        raise _refused("ffn_token_data_shape", a, f"attentionWorkerNum={a} with elemSize={elem} leaves a data "
                       f"region of {data_region} bytes that cannot host the ffn_to_attention_v2 return data of "
                       f"{f2a_return} bytes")
    if ccl_buffer_size is not None:
        _check_ccl_buffer_size_950(int(ccl_buffer_size), a, m, info[2], bs, k1, hs, elem, commu)
    if not 0 <= int(rank) < world_size:
        raise KernelError("rank", f"must be in [0, world_size={world_size}), got {rank}")
    return dict(group=group, x=x, session_id=session_id, micro_batch_id=micro_batch_id, layer_id=layer_id,
                expert_ids=expert_ids, table=table, scales=scales, active_mask=active_mask, bs=bs, h=h, k=k, a=a,
                m=m, info_ints=info[2], k1=k1, hs=hs, attn_m=attn[0], shared=shared, moe_expert_num=moe_expert_num,
                ffn_start=ffn_start, ffn_num=ffn_num, n_layers=n_layers, mtab=m_tab, itemsize=elem,
                world_size=world_size, generation="950", row_format=fmt)


def _check_ccl_buffer_size_950(ccl: int, a: int, m: int, info_ints: int, bs: int, k1: int, hs: int, elem: int,
                               commu: int) -> None:
    """The window size the V2 tiling requires: the base tiling's (token info + data, in whole MB + 1), then the
    URMA layout's (info, data, compact staging, flag staging)."""
    if ccl <= 0:
        raise _invalid("ccl_buffer_size", ccl, "greater than 0")
    least = ((a * m * info_ints * 4 + a * m * bs * k1 * hs * elem) // MIB + 1) * MIB
    if ccl < least:
        raise _refused("ccl_buffer_size", ccl, f"should >= {least} bytes (token_info + token_data)")
    required = (align512(a * m * info_ints * 4) + align512(a * m * bs * k1 * hs * elem)
                + align512(bs * k1 * align32(commu)) + (bs * k1 + 1) * 32)
    if ccl < required:
        raise _refused("ccl_buffer_size", ccl, f"should >= {required} bytes (token info + token data + compact "
                       "staging + URMA flag staging area); use get_buffer_for_attention_to_ffn to compute it")


def attention_to_ffn(x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, scales=None,
                     active_mask=None, *, group, world_size: int, ffn_token_info_table_shape, ffn_token_data_shape,
                     attn_token_info_table_shape, moe_expert_num: int, quant_mode: int = 0, sync_flag: int = 0,
                     ffn_start_rank_id: int = 0, rank: int, idle: Idle = sched_yield, generation: str = "A3",
                     ccl_buffer_size: int | None = None) -> dict:
    """Dispatch x (1, BS, H) of (session_id, micro_batch_id) to the FFN windows; `rank` is the caller's own rank.
    Returns what was sent: session, micro_batch, layer, routes (the FFN rank of each (token, k) slot sent,
    (curBs, K+1)) and headers (the FFN ranks that got the record header).

    Per token t and slot k (K routed from expert_ids, then the shared experts moe_expert_num + (k - K)):
    the expert's table row [count, rank_0, local_0, rank_1, local_1, ...] picks replica session_id % count.
    Per destination FFN rank: wait while its record (session, mb) header flag == 1 (backpressure, idle(waiting)
    between reads; the idle hook may raise to give up), write the token data rows, then the local expert ids
    into record slots 2 + t*(K+1) + k. Then the headers {layer_id, then flag = 1}: sync_flag 0 to every FFN
    rank, 1 only to ranks that got a token; then notify each of them.

    FFN ranks are [ffn_start_rank_id, ffn_start_rank_id + world_size - A) with A = ffn_token_data_shape[0]:
    the group holds the A attention ranks plus the FFN ranks (the real tiling's derivation is not in the
    sources; this one covers every FFN rank whether or not the table names it). The table must satisfy
    1 < Mtab <= 2*ffn_num + 1 and every rank it names must be an FFN rank. With L > 1 tables, layer
    layer_id's table is used (the real op supports L = 1 only).
    active_mask (1, BS) bool, trues first: only the first curBs tokens are sent, and the flags of tokens
    [curBs, BS) of micro_batch_id in the caller's own attention window are pre-set to 1 (before any send).
    quant_mode 2 sends int8 rows with the fp32 dequant scale at byte align32(H) (smooth scales from `scales`
    (L, E, H) multiply the row first); HS is then in bytes and must hold align32(H) + 4.
    Hardware limits (BS <= 512, H in [1024, 8192], K <= 16, moe_expert_num <= 1024) only in strict mode.

    generation "950" is AttentionToFfn V2 (_send_950): other checks, no backpressure, a count-based mask,
    several layers, any rank of the group as a destination, MX payloads, and the caller's own attention flags
    cleared and pre-set after the sends.
    """
    c = check_attention_to_ffn_host(
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, scales, active_mask, group=group,
        world_size=world_size, ffn_token_info_table_shape=ffn_token_info_table_shape,
        ffn_token_data_shape=ffn_token_data_shape, attn_token_info_table_shape=attn_token_info_table_shape,
        moe_expert_num=moe_expert_num, quant_mode=quant_mode, sync_flag=sync_flag,
        ffn_start_rank_id=ffn_start_rank_id, rank=rank, generation=generation, ccl_buffer_size=ccl_buffer_size)
    if c["generation"] == "950":
        return _send_950(c, int(rank), quant_mode, sync_flag)
    group, x, table, scales, active_mask = c["group"], c["x"], c["table"], c["scales"], c["active_mask"]
    session_id, micro_batch_id, layer_id, expert_ids = (c["session_id"], c["micro_batch_id"], c["layer_id"],
                                                        c["expert_ids"])
    bs, h, k, a, m, info_ints, k1, hs = (c[n] for n in ("bs", "h", "k", "a", "m", "info_ints", "k1", "hs"))
    shared, moe_expert_num, ffn_start, ffn_num = (c[n] for n in ("shared", "moe_expert_num", "ffn_start", "ffn_num"))
    n_layers, mtab, itemsize, world_size = (c[n] for n in ("n_layers", "mtab", "itemsize", "world_size"))
    attn_m = c["attn_m"]

    # Kernel-side values (the real kernel trusts them; here a bad one is an error, not a stray write).
    s, mb, lid = int(session_id[0]), int(micro_batch_id[0]), int(layer_id[0])
    _scalar_in_range("session_id", s, 0, a)
    _scalar_in_range("micro_batch_id", mb, 0, min(m, attn_m))
    _scalar_in_range("layer_id", lid, 0, n_layers if n_layers > 1 else 1 << 31)
    layer_table = table[lid if n_layers > 1 else 0]
    cur_bs = bs
    if active_mask is not None:
        if active_mask.shape != (1, bs):
            raise KernelError("active_mask", f"shape must be (1, BS={bs}), got {active_mask.shape}")
        cur_bs = int(np.count_nonzero(active_mask[0]))
        if not active_mask[0, :cur_bs].all():
            raise KernelError("active_mask", "true entries must come before false ones")
    record_slot = (s * m + mb) * bs * k1  # the first slot of this (session, mb) record in the data region
    dst, local, tok, info_index, slots = _routes(expert_ids[0, :cur_bs], layer_table, s, moe_expert_num, shared,
                                                 ffn_start, ffn_start + ffn_num, record_slot)

    # Active mask: our own attention flags of the padded tokens will never be written back, so pre-set them.
    if cur_bs < bs:
        first = (mb * bs + cur_bs) * k1
        group.window(int(rank)).put_i32(0, np.arange(first, first + (bs - cur_bs) * k1), VALID_FLAG)

    # Payload per (token, k): plain rows, or int8 + scale (per expert when smooth scales are given).
    src, per_token = _payload(x[0, :cur_bs], tok, expert_ids[0, :cur_bs], moe_expert_num, shared, scales,
                              lid if n_layers > 1 else 0, quant_mode, "A3")
    record_bytes = 4 * info_ints
    record = (s * m + mb) * record_bytes
    data_offset = align512(a * m * info_ints * 4)
    stride = hs * itemsize
    got = _write_slots(group, dst, world_size, data_offset, stride, slots, src, tok if per_token else None, record,
                       info_index, local, before=lambda win, r: _wait_consumed(win, record, r, s, mb, idle))
    targets = sorted(got) if sync_flag == 1 else list(range(ffn_start, ffn_start + ffn_num))
    _write_headers(group, targets, record, lid)
    for r in targets:
        group.notify(r)
    log.debug("session %d mb %d layer %d: %d slots to %d FFN ranks, headers to %s", s, mb, lid, slots.size,
              len(got), targets)
    return {"session": s, "micro_batch": mb, "layer": lid, "routes": dst.reshape(cur_bs, k1), "headers": targets}


def _send_950(c: dict, rank: int, quant_mode: int, sync_flag: int) -> dict:
    """AttentionToFfnV2's kernel (attention_to_ffn_urma.h). c = the token count of active_mask (a count, not
    positions: a mask that is not a prefix sends the first c tokens), else BS. Per slot of the first c tokens,
    payload then slot word := localExp, grouped per destination rank (the kernel's relay: a rank's data writes,
    then its flag writes); then the caller's own attention flags [mb][0 : c*(K+S)] := 0; then the header
    [1, layer_id] of record (session, mb), sync_flag 1: to the FFN ranks that received a slot, 0: to every FFN rank
    in [ffn_start_rank_id, ffn_start_rank_id + world_size - A); then, with a mask, own flags [mb][c*(K+S) : BS*(K+S)]
    := 1. No backpressure: the V2 kernel writes without waiting for the FFN side to consume the record [open: none
    was found in the sources; V1 spins while the header flag is 1]. layer_id picks table[layer_id] and
    scales[layer_id] (L >= 1)."""
    group, x, table, scales, mask = c["group"], c["x"], c["table"], c["scales"], c["active_mask"]
    bs, a, m, info_ints, k1, hs = (c[n] for n in ("bs", "a", "m", "info_ints", "k1", "hs"))
    shared, moe_expert_num, ffn_start, ffn_num = (c[n] for n in ("shared", "moe_expert_num", "ffn_start", "ffn_num"))
    n_layers, world_size = c["n_layers"], c["world_size"]
    s, mb, lid = int(c["session_id"][0]), int(c["micro_batch_id"][0]), int(c["layer_id"][0])
    # The kernel trusts session and micro-batch ids (a bad one writes another record); afd-sim refuses them.
    _scalar_in_range("session_id", s, 0, a)
    _scalar_in_range("micro_batch_id", mb, 0, m)
    if not 0 <= lid < n_layers:
        raise KernelError("layer_id", f"layerId {lid & 0xFFFFFFFF} must be less than L {n_layers}")
    cur_bs = bs if mask is None else int(np.count_nonzero(mask[0]))
    record_slot = (s * m + mb) * bs * k1
    routed = c["expert_ids"][0, :cur_bs]
    dst, local, tok, info_index, slots = _routes(routed, table[lid], s, moe_expert_num, shared, 0, world_size,
                                                 record_slot, layer=lid)
    src, per_token = _payload(x[0, :cur_bs], tok, routed, moe_expert_num, shared, scales, lid, quant_mode, "950")
    record = (s * m + mb) * 4 * info_ints
    data_offset = align512(a * m * info_ints * 4)
    stride = hs * c["itemsize"]
    got = _write_slots(group, dst, world_size, data_offset, stride, slots, src, tok if per_token else None, record,
                       info_index, local)
    own = group.window(rank)
    first = mb * bs * k1
    own.put_i32(0, np.arange(first, first + cur_bs * k1), INVALID_FLAG)
    ffn_ranks = range(ffn_start, ffn_start + ffn_num)
    targets = [r for r in ffn_ranks if r in got] if sync_flag == 1 else list(ffn_ranks)
    _write_headers(group, targets, record, lid)
    if mask is not None:
        own.put_i32(0, np.arange(first + cur_bs * k1, first + bs * k1), VALID_FLAG)
    for r in targets:
        group.notify(r)
    log.debug("950: session %d mb %d layer %d: %d slots to %d ranks, headers to %s", s, mb, lid, slots.size,
              len(got), targets)
    return {"session": s, "micro_batch": mb, "layer": lid, "routes": dst.reshape(cur_bs, k1), "headers": targets}


def _write_slots(group, dst, world_size: int, data_offset: int, stride: int, slots, src, token_of, record: int,
                 info_index, local, before=None) -> set[int]:
    """Every slot's payload, then its slot word (the local expert id), grouped per destination rank (the kernel's
    relay: a rank's data writes, then its word writes); before(win, rank) runs first per rank (A3's backpressure).
    src holds a row per token (token_of maps a slot to it) or per slot (token_of None). Returns the ranks written."""
    order, bounds = comm.by_rank(dst, world_size)
    for r, lo, hi in bounds:
        sel = order[lo:hi]
        win = group.window(r)
        if before is not None:
            before(win, r)
        rows = token_of[sel] if token_of is not None else sel
        # each row copied once, no temporary; streaming stores: the FFN rank reads them from another core
        comm.put_rows_of(win, data_offset, stride, slots[sel], src, rows, streaming=True)
        win.put_i32(record + 8, info_index[sel], local[sel])
    return {r for r, _, _ in bounds}


def _write_headers(group, targets, record: int, layer: int) -> None:
    """The record header [flag = 1, layer_id] on each target rank, after every data write (the kernel's SyncAll).
    The kernel writes it as one 8-byte put; the layer goes first here, so a reader that sees the flag sees it."""
    for r in targets:
        win = group.window(r)
        win.put_i32(record + 4, np.zeros(1, np.int64), layer)
        win.put_i32(record, np.zeros(1, np.int64), VALID_FLAG)


def _routes(routed: np.ndarray, layer_table: np.ndarray, session: int, moe_expert_num: int, shared: int,
            rank_lo: int, rank_hi: int, record_slot: int, layer: int | None = None):
    """Per (token, k) slot, token-major: its destination rank in [rank_lo, rank_hi), local expert id, token, index
    in the record's id list (t*(K+1) + k) and slot in the data region; one compiled pass, the numpy checks naming
    a bad value otherwise. layer given: the V2 rules (_routes_950), which the compiled pass covers but for routed
    ids in [moe_expert_num, E_tab) (V2 accepts them: they pick a shared expert's row)."""
    from ._kernels import a2f_routes
    cur_bs, k = routed.shape
    n = cur_bs * (k + shared)
    dst, tok, info_index, slots = (np.empty(n, np.int64) for _ in range(4))
    local = np.empty(n, np.int32)
    status = a2f_routes(np.ascontiguousarray(routed, np.int32), np.ascontiguousarray(layer_table, np.int32),
                        session, moe_expert_num, shared, rank_lo, rank_hi, record_slot, dst, local, tok,
                        info_index, slots)
    if status and layer is not None:
        return _routes_950(routed, layer_table, session, moe_expert_num, shared, rank_hi, record_slot, layer)
    if status:
        _check_routes(routed, layer_table, session, moe_expert_num, shared, rank_lo, rank_hi - rank_lo)
        raise KernelError("expert_rank_table", f"route check {status} failed")  # (the checks above name it first)
    return dst, local, tok, info_index, slots


def _check_routes(routed, layer_table, session, moe_expert_num, shared, ffn_start, ffn_num) -> None:
    """The routes' value checks in numpy, for the message: ids, the replica counts, then the ranks they pick."""
    routed = routed.astype(np.int64)
    _in_range("expert_ids", routed, 0, moe_expert_num)
    experts = np.concatenate([routed, np.broadcast_to(moe_expert_num + np.arange(shared),
                                                      (routed.shape[0], shared))], axis=1)
    rows = layer_table[experts]  # (curBs, K+1, Mtab)
    count = rows[..., 0].astype(np.int64)
    _in_range("expert_rank_table", count, 1, (layer_table.shape[1] - 1) // 2 + 1)  # the replica count column
    dst = np.take_along_axis(rows, (1 + 2 * (session % count))[..., None], axis=2)[..., 0].astype(np.int64)
    _in_range("expert_rank_table", dst, ffn_start, ffn_start + ffn_num)


def _routes_950(routed, layer_table, session, moe_expert_num, shared, world_size, record_slot, layer):
    """AttentionToFfnV2's routes in numpy, with its kernel asserts as errors: routed ids in [0, E_tab), a replica
    count with 2*rankCnt + 1 <= M_tab, ranks in [0, world_size). rankCnt = 0 is refused: the kernel keeps the
    previous slot's route for it (undefined)."""
    e_tab, m_tab = layer_table.shape
    ids = routed.astype(np.int64)
    bad = (ids < 0) | (ids >= e_tab)
    if bad.any():
        raise KernelError("expert_ids", f"expertId {int(ids[bad][0])} must be in [0, expertNum {e_tab})")
    experts = np.concatenate([ids, np.broadcast_to(moe_expert_num + np.arange(shared), (ids.shape[0], shared))],
                             axis=1)
    rows = layer_table[experts].astype(np.int64)  # (curBs, K+S, Mtab)
    count = rows[..., 0]
    if (count == 0).any():
        raise KernelError("expert_rank_table", f"layer {layer} expert {int(experts[count == 0][0])} has rankCnt 0: "
                                               "no replica to send to (the kernel would reuse another slot's route)")
    over = (count & 0xFFFFFFFF) * 2 + 1 > m_tab  # (the kernel reads rankCnt as uint32)
    if over.any():
        raise KernelError("expert_rank_table", f"rankCnt {int(count[over][0]) & 0xFFFFFFFF} exceeds "
                                               f"expert_rank_table row capacity M {m_tab}")
    column = (1 + 2 * (session % count))[..., None]
    dst = np.take_along_axis(rows, column, axis=2)[..., 0].reshape(-1)
    bad = (dst < 0) | (dst >= world_size)
    if bad.any():
        raise KernelError("expert_rank_table", f"rankId {int(dst[bad][0])} must be in [0, worldSize {world_size})")
    local = np.take_along_axis(rows, column + 1, axis=2)[..., 0].reshape(-1).astype(np.int32)
    info_index = np.arange(dst.size, dtype=np.int64)
    return dst, local, info_index // experts.shape[1], info_index, record_slot + info_index


def _payload(x_rows: np.ndarray, tok: np.ndarray, routed: np.ndarray, moe_expert_num: int, shared: int, scales,
             layer: int, quant_mode: int, generation: str) -> tuple[np.ndarray, bool]:
    """The slot rows (afd.tokens.encode_rows) and whether they are per token (index them by tok) or per (token, k)
    slot: per slot when smooth scales (per destination expert) are given, else one row per token shared by its
    K+1 slots (the same bytes the kernel computes per slot)."""
    if quant_mode == 0 or tok.size == 0:
        return x_rows, True  # the x rows themselves: each copied once, straight from x (or no slot at all)
    if scales is None:
        return tokens.encode_rows(x_rows, quant_mode, generation), True
    experts = np.empty((routed.shape[0], routed.shape[1] + shared), np.int64)
    experts[:, :routed.shape[1]] = routed
    experts[:, routed.shape[1]:] = moe_expert_num + np.arange(shared)
    return tokens.encode_rows(x_rows[tok], quant_mode, generation, smooth=scales[layer, experts.reshape(-1)]), False


def _wait_consumed(win, record: int, rank: int, session: int, mb: int, idle: Idle) -> None:
    """Backpressure: the FFN side has not consumed this (session, mb) record while its header flag is 1."""
    if win.get_i32(record, 1)[0] != VALID_FLAG:
        return
    waiting = Waiting("attention_to_ffn", f"FFN rank {rank} record (session {session}, mb {mb}) header flag != 1",
                      mb, needed=1)
    while win.get_i32(record, 1)[0] == VALID_FLAG:  # get_i32 reads local and remote windows alike
        waiting.iterations += 1
        idle(waiting)


def get_attention_to_ffn_ccl_buffer_size(ffn_token_info_table_shape, ffn_token_data_shape, quant_mode) -> int:
    """The window bytes an AttentionToFfn V2 buffer asks for (cann_ops_transformer's C++ helper of the same name):
    info, data and the compact staging (one align32(HS*b) slot per token), each 512-aligned, plus one 32-byte flag
    slot per token and one more, rounded up to 2 MiB; b = 2 bytes per element for quant_mode 0, else 1 (an fp4 HS
    counts bytes). Raises RuntimeError with the helper's TORCH_CHECK text for a list of the wrong length."""
    info, data = list(ffn_token_info_table_shape), list(ffn_token_data_shape)
    if len(info) != 3:
        raise RuntimeError(f"ffn_token_info_table_shape should have 3 elements, but got {len(info)}")
    if len(data) != 5:
        raise RuntimeError(f"ffn_token_data_shape should have 5 elements, but got {len(data)}")
    a, m, bs, k1, hs = (int(v) for v in data)
    b = 2 if int(quant_mode) == 0 else 1
    needed = (ceil_align(a * m * int(info[2]) * 4, 512) + ceil_align(a * m * bs * k1 * hs * b, 512)
              + ceil_align(bs * k1 * ceil_align(hs * b, 32), 512) + (bs * k1 + 1) * 32)
    return ceil_align(needed, 2 * MIB)


def ceil_align(value: int, align: int) -> int:
    """C's (value + align - 1) / align * align, its division truncating toward zero (as the C++ helpers compute)."""
    n = value + align - 1
    return (n // align if n >= 0 else -(-n // align)) * align
