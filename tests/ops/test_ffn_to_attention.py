"""FFNToAttention: byte offsets of the writes, data before flag, grouping per rank, and the checks."""
import ml_dtypes
import numpy as np
import pytest

from afd import comm
from afd.comm import Group, LocalWindow
from afd.errors import AclnnError, KernelError
from afd.ops import ffn_to_attention, strict_mode
from afd.ops._limits import hccl_window_mb_needed

BF16 = np.dtype(ml_dtypes.bfloat16)




class Recording:
    """A window that records every put (and still performs it)."""

    def __init__(self, inner, log, rank):
        self.inner, self.log, self.rank, self.size = inner, log, rank, inner.size

    def put_rows(self, offset, stride, index, rows):
        self.log.append(("rows", self.rank, offset, stride, list(np.asarray(index))))
        self.inner.put_rows(offset, stride, index, rows)

    def put_i32(self, offset, index, values):
        self.log.append(("i32", self.rank, offset, list(np.asarray(index))))
        self.inner.put_i32(offset, index, values)

    def get_i32(self, offset, count):
        return self.inner.get_i32(offset, count)


def make_group(dev, world_size, size, ranks, log=None, notified=None):
    windows = {}
    for r in ranks:
        win = LocalWindow(dev, dev.malloc(size).address, size)
        windows[r] = Recording(win, log, r) if log is not None else win
    return Group("f2a-test", world_size, windows, notify=None if notified is None else notified.append)


def args(y, h, dtype=np.float16, seed=0, **ids):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((y, h), dtype=np.float32)).astype(dtype)
    base = {k: np.zeros(y, np.int32) for k in ("session_ids", "micro_batch_ids", "token_ids", "expert_offsets")}
    base.update({k: np.asarray(v, np.int32) for k, v in ids.items()})
    return x, base


def test_writes_land_at_the_spec_byte_offsets(dev):
    # M=2, BS=3, K+1=3, HS=80 > H=64: infoBytes = align512(2*3*3*4=72) = 512.
    m, bs, k1, hs, h = 2, 3, 3, 80, 64
    size = 512 + m * bs * k1 * hs * 2
    log, notified = [], []
    group = make_group(dev, 4, size, [0, 1, 2, 3], log, notified)
    x, ids = args(4, h, session_ids=[1, 0, 1, 1], micro_batch_ids=[1, 0, 0, 1], token_ids=[2, 1, 0, 0],
                  expert_offsets=[2, 0, 1, 1])
    ffn_to_attention(x, **ids, actual_token_num=np.array([3], np.int64), group=group, world_size=4,
                     token_info_table_shape=[m, bs, k1], token_data_shape=[m, bs, k1, hs],
                     attn_rank_table=np.array([3, 2], np.int32))
    # Row 0 -> session 1 -> rank 2, slot (1*3 + 2)*3 + 2 = 17: flag at byte 68, data at 512 + 17*80*2 = 3232.
    # Row 1 -> session 0 -> rank 3, slot (0*3 + 1)*3 + 0 = 3: flag at byte 12, data at 512 + 3*160 = 992.
    # Row 2 -> session 1 -> rank 2, slot (0*3 + 0)*3 + 1 = 1: flag at byte 4, data at 512 + 160 = 672.
    # Row 3 is beyond actual_token_num: never sent.
    expect = {2: [(68, 3232, 0), (4, 672, 2)], 3: [(12, 992, 1)]}
    for rank, writes in expect.items():
        raw = group.windows[rank].inner.bytes
        for flag_at, data_at, row in writes:
            assert raw[flag_at:flag_at + 4].view("<i4")[0] == 1
            assert np.array_equal(raw[data_at:data_at + h * 2], x[row].view(np.uint8))
            assert not raw[data_at + h * 2:data_at + hs * 2].any()  # tail beyond H untouched
        assert np.count_nonzero(raw[:512].view("<i4")) == len(writes)
        assert np.count_nonzero(raw[512:]) == np.count_nonzero(
            np.concatenate([x[row].view(np.uint8) for _, _, row in writes]))
    for rank in (0, 1):
        assert not group.windows[rank].inner.bytes.any()
    assert sorted(notified) == [2, 3]


def test_data_before_flag_and_one_batch_per_rank(dev):
    log = []
    group = make_group(dev, 3, 512 + 1 * 4 * 2 * 64 * 2, [0, 1, 2], log)
    x, ids = args(6, 64, BF16, session_ids=[0, 1, 0, 2, 1, 0], token_ids=[0, 0, 1, 3, 2, 3],
                  expert_offsets=[0, 1, 1, 0, 1, 1])
    ffn_to_attention(x, **ids, actual_token_num=np.array([6], np.int64), group=group, world_size=3,
                     token_info_table_shape=[1, 4, 2], token_data_shape=[1, 4, 2, 64])
    assert [(e[0], e[1]) for e in log] == [("rows", 0), ("i32", 0), ("rows", 1), ("i32", 1), ("rows", 2),
                                           ("i32", 2)]
    rows0, flags0 = log[0], log[1]
    assert rows0[2:4] == (512, 128) and rows0[4] == [0, 3, 7] and flags0[2:] == (0, [0, 3, 7])
    win0 = group.windows[0].inner.bytes
    assert np.array_equal(win0[512 + 7 * 128:512 + 8 * 128], x[5].view(np.uint8))


def test_group_by_registered_name_and_nothing_for_zero_rows(dev):
    group = make_group(dev, 2, 1024, [0, 1])
    group.name = "f2a-registered"
    comm.register(group)
    try:
        x, ids = args(2, 32)
        ffn_to_attention(x, **ids, actual_token_num=np.array([0], np.int64), group="f2a-registered", world_size=2,
                         token_info_table_shape=[1, 1, 1], token_data_shape=[1, 1, 1, 32])
        assert not group.windows[0].bytes.any()
        ffn_to_attention(x, **ids, actual_token_num=np.array([1], np.int64), group="f2a-registered", world_size=2,
                         token_info_table_shape=[1, 1, 1], token_data_shape=[1, 1, 1, 32])
        assert group.windows[0].bytes[:4].view("<i4")[0] == 1
    finally:
        comm.unregister("f2a-registered")


def call(group, x, ids, n=1, ws=2, info=(1, 2, 2), data=(1, 2, 2, 64), table=None):
    ffn_to_attention(x, **ids, actual_token_num=np.array([n], np.int64), group=group, world_size=ws,
                     token_info_table_shape=list(info), token_data_shape=list(data), attn_rank_table=table)


@pytest.mark.parametrize("change,err,match", [
    (dict(x=None), AclnnError, "x: must not be null.*161001"),
    (dict(token_ids=None), AclnnError, "token_ids: must not be null"),
    (dict(x=np.zeros((2, 64), np.float32)), AclnnError, "x: dtype.*161002"),
    (dict(session_ids=np.zeros(2, np.int64)), AclnnError, "session_ids: dtype"),
    (dict(x=np.zeros((2, 1, 64), np.float16)), KernelError, "x: must be 2-D"),
    (dict(token_ids=np.zeros(3, np.int32)), KernelError, "token_ids: must be 1-D with dim0 equal"),
    (dict(info=(1, 2, 3)), KernelError, "token_info_table_shape.*must equal token_data_shape"),
    (dict(ws=1), KernelError, r"world_size: must be in \[2, 768\]"),
    (dict(ws=769), KernelError, r"world_size: must be in \[2, 768\]"),
    (dict(data=(1, 2, 2, 32)), KernelError, "H=64 must be <= HS"),
    (dict(table=np.array([0, 1], np.int32)), KernelError, "attn_rank_table: must be 1-D with length"),
    (dict(table=np.array([5], np.int32)), KernelError, "attn_rank_table: values must be in"),
    (dict(n=3), KernelError, "actual_token_num"),
    (dict(session_ids=np.array([2, 0], np.int32)), KernelError, "session_ids: values must be in"),
    (dict(micro_batch_ids=np.array([1, 0], np.int32)), KernelError, "micro_batch_ids"),
    (dict(token_ids=np.array([2, 0], np.int32)), KernelError, "token_ids: values"),
    (dict(expert_offsets=np.array([-1, 0], np.int32)), KernelError, "expert_offsets: values"),
])
def test_checks_name_field_and_rule(dev, change, err, match):
    group = make_group(dev, 2, 4096, [0, 1])
    x, ids = args(2, 64)
    kw = dict(n=1, ws=2, info=(1, 2, 2), data=(1, 2, 2, 64), table=None)
    for key in list(change):
        if key in ids:
            ids[key] = change.pop(key)
        elif key == "x":
            x = change.pop(key)
    kw.update(change)
    if kw["ws"] != 2:
        group.world_size = kw["ws"]
    with pytest.raises(err, match=match):
        call(group, x, ids, **kw)


def test_actual_token_num_must_be_int64_of_shape_1(dev):
    group = make_group(dev, 2, 4096, [0, 1])
    x, ids = args(2, 64)
    with pytest.raises(AclnnError, match="actual_token_num: dtype must be int64"):
        ffn_to_attention(x, **ids, actual_token_num=np.array([1], np.int32), group=group, world_size=2,
                         token_info_table_shape=[1, 2, 2], token_data_shape=[1, 2, 2, 64])
    with pytest.raises(KernelError, match=r"actual_token_num: must have shape \(1,\)"):
        ffn_to_attention(x, **ids, actual_token_num=np.array([1, 1], np.int64), group=group, world_size=2,
                         token_info_table_shape=[1, 2, 2], token_data_shape=[1, 2, 2, 64])


def test_window_too_small_is_a_kernel_error(dev):
    group = make_group(dev, 2, 600, [0, 1])
    x, ids = args(2, 64, token_ids=[1, 1], expert_offsets=[1, 1])
    with pytest.raises(KernelError, match="window"):
        call(group, x, ids)


def test_hardware_limits_only_in_strict_mode(dev):
    group = make_group(dev, 2, 4096, [0, 1])
    x, ids = args(2, 64)
    call(group, x, ids, info=(2, 2, 2), data=(2, 2, 2, 64))  # small H and M > 1 are fine by default
    with strict_mode():
        with pytest.raises(KernelError, match=r"H=64 must be in \[1024, 8192\]"):
            call(group, x, ids)
    big = make_group(dev, 2, 512 + 4 * 1024 * 2, [0, 1])
    xb, idsb = args(2, 1024)
    with strict_mode():
        call(big, xb, idsb, info=(1, 2, 2), data=(1, 2, 2, 1024))
        with pytest.raises(KernelError, match="M=2 must be 1"):
            call(big, xb, idsb, info=(2, 2, 2), data=(2, 2, 2, 1024))
        with pytest.raises(KernelError, match=r"BS=513 must be in \[1, 512\]"):
            call(big, xb, idsb, info=(1, 513, 2), data=(1, 513, 2, 1024))
        with pytest.raises(KernelError, match=r"HS=9000"):
            call(big, xb, idsb, info=(1, 2, 2), data=(1, 2, 2, 9000))


def test_hccl_window_rule(dev, monkeypatch):
    # 1 * 512 * 17 * 8320 * 2 bytes + flags = 138.2 MiB -> 139 MB needed.
    assert hccl_window_mb_needed(1, 512, 17, 8320, 2) == (512 * 17 * 8320 * 2 + 512 * 17 * 4) // (1 << 20) + 1
    assert hccl_window_mb_needed(1, 512, 17, 8320, 2) == 139
    group = make_group(dev, 2, 512 + 4 * 1024 * 2, [0, 1])
    x, ids = args(2, 1024)
    monkeypatch.setenv("HCCL_BUFFSIZE", "1")
    with strict_mode():
        call(group, x, ids, info=(1, 2, 2), data=(1, 2, 2, 1024))  # needs 1 MB: fits
        # 512*2*1024*2 B = 2 MiB of data + 4 KiB of flags -> 2 + 1 = 3 MB
        with pytest.raises(KernelError, match="needs a 3 MB HCCL window"):
            call(group, x, ids, info=(1, 512, 2), data=(1, 512, 2, 1024))
