"""FFNToAttention: write each FFN output row into its (micro-batch, token, k) slot of an attention window, then its flag."""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np

from .. import comm
from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from ..layout import VALID_FLAG, align512
from . import _limits

log = logging.getLogger("afd.ops.ffn_to_attention")

X_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_IDS = ("session_ids", "micro_batch_ids", "token_ids", "expert_offsets")


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
                                token_data_shape, attn_rank_table) -> tuple[int, int, int, int, int]:
    """The aclnn and tiling checks (dtypes, shapes, attributes: nothing in device memory); returns
    (Y, M, BS, K+1, HS)."""
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
    if attn_rank_table is not None:
        if attn_rank_table.ndim != 1 or not 1 <= attn_rank_table.shape[0] <= world_size - 1:
            raise KernelError("attn_rank_table", f"must be 1-D with length in [1, world_size-1={world_size - 1}], "
                                                 f"got shape {attn_rank_table.shape}")
    if h > hs:  # a row wider than its slot would overwrite the next slot
        raise KernelError("x", f"H={h} must be <= HS=token_data_shape[3]={hs}")
    if _limits.strict():
        if not 1024 <= h <= 8192:
            raise KernelError("x", f"H={h} must be in [1024, 8192] (strict A3 limit)")
        if not 1024 <= hs <= 8192 + 128:
            raise KernelError("token_data_shape", f"HS={hs} must be in [1024, 8320] (strict A3 limit)")
        if not 1 <= bs <= 512:
            raise KernelError("token_data_shape", f"BS={bs} must be in [1, 512] (strict A3 limit)")
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


def check_ffn_to_attention(x, ids: dict, actual_token_num, group, world_size, token_info_table_shape,
                           token_data_shape, attn_rank_table):
    """The host checks, then the (sim-only) kernel-side checks of the values; returns
    (n, M, BS, K1, HS, dst ranks, slots)."""
    y_cap, m, bs, k1, hs = check_ffn_to_attention_host(x, ids, actual_token_num, group, world_size,
                                                       token_info_table_shape, token_data_shape, attn_rank_table)
    world_size = int(world_size)
    # Kernel side: the real kernel trusts these; out-of-range ids would scribble over other slots.
    n = int(actual_token_num[0])
    if not 0 <= n <= y_cap:
        raise KernelError("actual_token_num", f"must be in [0, Y={y_cap}], got {n}")
    from ._kernels import f2a_slots  # every check and the destinations in one pass; numpy's below names a bad one
    dst, slots = np.empty(n, np.int64), np.empty(n, np.int64)
    table = np.empty(0, np.int32) if attn_rank_table is None else np.ascontiguousarray(attn_rank_table, np.int32)
    if f2a_slots(*(np.ascontiguousarray(ids[name][:n], np.int32) for name in _IDS), table, m, bs, k1, world_size,
                 dst, slots) == 0:
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


def ffn_to_attention(x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num, group,
                     world_size: int, token_info_table_shape, token_data_shape, attn_rank_table=None) -> dict:
    """Send rows [0, actual_token_num) of x to their attention ranks: slot data first, then slot flag = 1.
    Returns {attention rank: [micro-batch ids it got rows of]}.

    group is an afd.comm.Group or a registered group name. The window of attention rank r is
    [flags int32 [M, BS, K+1] | pad to 512 | data [M, BS, K+1, HS] of x's dtype]; H = x.shape[1] elements are
    written per slot, the tail up to HS is left alone. There is no backpressure (the real op overwrites blindly).
    Rows are grouped per destination rank: all data puts, then all flag puts, then a notify, per rank.
    Hardware limits (H, HS, BS, K ranges, M == 1, the HCCL window size) are enforced only in strict mode.
    """
    group = comm.resolve(group)
    x = None if x is None else np.asarray(x)
    ids = {name: None if v is None else np.asarray(v)
           for name, v in zip(_IDS, (session_ids, micro_batch_ids, token_ids, expert_offsets))}
    actual_token_num = None if actual_token_num is None else np.asarray(actual_token_num)
    table = None if attn_rank_table is None else np.asarray(attn_rank_table)
    n, m, bs, k1, hs, dst, slots = check_ffn_to_attention(x, ids, actual_token_num, group, world_size,
                                                          token_info_table_shape, token_data_shape, table)
    sent: dict[int, list[int]] = {}
    if n == 0:
        return sent
    info_bytes = align512(m * bs * k1 * 4)
    stride = hs * x.dtype.itemsize
    order, bounds = comm.by_rank(dst, int(world_size))  # keeps row order within a destination
    for rank, lo, hi in bounds:
        rows = order[lo:hi]
        win = group.window(rank)
        # each row copied once, no temporary; streaming stores: the combine reads these rows only after the whole
        # batch and its flags, and the FFN side is the one a pipeline waits on
        comm.put_rows_of(win, info_bytes, stride, slots[rows], x, rows, streaming=True)
        win.put_i32(0, slots[rows], VALID_FLAG)  # after the data: a reader that sees the flag sees the slot
        group.notify(rank)
        sent[rank] = np.flatnonzero(np.bincount(slots[rows] // (bs * k1), minlength=m)).tolist()
        log.debug("sent %d rows to attention rank %d", rows.size, rank)
    return sent
