"""FFNToAttention V2 (generation "950"): several micro-batches, flag := 0 / row / flag := 1, V2's checks, and the
buffer-size helper."""
import ml_dtypes
import numpy as np
import pytest

from afd.comm import Group, LocalWindow
from afd.errors import KernelError
from afd.ops import ffn_to_attention, strict_mode
from afd.ops.ffn_to_attention import get_ffn_to_attention_ccl_buffer_size

BF16 = np.dtype(ml_dtypes.bfloat16)
M, BS, K1, HS, H = 3, 4, 3, 80, 64
INFO = 512  # align512(M*BS*K1*4 = 144)
SIZE = INFO + M * BS * K1 * HS * 2
PATTERN = 0x33


class Recording:
    """A window that records every put with its values (and still performs it)."""

    def __init__(self, inner, log, rank):
        self.inner, self.log, self.rank, self.size = inner, log, rank, inner.size

    def put_rows(self, offset, stride, index, rows):
        self.log.append(("rows", self.rank, list(np.asarray(index))))
        self.inner.put_rows(offset, stride, index, rows)

    def put_i32(self, offset, index, values):
        self.log.append(("i32", self.rank, list(np.asarray(index)), int(np.asarray(values).reshape(-1)[0])))
        self.inner.put_i32(offset, index, values)

    def get_i32(self, offset, count):
        return self.inner.get_i32(offset, count)


def make_group(dev, world_size=4, log=None):
    windows = {}
    for r in range(world_size):
        win = LocalWindow(dev, dev.malloc(SIZE).address, SIZE)
        win.bytes[:] = PATTERN
        windows[r] = win if log is None else Recording(win, log, r)
    g = Group("f2a-v2-test", world_size, windows)
    g.notified = []
    g._notify = g.notified.append
    return g


def raw(group, r):
    w = group.windows[r]
    return getattr(w, "inner", w).bytes


def send(group, x, sessions, mbs, toks, offs, n=None, table=None, ws=4, info=(M, BS, K1), data=(M, BS, K1, HS),
         generation="950"):
    ids = [np.asarray(v, np.int32) for v in (sessions, mbs, toks, offs)]
    return ffn_to_attention(x, *ids, np.array([len(sessions) if n is None else n], np.int64), group, ws, list(info),
                            list(data), None if table is None else np.asarray(table, np.int32),
                            generation=generation)


def rows(y, dtype=BF16, seed=0):
    return np.random.default_rng(seed).standard_normal((y, H), dtype=np.float32).astype(dtype)


def test_several_micro_batches_land_bit_exact(dev):
    group = make_group(dev)
    x = rows(6)
    sessions, mbs, toks, offs = [0, 1, 1, 0, 1, 0], [2, 0, 1, 2, 2, 1], [3, 0, 2, 0, 3, 1], [2, 1, 0, 0, 2, 1]
    before = {r: raw(group, r).copy() for r in range(4)}
    sent = send(group, x, sessions, mbs, toks, offs, n=5, table=[3, 1])
    want = {r: b.copy() for r, b in before.items()}
    for i in range(5):  # row 5 is past actual_token_num
        rank = [3, 1][sessions[i]]
        slot = (mbs[i] * BS + toks[i]) * K1 + offs[i]
        want[rank][slot * 4:slot * 4 + 4] = np.array([1], "<i4").view(np.uint8)
        at = INFO + slot * HS * 2
        want[rank][at:at + H * 2] = x[i].view(np.uint8)
    for r in range(4):
        assert np.array_equal(raw(group, r), want[r]), f"rank {r}"
    assert sent == {3: [2], 1: [0, 1, 2]} and sorted(group.notified) == [1, 3]


def test_flag_cleared_then_row_then_flag_per_rank(dev):
    log = []
    group = make_group(dev, log=log)
    send(group, rows(4), [0, 1, 0, 1], [0, 2, 1, 2], [0, 1, 2, 3], [0, 0, 2, 1])
    slots0, slots1 = [0, (BS + 2) * K1 + 2], [(2 * BS + 1) * K1, (2 * BS + 3) * K1 + 1]
    assert log == [("i32", 0, slots0, 0), ("rows", 0, slots0), ("i32", 0, slots0, 1),
                   ("i32", 1, slots1, 0), ("rows", 1, slots1), ("i32", 1, slots1, 1)]
    log.clear()
    send(group, rows(2), [0, 0], [0, 0], [1, 2], [0, 0], generation="A3")  # V1: rows, then flags, no clear
    assert [e[0] for e in log] == ["rows", "i32"] and log[1][3] == 1


def test_same_slot_twice_the_last_row_wins(dev):
    group = make_group(dev)
    x = rows(3)
    send(group, x, [2, 2, 2], [1, 1, 1], [0, 0, 0], [1, 1, 1])
    at = INFO + (1 * BS * K1 + 1) * HS * 2
    assert np.array_equal(raw(group, 2)[at:at + H * 2], x[2].view(np.uint8))


def test_only_the_flat_slot_must_be_in_range(dev):
    """V2's kernel checks tokenSlot < M*BS*(K+1), not each id: token 5 of micro-batch 0 is slot 15 (mb 1, token 1)."""
    group = make_group(dev)
    x = rows(1)
    send(group, x, [1], [0], [5], [0])
    at = INFO + 15 * HS * 2
    assert np.array_equal(raw(group, 1)[at:at + H * 2], x[0].view(np.uint8))
    with pytest.raises(KernelError, match="token_ids: values"):
        send(group, x, [1], [0], [5], [0], generation="A3")


def test_an_unused_table_entry_out_of_range_is_not_read(dev):
    group = make_group(dev)
    send(group, rows(1), [0], [0], [0], [0], table=[2, 9, 9])  # entries 1 and 2 are never used
    assert raw(group, 2)[:4].view("<i4")[0] == 1


@pytest.mark.parametrize("change,field,rule", [
    (dict(n=-1), "actual_token_num", "actualTokenNum must be non-negative, actualTokenNumValue=-1"),
    (dict(n=3), "actual_token_num", "actualTokenNum exceeds x dim0, actualTokenNum=3, maxTokenNum=2"),
    (dict(sessions=[0, 2], table=[1, 2]), "session_ids", "sessionId out of range, sessionId=2, axisA=2"),
    (dict(sessions=[0, 1], table=[1, 4]), "attn_rank_table", "attention rank is out of range"),
    (dict(sessions=[4, 0]), "session_ids", "attention rank is out of range"),
    (dict(mbs=[3, 0]), "token_ids", "tokenSlot out of range, tokenSlot=36, tokenSlotNum=36"),
    (dict(offs=[-1, 0]), "token_ids", "tokenSlot out of range, tokenSlot=4294967295, tokenSlotNum=36"),
    (dict(table=[0, 1, 2, 3]), "attn_rank_table", "actual dim0=4, expected dim0 <= 3"),
    (dict(table=np.zeros(0, np.int32)), "attn_rank_table",
     r"actual 0, reason: dim0 in \[1, worldSize=4\) matching attention_to_ffn_v2's attentionWorkerNum"),
    (dict(data=(M, BS, K1, 32)), "token_data_shape", "token_data_shape HS must be greater than or equal to x H"),
    (dict(info=(1, 2, 257), data=(1, 2, 257, HS)), "token_info_table_shape", r"actual dim2=257, expected \[1, 256\]"),
])
def test_refusals_name_field_and_rule(dev, change, field, rule):
    group = make_group(dev)
    args = dict(sessions=[0, 1], mbs=[0, 1], toks=[0, 1], offs=[0, 1])
    args.update(change)
    with pytest.raises(KernelError, match=rule) as err:
        send(group, rows(2), **args)
    assert err.value.field == field and err.value.status == 1


def test_strict_limits_only_in_strict_mode(dev):
    group = make_group(dev)
    send(group, rows(1), [0], [2], [0], [0])  # M = 3, H = 64: fine (no M == 1 rule on 950)
    with strict_mode(), pytest.raises(KernelError, match=r"token_data_shape: actual HS=80, expected \[1024, 8320\]"):
        send(group, rows(1), [0], [2], [0], [0])


def test_ccl_buffer_size_helper_hand_computed():
    # W=4 M=2 BS=4 E=3 HS=64: recv info 3*2*14*4 = 336 -> 512; recv data 3*24*64*2 = 9216; + 32768 flag sources
    # -> raw 42496; address tables 4 * align512(4*24*16 = 1536) = 6144; count rows 1025 * 512 = 524800;
    # 573440 -> 2 MiB.
    assert get_ffn_to_attention_ccl_buffer_size([2, 4, 3], [2, 4, 3, 64], 4) == 2 << 20
    # W=16 M=2 BS=512 E=9 HS=7168: recv data 15*9216*7168*2 = 1981808640, info 15*2*4610*4 = 553200 -> 553472;
    # raw = 553472 + 1981808640 + 32768 = 1982394880; tables 16*align512(16*9216*16) = 37748736 and
    # 1025 * 512 = 524800: 2020668416 -> 964 * 2 MiB = 2021654528.
    assert get_ffn_to_attention_ccl_buffer_size([2, 512, 9], [2, 512, 9, 7168], 16) == 2021654528
    assert get_ffn_to_attention_ccl_buffer_size(token_info_table_shape=[1, 1, 1], token_data_shape=[1, 1, 1, 1],
                                                world_size=1) == 2 << 20


@pytest.mark.parametrize("info,data,ws,message", [
    ([1, 1], [1, 1, 1, 1], 2, "token_info_table_shape should have 3 elements, but got 2"),
    ([1, 1, 1], [1, 1, 1], 2, "token_data_shape should have 4 elements, but got 3"),
    ([1, 0, 1], [1, 0, 1, 1], 2, "Token dimensions must be positive"),
    ([1, 2, 1], [1, 1, 1, 8], 2, "Token info/data dimensions must match"),
    ([1, 1, 1], [1, 1, 1, 8], 1025, r"Complete window sizing requires world_size in \[1, 1024\]"),
    ([1, 1, 1], [1, 1, 1, 8], 0, r"Complete window sizing requires world_size in \[1, 1024\]"),
    ([1 << 40, 1 << 20, 256], [1 << 40, 1 << 20, 256, 8], 2, "Buffer size multiplication overflow"),
])
def test_ccl_buffer_size_helper_refusals(info, data, ws, message):
    with pytest.raises(RuntimeError, match=f"^{message}$"):
        get_ffn_to_attention_ccl_buffer_size(info, data, ws)
