"""FFNToAttention: write each FFN output row into its (micro-batch, token, k) slot of an attention window, then its flag."""
from __future__ import annotations

import logging

import numpy as np

from .. import comm
from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import INVALID_FLAG, VALID_FLAG, align512
from ..tokens import X_DTYPES, check_generation
from . import _limits
from .attention_to_ffn import MIB, ceil_align

log = logging.getLogger("afd.ops.ffn_to_attention")

_IDS = ("session_ids", "micro_batch_ids", "token_ids", "expert_offsets")
EXPERT_NUM_PER_TOKEN_MAX = 256  # V2's K+1 bound (keeps M*BS*(K+1)*HS inside uint64)
AIV_RESERVE_COUNT = 1024  # the buffer-size helper's reserve of per-core flag slots and count rows


def _shape(name: str, value, length: int) -> tuple[int, ...]:
    shape = tuple(int(v) for v in value)
    if len(shape) != length:
        raise KernelError(name, f"must have {length} entries, got {list(shape)}")
    if any(v <= 0 for v in shape):
        raise KernelError(name, f"every entry must be > 0, got {list(shape)}")
    return shape


def _in_range(name: str, values: np.ndarray, lo: int, hi: int) -> None:
    if values.size and (int(values.min()) < lo or int(values.max()) >= hi):
        bad = values[(values < lo) | (values >= hi)][0]
        raise KernelError(name, f"values must be in [{lo}, {hi}), found {int(bad)}")


def check_ffn_to_attention_host(x, ids: dict, actual_token_num, group, world_size, token_info_table_shape,
                                token_data_shape, attn_rank_table, generation: str = "A3",
                                ccl_buffer_size: int | None = None) -> tuple[int, int, int, int, int]:
    """The aclnn and tiling checks (dtypes, shapes, attributes: nothing in device memory); returns
    (Y, M, BS, K+1, HS). generation "950" (FFNToAttentionV2's tiling): M >= 1, K+1 in [1, 256] always, the
    attn_rank_table length in [1, world_size) and H <= HS with V2's messages; BS, H and HS ranges in strict mode
    as on A3 (there is no M == 1 and no HCCL_BUFFSIZE rule on 950: its window is the caller's). ccl_buffer_size
    (950, the buffer's) must be > 0; the real tiling also fits its layout into it with the device's core count
    and, without a table, derives A from it: not reproduced (a CPU twin has no core count to be faithful to)."""
    check_generation(generation)
    if ccl_buffer_size is not None and int(ccl_buffer_size) <= 0:
        raise KernelError("ccl_buffer_size", f"actual {ccl_buffer_size}, expected greater than 0")
    for name, value in (("x", x), *ids.items(), ("actual_token_num", actual_token_num)):
        if value is None:
            raise AclnnError(name, "must not be null", ACLNN_ERR_PARAM_NULLPTR)
    if x.dtype not in X_DTYPES:
        raise AclnnError("x", f"dtype must be float16 or bfloat16, got {x.dtype}", ACLNN_ERR_PARAM_INVALID)
    for name, value in ids.items():
        if value.dtype != np.int32:
            raise AclnnError(name, f"dtype must be int32, got {value.dtype}", ACLNN_ERR_PARAM_INVALID)
    if actual_token_num.dtype != np.int64:
        raise AclnnError("actual_token_num", f"dtype must be int64, got {actual_token_num.dtype}",
                         ACLNN_ERR_PARAM_INVALID)
    if attn_rank_table is not None and attn_rank_table.dtype != np.int32:
        raise AclnnError("attn_rank_table", f"dtype must be int32, got {attn_rank_table.dtype}",
                         ACLNN_ERR_PARAM_INVALID)
    # Tiling checks.
    if x.ndim != 2:
        raise KernelError("x", f"must be 2-D (Y, H), got shape {x.shape}")
    y_cap, h = x.shape
    for name, value in ids.items():
        if value.ndim != 1 or value.shape[0] != y_cap:
            raise KernelError(name, f"must be 1-D with dim0 equal to x's Y={y_cap}, got shape {value.shape}")
    if actual_token_num.ndim != 1 or actual_token_num.shape[0] != 1:
        raise KernelError("actual_token_num", f"must have shape (1,), got {actual_token_num.shape}")
    info_shape = _shape("token_info_table_shape", token_info_table_shape, 3)
    data_shape = _shape("token_data_shape", token_data_shape, 4)
    if info_shape != data_shape[:3]:
        raise KernelError("token_info_table_shape",
                          f"{list(info_shape)} must equal token_data_shape[0:3] {list(data_shape[:3])}")
    m, bs, k1, hs = data_shape
    world_size = int(world_size)
    if not 2 <= world_size <= 768:
        raise KernelError("world_size", f"must be in [2, 768], got {world_size}")
    if group.world_size != world_size:
        raise KernelError("world_size", f"is {world_size} but group {group.name!r} has {group.world_size} ranks")
    if not 1 <= len(group.name) < 128:
        raise KernelError("group", f"name length must be in [1, 128), got {len(group.name)}")
    if generation == "950":
        _check_tiling_950(attn_rank_table, world_size, h, bs, k1, hs)
        return y_cap, m, bs, k1, hs
    if attn_rank_table is not None:
        if attn_rank_table.ndim != 1 or not 1 <= attn_rank_table.shape[0] <= world_size - 1:
            raise KernelError("attn_rank_table", f"must be 1-D with length in [1, world_size-1={world_size - 1}], "
                                                 f"got shape {attn_rank_table.shape}")
    if h > hs:  # a row wider than its slot would overwrite the next slot
        raise KernelError("x", f"H={h} must be <= HS=token_data_shape[3]={hs}")
    if _limits.strict():
        _check_strict_ranges(h, hs, bs, "A3")
        if not 1 <= k1 - 1 <= 16:
            raise KernelError("token_data_shape", f"K={k1 - 1} (K+1={k1}, one shared expert) must be in (0, 16] "
                                                  "(strict A3 limit)")
        if m != 1:
            raise KernelError("token_info_table_shape", f"M={m} must be 1 on A3 (strict A3 limit)")
        need, have = _limits.hccl_window_mb_needed(m, bs, k1, hs, x.dtype.itemsize), _limits.hccl_buffsize_mb()
        if need > have:
            raise KernelError("token_data_shape", f"needs a {need} MB HCCL window "
                                                  f"((M*BS*(K+1)*HS*2 + M*BS*(K+1)*4)//MiB + 1), "
                                                  f"HCCL_BUFFSIZE is {have} MB (strict A3 limit)")
    return y_cap, m, bs, k1, hs


def _check_strict_ranges(h: int, hs: int, bs: int, generation: str) -> None:
    """The H, HS and BS ranges both generations' tilings enforce (afd-sim: in strict mode only), in each
    generation's wording and order (V2's base tiling checks BS and HS, then x: "actual ..., expected ...")."""
    checks = ((not 1024 <= h <= 8192, "x", "H", h, "[1024, 8192]"),
              (not 1024 <= hs <= 8192 + 128, "token_data_shape", "HS", hs, "[1024, 8320]"),
              (not 1 <= bs <= 512, "token_data_shape", "BS", bs, "[1, 512]"))
    for bad, field, name, value, expected in checks if generation == "A3" else checks[::-1]:
        if bad and generation == "A3":
            raise KernelError(field, f"{name}={value} must be in {expected} (strict A3 limit)")
        if bad:
            raise KernelError(field, f"actual {'dim1' if name == 'H' else name}={value}, expected {expected} "
                                     "(strict limit)")


def _check_tiling_950(attn_rank_table, world_size: int, h: int, bs: int, k1: int, hs: int) -> None:
    """FFNToAttentionV2's own tiling rules (ffn_to_attention_v2_tilling.cpp and the base tiling's multi-micro-batch
    branch), past the checks both generations share."""
    if not 1 <= k1 <= EXPERT_NUM_PER_TOKEN_MAX:
        raise KernelError("token_info_table_shape", f"actual dim2={k1}, expected [1, {EXPERT_NUM_PER_TOKEN_MAX}]")
    if _limits.strict():
        _check_strict_ranges(h, hs, bs, "950")
    if attn_rank_table is not None:
        if attn_rank_table.ndim != 1:
            raise KernelError("attn_rank_table", f"actual {attn_rank_table.ndim}D, expected 1D")
        a = attn_rank_table.shape[0]
        if a > world_size - 1:  # (the base tiling's rule, before V2's own)
            raise KernelError("attn_rank_table", f"actual dim0={a}, expected dim0 <= {world_size - 1}")
        if a < 1:
            raise KernelError("attn_rank_table", f"actual {a}, reason: dim0 in [1, worldSize={world_size}) matching "
                                                 "attention_to_ffn_v2's attentionWorkerNum")
    if h > hs:
        raise KernelError("token_data_shape", "token_data_shape HS must be greater than or equal to x H")


def check_ffn_to_attention(x, ids: dict, actual_token_num, group, world_size, token_info_table_shape,
                           token_data_shape, attn_rank_table, generation: str = "A3",
                           ccl_buffer_size: int | None = None):
    """The host checks, then the (sim-only) kernel-side checks of the values; returns
    (n, M, BS, K1, HS, dst ranks, slots)."""
    y_cap, m, bs, k1, hs = check_ffn_to_attention_host(x, ids, actual_token_num, group, world_size,
                                                       token_info_table_shape, token_data_shape, attn_rank_table,
                                                       generation, ccl_buffer_size)
    world_size = int(world_size)
    # Kernel side: the real kernel trusts these; out-of-range ids would scribble over other slots.
    n = int(actual_token_num[0])
    if generation == "950" and n < 0:
        raise KernelError("actual_token_num", f"actualTokenNum must be non-negative, actualTokenNumValue={n}")
    if generation == "950" and n > y_cap:
        raise KernelError("actual_token_num", f"actualTokenNum exceeds x dim0, actualTokenNum={n}, "
                                              f"maxTokenNum={y_cap}")
    if not 0 <= n <= y_cap:
        raise KernelError("actual_token_num", f"must be in [0, Y={y_cap}], got {n}")
    from ._kernels import f2a_slots  # every check and the destinations in one pass; numpy's below names a bad one
    dst, slots = np.empty(n, np.int64), np.empty(n, np.int64)
    table = np.empty(0, np.int32) if attn_rank_table is None else np.ascontiguousarray(attn_rank_table, np.int32)
    if f2a_slots(*(np.ascontiguousarray(ids[name][:n], np.int32) for name in _IDS), table, m, bs, k1, world_size,
                 dst, slots) == 0:
        return n, m, bs, k1, hs, dst, slots
    if generation == "950":  # (the compiled pass is stricter than V2: it checks every id, and the whole table)
        dst, slots = _slots_950(ids, n, attn_rank_table, m, bs, k1, world_size)
        return n, m, bs, k1, hs, dst, slots
    if attn_rank_table is not None:
        _in_range("attn_rank_table", attn_rank_table, 0, world_size)
    sess, mb, tok, eoff = (ids[name][:n].astype(np.int64) for name in _IDS)
    _in_range("session_ids", sess, 0, attn_rank_table.shape[0] if attn_rank_table is not None else world_size)
    _in_range("micro_batch_ids", mb, 0, m)
    _in_range("token_ids", tok, 0, bs)
    _in_range("expert_offsets", eoff, 0, k1)
    dst = attn_rank_table[sess].astype(np.int64) if attn_rank_table is not None else sess
    slots = (mb * bs + tok) * k1 + eoff
    return n, m, bs, k1, hs, dst, slots


def _slots_950(ids: dict, n: int, attn_rank_table, m: int, bs: int, k1: int, world_size: int):
    """FFNToAttentionV2's destinations with its kernel asserts: with a table the session must be in [0, A') and
    the rank it names in [0, world_size) (only the entries used are read), without one the session is the rank;
    only the flat slot (mb*BS + token)*(K+1) + k must be below M*BS*(K+1) (ids are read as uint32)."""
    sess = ids["session_ids"][:n].astype(np.int64)
    if attn_rank_table is not None:
        a = attn_rank_table.shape[0]
        bad = (sess < 0) | (sess >= a)
        if bad.any():
            raise KernelError("session_ids", f"sessionId out of range, sessionId={int(sess[bad][0])}, axisA={a}")
        dst = attn_rank_table[sess].astype(np.int64)
    else:
        dst = sess
    if ((dst < 0) | (dst >= world_size)).any():
        raise KernelError("attn_rank_table" if attn_rank_table is not None else "session_ids",
                          "attention rank is out of range")
    mb, tok, eoff = (ids[name][:n].astype(np.int64) & 0xFFFFFFFF for name in _IDS[1:])
    slots = (mb * bs + tok) * k1 + eoff
    bad = slots >= m * bs * k1
    if bad.any():
        raise KernelError("token_ids", f"tokenSlot out of range, tokenSlot={int(slots[bad][0])}, "
                                       f"tokenSlotNum={m * bs * k1}")
    return dst, slots


def ffn_to_attention(x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num, group,
                     world_size: int, token_info_table_shape, token_data_shape, attn_rank_table=None, *,
                     generation: str = "A3", ccl_buffer_size: int | None = None) -> dict:
    """Send rows [0, actual_token_num) of x to their attention ranks: slot data first, then slot flag = 1.
    Returns {attention rank: [micro-batch ids it got rows of]}.

    group is an afd.comm.Group or a registered group name. The window of attention rank r is
    [flags int32 [M, BS, K+1] | pad to 512 | data [M, BS, K+1, HS] of x's dtype]; H = x.shape[1] elements are
    written per slot, the tail up to HS is left alone. There is no backpressure (the real op overwrites blindly).
    Rows are grouped per destination rank: all data puts, then all flag puts, then a notify, per rank.
    Hardware limits (H, HS, BS, K ranges, M == 1, the HCCL window size) are enforced only in strict mode.

    generation "950" is FFNToAttention V2: M >= 1 micro-batches, the slot's flag := 0 before its data and := 1
    after (per destination rank: all clears, all rows, all flags), V2's checks (check_ffn_to_attention_host) and
    kernel asserts (only the flat slot must be in range). The same attention-window geometry.
    """
    group = comm.resolve(group)
    x = None if x is None else np.asarray(x)
    ids = {name: None if v is None else np.asarray(v)
           for name, v in zip(_IDS, (session_ids, micro_batch_ids, token_ids, expert_offsets))}
    actual_token_num = None if actual_token_num is None else np.asarray(actual_token_num)
    table = None if attn_rank_table is None else np.asarray(attn_rank_table)
    n, m, bs, k1, hs, dst, slots = check_ffn_to_attention(x, ids, actual_token_num, group, world_size,
                                                          token_info_table_shape, token_data_shape, table, generation,
                                                          ccl_buffer_size)
    sent: dict[int, list[int]] = {}
    if n == 0:
        return sent
    info_bytes = align512(m * bs * k1 * 4)
    stride = hs * x.dtype.itemsize
    order, bounds = comm.by_rank(dst, int(world_size))  # keeps row order within a destination
    for rank, lo, hi in bounds:
        rows = order[lo:hi]
        to = slots[rows]
        win = group.window(rank)
        if generation == "950":  # V2 clears the flag first: a reader sees a fresh 0 -> 1 edge every round
            win.put_i32(0, to, INVALID_FLAG)
        # each row copied once, no temporary; streaming stores: the combine reads these rows only after the whole
        # batch and its flags, and the FFN side is the one a pipeline waits on
        comm.put_rows_of(win, info_bytes, stride, to, x, rows, streaming=True)
        win.put_i32(0, to, VALID_FLAG)  # after the data: a reader that sees the flag sees the slot
        group.notify(rank)
        sent[rank] = np.flatnonzero(np.bincount(to // (bs * k1), minlength=m)).tolist()
        log.debug("sent %d rows to attention rank %d", rows.size, rank)
    return sent


def get_ffn_to_attention_ccl_buffer_size(token_info_table_shape, token_data_shape, world_size) -> int:
    """The window bytes an FFNToAttention V2 buffer asks for (cann_ops_transformer's C++ helper of the same name):
    the A2F receiving area for world_size - 1 workers (info, 2-byte data), 1024 reserved 32-byte flag slots, a
    16-byte address entry per token slot per rank, and 1025 count rows, rounded up to 2 MiB. Raises RuntimeError
    with the helper's TORCH_CHECK texts (list lengths, positive dimensions, info = data[0:3], world_size in
    [1, 1024], int64 overflow)."""
    info, data = list(token_info_table_shape), list(token_data_shape)
    if len(info) != 3:
        raise RuntimeError(f"token_info_table_shape should have 3 elements, but got {len(info)}")
    if len(data) != 4:
        raise RuntimeError(f"token_data_shape should have 4 elements, but got {len(data)}")
    m, bs, k1 = (int(v) for v in info)
    hs, w = int(data[3]), int(world_size)
    if not (m > 0 and bs > 0 and k1 > 0 and hs > 0):
        raise RuntimeError("Token dimensions must be positive")
    if [int(v) for v in data[:3]] != [m, bs, k1]:
        raise RuntimeError("Token info/data dimensions must match")
    if not 0 < w <= 1024:
        raise RuntimeError("Complete window sizing requires world_size in [1, 1024]")
    slots = _mul(_mul(m, bs), k1)
    recv_info = _align(_mul(_mul(_mul(w - 1, m), _add(_mul(bs, k1), 2)), 4), 512)
    recv_data = _align(_mul(_mul(_mul(w - 1, slots), hs), 2), 512)
    raw = _align(_add(_add(recv_info, recv_data), AIV_RESERVE_COUNT * 32), 512)
    rank_table_stride = _align(_mul(_mul(w, slots), 16), 512)
    count_row_stride = _align(_mul(w, 4), 512)
    tables = _add(_mul(w, rank_table_stride), _mul(AIV_RESERVE_COUNT + 1, count_row_stride))
    return _align(_add(raw, tables), 2 * MIB)


_INT64_MAX = (1 << 63) - 1


def _align(value: int, align: int) -> int:
    if not 0 <= value <= _INT64_MAX - (align - 1):
        raise RuntimeError("Buffer alignment overflow")
    return ceil_align(value, align)


def _mul(lhs: int, rhs: int) -> int:
    if lhs < 0 or rhs < 0 or (rhs != 0 and lhs > _INT64_MAX // rhs):
        raise RuntimeError("Buffer size multiplication overflow")
    return lhs * rhs


def _add(lhs: int, rhs: int) -> int:
    if lhs < 0 or rhs < 0 or lhs > _INT64_MAX - rhs:
        raise RuntimeError("Buffer size addition overflow")
    return lhs + rhs
