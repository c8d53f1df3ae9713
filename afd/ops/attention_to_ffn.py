"""AttentionToFFN: send one micro-batch's tokens to the FFN ranks owning their experts, then the record headers."""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np

from .. import comm
from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import VALID_FLAG, align512
from . import _limits
from ._polling import Idle, Waiting, sched_yield

log = logging.getLogger("afd.ops.attention_to_ffn")

X_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def align32(n: int) -> int:
    return (int(n) + 31) // 32 * 32


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
                                rank: int) -> dict:
    """The aclnn and tiling checks of attention_to_ffn (dtypes, shapes, attributes: nothing in device memory).
    Returns the checked arrays and the dimensions the kernel uses."""
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
                mtab=mtab, itemsize=itemsize, world_size=world_size)


def attention_to_ffn(x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, scales=None,
                     active_mask=None, *, group, world_size: int, ffn_token_info_table_shape, ffn_token_data_shape,
                     attn_token_info_table_shape, moe_expert_num: int, quant_mode: int = 0, sync_flag: int = 0,
                     ffn_start_rank_id: int = 0, rank: int, idle: Idle = sched_yield) -> dict:
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
    """
    c = check_attention_to_ffn_host(
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, scales, active_mask, group=group,
        world_size=world_size, ffn_token_info_table_shape=ffn_token_info_table_shape,
        ffn_token_data_shape=ffn_token_data_shape, attn_token_info_table_shape=attn_token_info_table_shape,
        moe_expert_num=moe_expert_num, quant_mode=quant_mode, sync_flag=sync_flag,
        ffn_start_rank_id=ffn_start_rank_id, rank=rank)
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
                                                 ffn_start, ffn_num, record_slot)

    # Active mask: our own attention flags of the padded tokens will never be written back, so pre-set them.
    if cur_bs < bs:
        first = (mb * bs + cur_bs) * k1
        group.window(int(rank)).put_i32(0, np.arange(first, first + (bs - cur_bs) * k1), VALID_FLAG)

    # Payload per (token, k): plain rows, or int8 + scale (per expert when smooth scales are given).
    if quant_mode == 2:
        flat_experts = np.empty((cur_bs, k1), np.int64)
        flat_experts[:, :k] = expert_ids[0, :cur_bs]
        flat_experts[:, k:] = moe_expert_num + np.arange(shared)
        payload = _quant_payload(x[0, :cur_bs], tok, flat_experts.reshape(-1), scales, lid if n_layers > 1 else 0, h)
    else:
        payload = None
    record_bytes = 4 * info_ints
    record = (s * m + mb) * record_bytes
    data_offset = align512(a * m * info_ints * 4)
    stride = hs * itemsize
    order, bounds = comm.by_rank(dst, world_size)
    for r, lo, hi in bounds:
        sel = order[lo:hi]
        win = group.window(r)
        _wait_consumed(win, record, r, s, mb, idle)
        src, rows = (x[0], tok[sel]) if payload is None else (payload, sel)
        # each row copied once, no temporary; streaming stores: the FFN rank reads them from another core
        comm.put_rows_of(win, data_offset, stride, slots[sel], src, rows, streaming=True)
        win.put_i32(record + 8, info_index[sel], local[sel])
    got = {r for r, _, _ in bounds}
    targets = sorted(got) if sync_flag == 1 else list(range(ffn_start, ffn_start + ffn_num))
    for r in targets:  # after every data write (the kernel's SyncAll)
        win = group.window(r)
        win.put_i32(record + 4, np.zeros(1, np.int64), lid)
        win.put_i32(record, np.zeros(1, np.int64), VALID_FLAG)
    for r in targets:
        group.notify(r)
    log.debug("session %d mb %d layer %d: %d slots to %d FFN ranks, headers to %s", s, mb, lid, slots.size,
              len(got), targets)
    return {"session": s, "micro_batch": mb, "layer": lid, "routes": dst.reshape(cur_bs, k1), "headers": targets}


def _routes(routed: np.ndarray, layer_table: np.ndarray, session: int, moe_expert_num: int, shared: int,
            ffn_start: int, ffn_num: int, record_slot: int):
    """Per (token, k) slot, token-major: its FFN rank, local expert id, token, index in the record's id list
    (t*(K+1) + k) and slot in the data region; one compiled pass, the numpy checks naming a bad value otherwise."""
    from ._kernels import a2f_routes
    cur_bs, k = routed.shape
    n = cur_bs * (k + shared)
    dst, tok, info_index, slots = (np.empty(n, np.int64) for _ in range(4))
    local = np.empty(n, np.int32)
    status = a2f_routes(np.ascontiguousarray(routed, np.int32), np.ascontiguousarray(layer_table, np.int32),
                        session, moe_expert_num, shared, ffn_start, ffn_start + ffn_num, record_slot, dst, local, tok,
                        info_index, slots)
    if status:
        _check_routes(routed, layer_table, session, moe_expert_num, shared, ffn_start, ffn_num)
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


def _quant_payload(x_rows: np.ndarray, tok: np.ndarray, experts: np.ndarray, scales, layer: int,
                   h: int) -> np.ndarray:
    """Rows of align32(H) int8 + the fp32 dequant scale, one per (token, k) pair."""
    xf = x_rows.astype(np.float32)
    if scales is None:
        q, dq = quantize_int8(xf)  # one quantisation per token, shared by its K+1 slots
        q, dq = q[tok], dq[tok]
    else:
        q, dq = quantize_int8(xf[tok] * scales[layer, experts])
    hp = align32(h)
    out = np.zeros((tok.size, hp + 4), np.uint8)
    out[:, :h] = q.view(np.uint8)
    out[:, hp:] = dq.astype("<f4").view(np.uint8).reshape(-1, 4)
    return out


def _wait_consumed(win, record: int, rank: int, session: int, mb: int, idle: Idle) -> None:
    """Backpressure: the FFN side has not consumed this (session, mb) record while its header flag is 1."""
    if win.get_i32(record, 1)[0] != VALID_FLAG:
        return
    waiting = Waiting("attention_to_ffn", f"FFN rank {rank} record (session {session}, mb {mb}) header flag != 1",
                      mb, needed=1)
    while win.get_i32(record, 1)[0] == VALID_FLAG:  # get_i32 reads local and remote windows alike
        waiting.iterations += 1
        idle(waiting)
