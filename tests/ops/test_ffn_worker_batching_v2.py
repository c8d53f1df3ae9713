"""FfnWorkerBatching V2 (generation 950): the public ST scenarios, bit-exact against an independent reference."""
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from afd.errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, KernelError
from afd.layout import FfnWindowLayout
from afd.ops import Stopped, create_schedule_context_holder, ffn_worker_batching
from afd.ops.ffn_worker_batching import FfnBatch, output_spec

MASK = 1000000
I32_MAX = 2**31 - 1
NAMES = ("y", "group_list", "session_ids", "micro_batch_ids", "token_ids", "expert_offsets", "dynamic_scale",
         "actual_token_num")


# -- the reference: the spec (cann-ops-transformer-v2.md §5 and the public golden's rules), in plain Python ------

def row_layout(token_dtype, h):
    """(payload bytes, scale offset, scale bytes) of one slot, straight from the spec's words."""
    payload = {0: 2 * h, 1: 2 * h, 2: h, 3: h, 4: h, 5: h // 2}[token_dtype]
    if token_dtype == 2:
        return payload, h, 4  # the fp32 scale at byte H
    if token_dtype >= 3:
        return payload, payload, (h + 31) // 32  # E8M0 scales right after the payload
    return payload, 0, 0


def receive(recs, polling_index, sync_flag, expert_num, layer_num):
    """RECV: (selected mb, taken sessions, ids per session [A][BS*(K+1)] as Python ints, or None masked)."""
    a, m = recs.shape[:2]
    if not sync_flag:
        mb = polling_index
        assert sum(int(f) for f in recs[:, mb, 0]) >= a, "the reference only handles a ready wait-all call"
        return mb, list(range(a)), [[int(v) for v in recs[s, mb, 2:]] for s in range(a)]
    mb = polling_index
    for _ in range(m):
        if sum(int(f) for f in recs[:, mb, 0]) > 0:
            break
        mb = (mb + 1) % m
    else:
        raise AssertionError("the reference only handles a snapshot that finds something")
    taken = [s for s in range(a) if int(recs[s, mb, 0]) == 1]
    per_layer = expert_num // layer_num
    ids = []
    for s in range(a):
        layer = int(recs[s, mb, 1])
        row = []
        for v in recs[s, mb, 2:]:
            v = int(v)
            ok = s in taken and 0 <= layer < layer_num and 0 <= v < per_layer
            row.append(v + layer * per_layer if ok else MASK)
        ids.append(row)
    return mb, taken, ids


def reference(slots, token_dtype, h, expert_num, y_rows, bs, k1, m, rows):
    """The outputs for rows = [(session, micro-batch, ids of that row)]: slots is the data region as
    [A, M, BS, K+1, HS] bytes. Outputs as bytes where the op copies bytes."""
    payload, scale_at, scale_bytes = row_layout(token_dtype, h)
    items = []
    flat = 0
    for s, mb, ids in rows:
        for t in range(bs):
            for k in range(k1):
                e = ids[t * k1 + k]
                if e < MASK:
                    items.append((e, flat, s, mb, t, k))
                flat += 1
    items.sort(key=lambda it: (it[0], it[1]))
    n = len(items)
    y = np.zeros((y_rows, payload), np.uint8)
    scale = np.zeros((y_rows, scale_bytes if token_dtype >= 3 else 4), np.uint8)
    meta = np.zeros((4, y_rows), np.int32)
    for i, (e, _, s, mb, t, k) in enumerate(items):
        slot = slots[s, mb, t, k]
        y[i] = slot[:payload]
        if scale_bytes:
            scale[i] = slot[scale_at:scale_at + scale_bytes]
        meta[:, i] = (s, mb, t, k)
    groups = []
    for e, *_ in items:
        if groups and groups[-1][0] == e:
            groups[-1][1] += 1
        else:
            groups.append([e, 1])
    group_list = np.zeros((expert_num, 2), np.int64)
    for j, g in enumerate(groups[:expert_num]):
        group_list[j] = g
    return {"y": y, "group_list": group_list, "session_ids": meta[0], "micro_batch_ids": meta[1],
            "token_ids": meta[2], "expert_offsets": meta[3], "dynamic_scale": scale,
            "actual_token_num": np.array([n], np.int64)}


def assert_equal(batch, want):
    for name in NAMES:
        got = np.ascontiguousarray(getattr(batch, name))
        exp = want[name]
        if name in ("y", "dynamic_scale"):  # bytes: NaN payloads and -0 count
            got = got.view(np.uint8).reshape(exp.shape)
        assert got.shape == exp.shape, name
        assert np.array_equal(got, exp), name


# -- windows and scenarios --------------------------------------------------------------------------------------

@pytest.fixture
def window(dev):
    """make(A, M, BS, K+1, H, token_dtype) -> Win: an FFN-side context over a fresh window whose slots are
    align512(payload + scales) bytes (as the ST cases make them), random bytes in every slot, all flags 0."""
    holders = []

    def make(a, m, bs, k1, h, token_dtype, expert_num=8, seed=0):
        payload, scale_at, scale_bytes = row_layout(token_dtype, h)
        hs = (max(payload, scale_at + scale_bytes) + 511) // 512 * 512
        layout = FfnWindowLayout(a, m, bs, k1, hs)
        win = dev.malloc(layout.total_bytes)
        holder = create_schedule_context_holder(0, a, m, bs, k1, expert_num, hs, 512, ffn_window=win.address,
                                                ffn_window_size=layout.total_bytes, device=dev)
        holder.init()
        holders.append(holder)
        w = Win(holder.get_schedule_context(), win.view("<i4", layout.records_shape),
                win.view(np.uint8, (a, m, bs, k1, hs), layout.data_offset), (a, m, bs, k1, h), token_dtype,
                expert_num)
        rng = np.random.default_rng(seed)
        w.data[:] = rng.integers(0, 256, w.data.shape, dtype=np.uint8)
        w.recs[:, :, 0] = 0
        w.recs[:, :, 2:] = rng.integers(0, expert_num, w.recs[:, :, 2:].shape)
        return w

    yield make
    for holder in holders:
        holder.close()


class Win:
    def __init__(self, ctx, recs, data, geometry, token_dtype, expert_num):
        self.ctx, self.recs, self.data = ctx, recs, data
        self.a, self.m, self.bs, self.k1, self.h = geometry
        self.token_dtype, self.expert_num = token_dtype, expert_num

    @property
    def shape(self):
        return [self.a, self.bs, self.k1, self.h]

    def run(self, need_schedule=1, sync_flag=False, layer_num=1, **kw):
        return ffn_worker_batching(self.ctx, self.expert_num, self.shape, self.token_dtype, need_schedule, layer_num,
                                   sync_flag=sync_flag, generation="950", **kw)

    def recv(self, sync_flag=False, layer_num=1):
        """One RECV call checked against the reference: outputs, records after, polling_index after."""
        before = self.recs.copy()
        polling_index = int(self.ctx.ffn.polling_index)
        mb, taken, ids = receive(before, polling_index, sync_flag, self.expert_num, layer_num)
        want = reference(self.data, self.token_dtype, self.h, self.expert_num, self.a * self.bs * self.k1, self.bs,
                         self.k1, self.m, [(s, mb, ids[s]) for s in range(self.a)])
        batch = self.run(1, sync_flag, layer_num)
        assert_equal(batch, want)
        after = before.copy()
        after[taken, mb, 0] = 0
        after[taken, mb, 2:] = I32_MAX
        assert np.array_equal(self.recs, after)  # layer words and untaken sessions untouched
        assert int(self.ctx.ffn.polling_index) == (mb + 1) % self.m
        return batch, mb, taken

    def norm(self, sessions, mbs, ids, sync_flag=False):
        """One NORM call (the FFN scheduler's out buffers given) checked against the reference."""
        dev, f = self.ctx.device, self.ctx.ffn
        out_num = len(sessions)
        dev.view(f.session_ids_buf, 4 * self.a, "<i4")[:out_num] = sessions
        dev.view(f.micro_batch_ids_buf, 4 * self.a, "<i4")[:out_num] = mbs
        dev.view(f.expert_ids_buf, 4 * self.a * self.bs * self.k1, "<i4").reshape(self.a, -1)[:out_num] = ids
        f.out_num = out_num
        recs, polling_index = self.recs.copy(), int(f.polling_index)
        want = reference(self.data, self.token_dtype, self.h, self.expert_num, self.a * self.bs * self.k1, self.bs,
                         self.k1, self.m, [(sessions[r], mbs[r], [int(v) for v in ids[r]]) for r in range(out_num)])
        batch = self.run(0, sync_flag)
        assert_equal(batch, want)
        assert np.array_equal(self.recs, recs) and int(f.polling_index) == polling_index  # no context writes
        return batch


DTYPES = [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("token_dtype", DTYPES)
def test_masked_recv(window, token_dtype):
    w = window(4, 1, 3, 3, 66, token_dtype, seed=token_dtype)
    rng = np.random.default_rng(10 + token_dtype)
    w.recs[:, 0, 0] = 1
    mask = rng.random(w.recs[:, 0, 2:].shape) < 0.15
    w.recs[:, 0, 2:][mask] = MASK
    batch, _, _ = w.recv()
    assert 0 < batch.actual_token_num[0] < 36


def test_all_masked_recv(window):
    w = window(1, 1, 3, 3, 32, 3)
    w.recs[:, 0, 0] = 1
    w.recs[:, 0, 2:] = MASK
    batch, _, _ = w.recv()
    assert batch.actual_token_num[0] == 0 and not batch.group_list.any()


def test_one_expert_norm(window):
    w = window(2, 1, 4, 3, 128, 4)
    batch = w.norm([0, 1], [0, 0], np.zeros((2, 12), np.int32))
    assert batch.group_list[0].tolist() == [0, 24] and not batch.group_list[1:].any()


@pytest.mark.parametrize("out_num", [0, 1])
def test_out_num_0_and_1_norm(window, out_num):
    w = window(4, 1, 3, 3, 66, 0)
    # stale valid ids past out_num: a kernel that ignored out_num would take them
    w.ctx.device.view(w.ctx.ffn.expert_ids_buf, 4 * 36, "<i4")[:] = 3
    ids = np.random.default_rng(1).integers(0, 8, (out_num, 9)).astype(np.int32)
    batch = w.norm(list(range(out_num)), [0] * out_num, ids)
    assert batch.actual_token_num[0] == 9 * out_num


@pytest.mark.parametrize("token_dtype", [0, 2])
def test_reversed_sessions_last_micro_batch_norm(window, token_dtype):
    """Rows of expert_ids_buf name their session (reversed) and micro-batch (M-1): the rows are looked up, ties
    stay in buffer-row order."""
    w = window(4, 3, 3, 3, 66, token_dtype)
    ids = np.random.default_rng(2).integers(0, 8, (4, 9)).astype(np.int32)
    batch = w.norm([3, 2, 1, 0], [2, 2, 2, 2], ids)
    assert set(batch.micro_batch_ids[:36].tolist()) == {2}
    first = batch.group_list[0, 1]  # the lowest id's rows: buffer rows in order, so sessions descending
    assert batch.session_ids[:first].tolist() == sorted(batch.session_ids[:first].tolist(), reverse=True)


def test_norm_ignores_sync_flag(window):
    w = window(4, 1, 3, 3, 66, 5)
    ids = np.random.default_rng(3).integers(0, 8, (4, 9)).astype(np.int32)
    w.norm([0, 1, 2, 3], [0] * 4, ids, sync_flag=True)


def test_negative_and_large_ids_are_valid_in_wait_all_recv_and_norm(window):
    """Below 1000000 (signed) every id is a slot: negatives sort first; ids past expert_num count too; the
    distinct ids past expert_num rows of group_list are dropped."""
    w = window(2, 1, 3, 3, 8, 0, expert_num=4)
    w.recs[:, 0, 0] = 1
    w.recs[0, 0, 2:] = [-5, 7, -1, 999999, 3, 1000000, 2, -5, 40]
    w.recs[1, 0, 2:] = [0, 1, 2, 3, -2**31, 12, 13, 14, I32_MAX]
    batch, _, _ = w.recv()
    assert batch.actual_token_num[0] == 16
    assert batch.group_list[:, 0].tolist() == [-2**31, -5, -1, 0]
    w.norm([1, 0], [0, 0], np.array([[5, -3, 6, 1000000, 999999, -3, 0, 0, 1], [2] * 9], np.int32))


@pytest.mark.timeout(20)
def test_wait_all_counts_the_flag_sum(window):
    """The wait-all receive is ready when the A flags add up to >= A (the kernel's ReduceSum), and then consumes
    every session's record."""
    w = window(4, 2, 2, 2, 16, 1)
    w.recs[:, 1, 0] = [2, 0, 1, 1]
    w.ctx.ffn.polling_index = 1
    _, mb, taken = w.recv()
    assert mb == 1 and taken == [0, 1, 2, 3] and int(w.ctx.ffn.polling_index) == 0


@pytest.mark.parametrize("token_dtype", [0, 2])
def test_partial_sync_takes_the_ready_sessions_then_the_rest_later(window, token_dtype):
    """Snapshot receive, odd sessions not ready: only even sessions are taken, the odd records stay untouched
    (valid ids and all); once they arrive, the next call takes them."""
    w = window(4, 1, 3, 3, 66, token_dtype)
    w.recs[0::2, 0, 0] = 1
    batch, mb, taken = w.recv(sync_flag=True)
    assert taken == [0, 2] and set(batch.session_ids[:batch.actual_token_num[0]].tolist()) <= {0, 2}
    w.recs[1::2, 0, 0] = 1
    _, _, taken = w.recv(sync_flag=True)
    assert taken == [1, 3]


@pytest.mark.parametrize("token_dtype", [1, 4])
def test_only_the_last_session_of_the_last_micro_batch_ready(window, token_dtype):
    """M = 3, only [A-1, M-1] ready, polling_index 0: micro-batches 0 and 1 are skipped without a write, 2 is
    selected, polling_index wraps to 0."""
    w = window(4, 3, 3, 3, 66, token_dtype)
    w.recs[3, 2, 0] = 1
    batch, mb, taken = w.recv(sync_flag=True)
    assert (mb, taken, int(w.ctx.ffn.polling_index)) == (2, [3], 0)
    assert set(batch.micro_batch_ids[:batch.actual_token_num[0]].tolist()) == {2}


def test_snapshot_scan_starts_at_polling_index(window):
    w = window(2, 3, 2, 2, 16, 0)
    w.recs[0, 0, 0] = 1  # ready, but the scan starts at 1
    w.recs[1, 2, 0] = 1
    w.ctx.ffn.polling_index = 1
    _, mb, taken = w.recv(sync_flag=True)
    assert (mb, taken, int(w.ctx.ffn.polling_index)) == (2, [1], 0)
    _, mb, taken = w.recv(sync_flag=True)
    assert (mb, taken, int(w.ctx.ffn.polling_index)) == (0, [0], 1)


def test_sync_masked_consumes_a_ready_session_with_no_valid_slot(window):
    """Only session 0 ready and all its ids masked: the micro-batch is still selected (a flag counts, not ids),
    nothing is batched, the record is consumed."""
    w = window(4, 1, 3, 3, 66, 3)
    w.recs[0, 0, 0] = 1
    w.recs[0, 0, 2:] = MASK
    batch, mb, taken = w.recv(sync_flag=True)
    assert taken == [0] and batch.actual_token_num[0] == 0 and not batch.group_list.any()


def test_snapshot_flag_sum_positive_but_no_flag_exactly_one(window):
    """The scan stops at a micro-batch whose flags add up to > 0; a session is taken only with a flag of exactly
    1: a flag of 2 selects the micro-batch but takes nothing (and leaves that record alone)."""
    w = window(2, 2, 2, 2, 16, 0)
    w.recs[1, 0, 0] = 2
    w.recs[0, 1, 0] = 1
    batch, mb, taken = w.recv(sync_flag=True)
    assert (mb, taken, int(w.ctx.ffn.polling_index)) == (0, [], 1) and batch.actual_token_num[0] == 0


@pytest.mark.parametrize("token_dtype,shape", [(0, (3, 8, 9, 512)), (2, (3, 3, 3, 66)), (5, (3, 1, 1, 2))])
def test_async_layers(window, token_dtype, shape):
    """layer_num 2: layer_ids = reversed session index % layer_num, ids in [0, expert_num/layer_num) are moved to
    their layer's range; group_list is in those layer-encoded ids."""
    a, bs, k1, h = shape
    w = window(a, 1, bs, k1, h, token_dtype)
    rng = np.random.default_rng(4)
    w.recs[:, 0, 0] = 1
    w.recs[:, 0, 1] = np.arange(a)[::-1] % 2
    w.recs[:, 0, 2:] = rng.integers(0, 4, w.recs[:, 0, 2:].shape)
    w.recs[0, 0, 2] = MASK
    batch, _, _ = w.recv(sync_flag=True, layer_num=2)
    n = int(batch.actual_token_num[0])
    assert n == a * bs * k1 - 1
    layer1 = sum(bs * k1 - (s == 0) for s in range(a) if (a - 1 - s) % 2 == 1)  # its ids moved to [4, 8)
    gl = batch.group_list
    assert gl[gl[:, 0] >= 4, 1].sum() == layer1 and gl[:, 1].sum() == n


@pytest.mark.parametrize("layer", [-1, I32_MAX, 2, 1])
def test_layer_boundaries(window, layer):
    """A layer of -1, INT32_MAX or layer_num masks the whole session (its record still consumed); layer_num - 1
    is the last valid layer. Ids the unsigned compare rejects (negative, >= expert_num/layer_num) are masked."""
    w = window(4, 1, 3, 3, 66, 0)
    w.recs[:, 0, 0] = 1
    w.recs[:, 0, 1] = layer
    w.recs[:, 0, 2:] %= 4  # expert_num 8 / layer_num 2: ids of one layer
    w.recs[0, 0, 2:5] = [-1, 4, 5]  # negative, per_layer, beyond: masked in snapshot mode
    batch, _, taken = w.recv(sync_flag=True, layer_num=2)
    assert taken == [0, 1, 2, 3]
    n = int(batch.actual_token_num[0])
    assert (n > 0) == (layer == 1)
    if layer == 1:
        assert n == 36 - 3 and batch.group_list[:, 0][batch.group_list[:, 1] > 0].min() >= 4


def test_layer_num_1_remaps_too(window):
    """In snapshot mode the regroup applies with layer_num 1 as well (per layer = expert_num): negative ids are
    masked there, though valid in the wait-all receive."""
    w = window(2, 1, 2, 2, 16, 0)
    w.recs[:, 0, 0] = 1
    w.recs[:, 0, 2:] = [[-1, 0, 7, 8], [3, MASK, -7, 1]]
    batch, _, _ = w.recv(sync_flag=True, layer_num=1)
    assert batch.actual_token_num[0] == 4


@pytest.mark.parametrize("token_dtype,h", [(0, 1), (1, 7), (2, 33), (2, 31), (3, 31), (4, 31), (5, 34), (3, 33),
                                           (4, 64)])
def test_odd_h_and_mx(window, token_dtype, h):
    """Odd H (int8's scale at byte H, unaligned), MX with H = 31 (one scale byte), 33 (two), fp4 H = 34: payload
    and scales bit-exact."""
    w = window(3, 1, 3, 3, h, token_dtype, expert_num=17, seed=h)
    w.recs[:, 0, 0] = 1
    batch, _, _ = w.recv()
    spec = output_spec(17, w.shape, token_dtype, "950")
    assert batch.y.shape == spec[0].shape and batch.dynamic_scale.shape == spec[6].shape
    assert batch.dynamic_scale.dtype == spec[6].dtype and batch.y.dtype == spec[0].dtype


SPECIALS = {  # bytes of NaN (with payloads), +-Inf, -0 and max per element width
    0: np.array([0x7E01, 0xFC00, 0x7C00, 0x8000, 0x7BFF, 0xFE00], "<u2"),
    1: np.array([0x7FC1, 0xFF80, 0x7F80, 0x8000, 0xFF7F, 0xFFC0], "<u2"),
    2: np.array([0x80, 0x7F, 0x00, 0xFF], np.uint8),
    3: np.array([0x7F, 0xFF, 0x7C, 0xFC, 0x80, 0x7E], np.uint8),
    4: np.array([0x7F, 0xFF, 0x80, 0x7E], np.uint8),
    5: np.array([0x8F, 0xF8, 0x77, 0x00], np.uint8),
}


@pytest.mark.parametrize("token_dtype", DTYPES)
@pytest.mark.parametrize("need_schedule", [0, 1])
def test_nan_inf_negative_zero_payloads_are_copied_bit_exact(window, token_dtype, need_schedule):
    w = window(4, 1, 3, 3, 66, token_dtype)
    payload, scale_at, scale_bytes = row_layout(token_dtype, 66)
    pattern = SPECIALS[token_dtype].view(np.uint8)
    w.data[..., :payload] = np.resize(pattern, payload)
    if token_dtype == 2:  # fp32 scales: NaN with a payload, -Inf, max, -0
        w.data[..., scale_at:scale_at + 4] = np.resize(
            np.array([0x7FC00001, 0xFF800000, 0x7F7FFFFF, 0x80000000], "<u4").view(np.uint8), 16)[:4]
    elif token_dtype >= 3:  # E8M0: NaN (0xFF), 2^127 (0xFE), 2^-127 (0)
        w.data[..., scale_at:scale_at + scale_bytes] = np.resize(np.array([0xFF, 0xFE, 0x00], np.uint8), scale_bytes)
    ids = np.random.default_rng(5).integers(0, 8, (4, 9)).astype(np.int32)
    if need_schedule:
        w.recs[:, 0, 0], w.recs[:, 0, 2:] = 1, ids
        w.recv()
    else:
        w.norm([3, 2, 1, 0], [0] * 4, ids)


def test_random_recv_snapshot_calls_in_sequence(window):
    """A stream of snapshot calls over M = 3 with sessions arriving at random: every call matches the reference
    (outputs, records, polling_index), every ready record is consumed exactly once."""
    w = window(3, 3, 2, 3, 40, 2, expert_num=8, seed=6)
    rng = np.random.default_rng(7)
    consumed = 0
    for _ in range(12):
        idle = (w.recs[:, :, 0] == 0)
        arrive = idle & (rng.random(idle.shape) < 0.4)
        w.recs[:, :, 2:][arrive] = rng.integers(-2, 6, (int(arrive.sum()), 6))
        w.recs[:, :, 1][arrive] = rng.integers(-1, 3, int(arrive.sum()))
        w.recs[:, :, 0][arrive] = 1
        if not w.recs[:, :, 0].any():
            continue
        _, _, taken = w.recv(sync_flag=True, layer_num=2)
        consumed += len(taken)
    assert consumed > 5


def test_outputs_given_are_written_in_place_including_uint8_twins(window):
    """out= on 950: arrays of output_spec's shape and dtype, or the mx_output_uint8 twin (uint8 scales), are the
    ones returned, stale values gone."""
    w = window(2, 1, 2, 2, 31, 3)
    w.recs[:, 0, 0] = 1
    spec = output_spec(8, w.shape, 3, "950", mx_output_uint8=True)
    given = FfnBatch(*(np.full(s.shape, 7, s.dtype) for s in spec))
    w.recs[1, 0, 2:] = MASK
    snapshot = w.recs.copy()
    want = w.run()
    w.recs[:] = snapshot
    w.ctx.ffn.polling_index = 0
    got = w.run(out=given)
    for name in NAMES:
        assert getattr(got, name) is getattr(given, name), name
        assert np.array_equal(np.asarray(getattr(got, name)).view(np.uint8),
                              np.asarray(getattr(want, name)).view(np.uint8)), name
    assert got.dynamic_scale.dtype == np.uint8 and want.dynamic_scale.dtype == ml_dtypes.float8_e8m0fnu


def test_output_spec():
    e, shape = 8, [2, 3, 3, 66]
    by_dtype = {td: {s.name: s for s in output_spec(e, shape, td, "950")} for td in DTYPES}
    assert [(s.shape, s.dtype, s.torch_dtype) for s in by_dtype[0].values()] == [
        ((18, 66), np.float16, "float16"), ((8, 2), np.int64, "int64")] + [((18,), np.int32, "int32")] * 4 + [
        ((18,), np.float32, "float32"), ((1,), np.int64, "int64")]
    assert by_dtype[1]["y"].torch_dtype == "bfloat16" and by_dtype[2]["y"].dtype == np.int8
    assert (by_dtype[3]["y"].torch_dtype, by_dtype[4]["y"].torch_dtype) == ("float8_e5m2", "float8_e4m3fn")
    assert by_dtype[5]["y"].shape == (18, 33) and by_dtype[5]["y"].dtype == np.uint8
    assert by_dtype[5]["y"].torch_dtype == "float4_e2m1fn_x2"
    assert by_dtype[3]["dynamic_scale"][1:] == ((18, 3), ml_dtypes.float8_e8m0fnu, "float8_e8m0fnu")
    raw = {s.name: s for s in output_spec(e, [2, 3, 3, 31], 5 - 1, "950", mx_output_uint8=True)}
    assert raw["dynamic_scale"][1:] == ((18, 1), np.uint8, "uint8") and raw["y"].torch_dtype == "float8_e4m3fn"
    assert output_spec(e, shape, 5, "950", True)[0].torch_dtype == "uint8"
    a3 = output_spec(e, shape, 2, "A3")
    assert [(s.name, s.shape, s.dtype) for s in a3] == [(s.name, s.shape, s.dtype)
                                                        for s in output_spec(e, shape, 2, "950")]
    with pytest.raises(AclnnError, match="token_dtype"):
        output_spec(e, shape, 3, "A3")


# -- refusals -------------------------------------------------------------------------------------------------------

def refusals(w):
    a, bs, k1, h = w.shape
    ok = dict(expert_num=8, max_out_shape=[a, bs, k1, h], token_dtype=0, need_schedule=1, layer_num=1,
              sync_flag=True)
    cases = [
        ({"max_out_shape": [a, bs, k1]}, "max_out_shape", "must be \\[A, BS, K, H\\]"),
        ({"max_out_shape": [0, bs, k1, h]}, "max_out_shape", "A must be in \\[1, 1024\\], got 0"),
        ({"max_out_shape": [1025, bs, k1, h]}, "max_out_shape", "A must be in \\[1, 1024\\], got 1025"),
        ({"max_out_shape": [a, 0, k1, h]}, "max_out_shape", "BS must be positive, got 0"),
        ({"max_out_shape": [a, bs, 65, h]}, "max_out_shape", "K must be in \\[1, 64\\], got 65"),
        ({"max_out_shape": [a, bs, 0, h]}, "max_out_shape", "K must be in \\[1, 64\\], got 0"),
        ({"max_out_shape": [a, bs, k1, 0]}, "max_out_shape", "H must be positive, got 0"),
        ({"max_out_shape": [1024, 2**21, 64, h]}, "max_out_shape", "must be <= INT32_MAX"),
        ({"expert_num": 0}, "expert_num", "must be in \\[1, 8192\\], got 0"),
        ({"expert_num": 8193}, "expert_num", "must be in \\[1, 8192\\], got 8193"),
        ({"token_dtype": 6}, "token_dtype", "got 6"),
        ({"token_dtype": -1}, "token_dtype", "got -1"),
        ({"need_schedule": 2}, "need_schedule", "must be 0 or 1, got 2"),
        ({"layer_num": -1}, "layer_num", "must be in \\[0, expert_num=8\\], got -1"),
        ({"layer_num": 9}, "layer_num", "must be in \\[0, expert_num=8\\], got 9"),
        ({"layer_num": 0}, "layer_num", "requires layer_num > 0"),
        ({"layer_num": 3}, "layer_num", "divisible by layer_num 3"),
        ({"token_dtype": 5, "max_out_shape": [a, bs, k1, 3]}, "max_out_shape", "FP4 .* even H, got 3"),
    ]
    return ok, cases


def test_v2_host_checks_name_the_field_and_rule_with_161002(window):
    w = window(2, 1, 2, 2, 16, 0)
    ok, cases = refusals(w)
    for change, field, rule in cases:
        args = {**ok, **change}
        with pytest.raises(AclnnError, match=f"^{field}: .*{rule}") as info:
            ffn_worker_batching(w.ctx, args.pop("expert_num"), args.pop("max_out_shape"), args.pop("token_dtype"),
                                args.pop("need_schedule"), args.pop("layer_num"), generation="950", **args)
        assert info.value.status == ACLNN_ERR_PARAM_INVALID, change
    # without sync_flag (or in NORM) layer_num 0 and non-divisors are fine
    w.recs[:, 0, 0] = 1
    w.run(1, False, layer_num=0)
    w.run(0, True, layer_num=3)


def test_v2_context_checks(window, monkeypatch):
    import afd.device
    w = window(2, 1, 2, 2, 16, 0)
    with pytest.raises(AclnnError, match="schedule_context: must not be null") as info:
        ffn_worker_batching(None, 8, w.shape, generation="950")
    assert info.value.status == ACLNN_ERR_PARAM_NULLPTR
    for arr, rule in ((np.zeros(1024, np.uint8), "dtype int8"), (np.zeros((2, 512), np.int8), "one-dimensional"),
                      (np.zeros(1000, np.int8), "at least 1024 bytes")):
        with pytest.raises(AclnnError, match=rule) as info:
            ffn_worker_batching(arr, 8, w.shape, generation="950")
        assert info.value.status == ACLNN_ERR_PARAM_INVALID
    # the context as the int8 tensor a front-end passes works like the ScheduleContext
    monkeypatch.setattr(afd.device, "_current", w.ctx.device)
    w.recs[:, 0, 0] = 1
    assert ffn_worker_batching(w.ctx._raw.view(np.int8), 8, w.shape, need_schedule=1, generation="950"
                               ).actual_token_num[0] == 8


def test_v2_kernel_checks(window):
    w = window(2, 1, 2, 2, 16, 0)
    with pytest.raises(KernelError, match="max_out_shape: .* fewer than the context's"):
        ffn_worker_batching(w.ctx, 8, [1, 2, 2, 16], generation="950")
    with pytest.raises(KernelError, match="attn_to_ffn_token_size"):
        ffn_worker_batching(w.ctx, 8, [2, 2, 2, 300], generation="950")
    w.ctx.ffn.polling_index = 1
    with pytest.raises(KernelError, match="polling_index"):
        ffn_worker_batching(w.ctx, 8, w.shape, need_schedule=1, generation="950")


def test_sync_flag_is_refused_on_a3_and_generation_checked(window):
    w = window(2, 1, 2, 2, 16, 0)
    with pytest.raises(AclnnError, match="sync_flag: .*must be False on A3") as info:
        ffn_worker_batching(w.ctx, 8, w.shape, 0, 1, 1, sync_flag=True)
    assert info.value.status == ACLNN_ERR_PARAM_INVALID
    with pytest.raises(ValueError, match="generation"):
        ffn_worker_batching(w.ctx, 8, w.shape, generation="910B")


# -- the waits ------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_snapshot_wait_idles_after_each_empty_cycle_then_takes_what_arrives(window):
    w = window(2, 3, 2, 2, 16, 0)
    w.ctx.ffn.polling_index = 2
    seen = []

    def idle(waiting):
        seen.append((waiting.op, waiting.iterations))
        if len(seen) == 3:
            w.recs[1, 1, 0] = 1
        assert not w.recs[:, :, 0].any() or len(seen) == 3

    batch = w.run(1, True, 1, idle=idle)
    assert [i for _, i in seen] == [1, 2, 3] and seen[0][0] == "ffn_worker_batching"
    assert set(batch.session_ids[:batch.actual_token_num[0]].tolist()) == {1}
    assert int(w.ctx.ffn.polling_index) == 2 and (w.recs[1, 1, 2:] == I32_MAX).all()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("sync_flag", [True, False])
def test_run_flag_exit_from_the_waits(window, sync_flag):
    """A thread clears run_flag while the op waits (nothing ready / not all ready): Stopped, and nothing in the
    context changed."""
    w = window(2, 2, 2, 2, 16, 0)
    w.ctx.ffn.polling_index = 1
    if not sync_flag:
        w.recs[0, 1, 0] = 1
    before = w.recs.copy()
    stopper = threading.Timer(0.2, lambda: setattr(w.ctx.control, "run_flag", 0))
    stopper.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Stopped, match="run_flag is 0"):
            w.run(1, sync_flag, 1)
    finally:
        stopper.cancel()
    assert time.monotonic() - t0 >= 0.15
    assert np.array_equal(w.recs, before) and int(w.ctx.ffn.polling_index) == 1
