"""AttentionToFFN: routing by the rank table, record layout, backpressure, headers (sync_flag), active mask."""
import threading

import ml_dtypes
import numpy as np
import pytest

from afd.comm import Group, LocalWindow
from afd.errors import AclnnError, KernelError
from afd.layout import EXPERT_ID_INIT
from afd.ops import attention_to_ffn

BF16 = np.dtype(ml_dtypes.bfloat16)
A, M, BS, K, H, HS = 2, 2, 3, 2, 64, 64
K1 = K + 1
REC_INTS = 2 + BS * K1  # 11
REC_BYTES = 4 * REC_INTS  # 44
DATA_AT = 512  # align512(A*M*44 = 176)
FFN_SIZE = DATA_AT + A * M * BS * K1 * HS * 2
FFN_RANKS, ATTN_RANKS = (0, 1), (2, 3)
# rows: [count, rank_0, local_0, rank_1, local_1]; experts 0..3 routed, 4 shared
TABLE = np.array([[[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [2, 0, 2, 1, 1], [2, 0, 3, 1, 2]]], np.int32)
EXPERTS = np.array([[[0, 2], [3, 1], [1, 0]]], np.int32)




@pytest.fixture
def group(dev):
    windows = {}
    for r in FFN_RANKS:
        windows[r] = LocalWindow(dev, dev.malloc(FFN_SIZE).address, FFN_SIZE)
        windows[r].i32(0, A * M * REC_INTS).reshape(A, M, REC_INTS)[:, :, 2:] = EXPERT_ID_INIT
    for r in ATTN_RANKS:
        windows[r] = LocalWindow(dev, dev.malloc(1024).address, 1024)
    g = Group("a2f-test", 4, windows, notify=None)
    g.notified = []
    g._notify = g.notified.append
    return g


def records(group, rank):
    return group.windows[rank].i32(0, A * M * REC_INTS).reshape(A, M, REC_INTS)


def send(group, x, session=1, mb=1, layer=5, experts=EXPERTS, table=TABLE, **kw):
    opts = dict(group=group, world_size=4, ffn_token_info_table_shape=[A, M, REC_INTS],
                ffn_token_data_shape=[A, M, BS, K1, HS], attn_token_info_table_shape=[M, BS, K1],
                moe_expert_num=4, rank=2)
    opts.update(kw)
    attention_to_ffn(x, np.array([session], np.int32), np.array([mb], np.int32), np.array([layer], np.int32),
                     experts, table, **opts)


def make_x(dtype=np.float16, seed=0):
    return np.random.default_rng(seed).standard_normal((1, BS, H), dtype=np.float32).astype(dtype)


def test_routes_slots_to_replicas_and_writes_the_record(group):
    x = make_x()
    send(group, x)
    # session 1: replica 1 % 2 = 1 for experts with two replicas (expert 3 -> rank 1 local 1, shared -> rank 1 local 2)
    want = {0: {0: 0, 4: 1, 6: 1, 7: 0}, 1: {1: 0, 2: 2, 3: 1, 5: 2, 8: 2}}  # tokenOffset t*3+k -> local id
    for rank, slots in want.items():
        rec = records(group, rank)[1, 1]
        assert rec[0] == 1 and rec[1] == 5  # header {flag, layer_id}
        expect = np.full(BS * K1, EXPERT_ID_INIT)
        for off, local in slots.items():
            expect[off] = local
        assert rec[2:].tolist() == expect.tolist()
        raw = group.windows[rank].bytes
        for off in range(BS * K1):
            # record (s=1, mb=1) is the 4th: slot ((1*2+1)*3 + t)*3 + k = 27 + off, HS*2 = 128 bytes each
            at = DATA_AT + (27 + off) * 128
            got = raw[at:at + H * 2]
            if off in slots:
                assert np.array_equal(got, x[0, off // K1].view(np.uint8))
            else:
                assert not got.any()
        others = records(group, rank).copy()
        others[1, 1] = 0
        assert (others[:, :, :2] == 0).all() and (others[:, :, 2:][others[:, :, 2:] != 0] == EXPERT_ID_INIT).all()
    assert sorted(group.notified) == [0, 1]


def test_sync_flag_0_headers_every_ffn_rank_1_only_receivers(group):
    table = TABLE.copy()
    table[0, 4] = [1, 0, 3, 0, 0]  # shared expert on rank 0 too
    experts = np.array([[[0, 1], [1, 0], [0, 0]]], np.int32)  # everything lands on rank 0
    send(group, make_x(), session=0, mb=0, layer=2, experts=experts, table=table, sync_flag=1)
    assert records(group, 0)[0, 0, :2].tolist() == [1, 2]
    assert records(group, 1)[0, 0, :2].tolist() == [0, 0]
    assert group.notified == [0]
    send(group, make_x(), session=1, mb=0, layer=3, experts=experts, table=table, sync_flag=0)
    assert records(group, 0)[1, 0, :2].tolist() == [1, 3]
    assert records(group, 1)[1, 0, :2].tolist() == [1, 3]  # header without tokens
    assert (records(group, 1)[1, 0, 2:] == EXPERT_ID_INIT).all()
    assert group.notified == [0, 0, 1]


@pytest.mark.timeout(10)
def test_backpressure_waits_while_header_flag_is_1(group):
    records(group, 1)[1, 1, 0] = 1  # previous round not consumed yet on rank 1
    calls = []

    def idle(waiting):
        calls.append(waiting.what)
        assert not group.windows[1].bytes[DATA_AT:].any()  # nothing written to rank 1 while blocked
        assert (records(group, 1)[1, 1, 2:] == EXPERT_ID_INIT).all()
        if len(calls) == 3:
            records(group, 1)[1, 1, 0] = 0  # the FFN scheduler consumed it

    send(group, make_x(), idle=idle)
    assert len(calls) == 3 and "FFN rank 1" in calls[0] and "header flag" in calls[0]
    assert records(group, 1)[1, 1, 0] == 1 and records(group, 1)[1, 1, 2 + 1] == 0


@pytest.mark.timeout(10)
def test_backpressure_released_from_another_thread(group):
    records(group, 0)[1, 1, 0] = 1
    spinning = threading.Event()
    done = []
    t = threading.Thread(target=lambda: done.append(send(group, make_x(), idle=lambda w: spinning.set())))
    t.start()
    assert spinning.wait(5)
    assert not done
    records(group, 0)[1, 1, 0] = 0
    t.join(5)
    assert done == [None] and records(group, 0)[1, 1, :2].tolist() == [1, 5]


def test_backpressure_is_per_record(group):
    records(group, 0)[0, 1, 0] = 1  # another session's record: not ours to wait for
    send(group, make_x(), idle=lambda w: pytest.fail("must not wait"))


def test_active_mask_presets_own_flags_and_sends_only_active_tokens(group):
    mask = np.array([[True, True, False]])
    send(group, make_x(BF16), active_mask=mask, rank=2)
    own = group.windows[2].i32(0, M * BS * K1).reshape(M, BS, K1)
    assert (own[1, 2] == 1).all()  # tokens [curBs, BS) of mb 1
    own[1, 2] = 0
    assert not own.any()
    assert not group.windows[3].bytes.any()
    assert records(group, 0)[1, 1, 2 + 6] == EXPERT_ID_INIT and records(group, 0)[1, 1, 2 + 7] == EXPERT_ID_INIT
    assert records(group, 0)[1, 1, 2 + 4] == 1


def test_active_mask_trues_first(group):
    with pytest.raises(KernelError, match="active_mask: true entries must come before false"):
        send(group, make_x(), active_mask=np.array([[True, False, True]]))


def test_quant_mode_2_int8_payload_and_scale(group):
    x = make_x(BF16)
    send(group, x, quant_mode=2, ffn_token_data_shape=[A, M, BS, K1, 128])
    raw = group.windows[0].bytes
    xf = x[0].astype(np.float32)
    for t in range(BS):
        at = DATA_AT + (((1 * M + 1) * BS + t) * K1 + 0) * 128  # k = 0 of every token went to rank 0? only some
        if records(group, 0)[1, 1, 2 + t * K1] == EXPERT_ID_INIT:
            continue
        q = raw[at:at + H].view(np.int8).astype(np.float32)
        scale = raw[at + 64:at + 68].view("<f4")[0]
        amax = np.abs(xf[t]).max()
        assert scale == np.float32(amax / np.float32(127))
        assert np.array_equal(q, np.rint(xf[t] * (np.float32(127) / amax)))
        assert np.allclose(q * scale, xf[t], atol=float(scale))


@pytest.mark.parametrize("change,err,match", [
    (dict(x=None), AclnnError, "x: must not be null.*161001"),
    (dict(x=np.zeros((1, BS, H), np.float32)), AclnnError, "x: dtype.*161002"),
    (dict(x=np.zeros((2, BS, H), np.float16)), KernelError, "X .* must be 1"),
    (dict(experts=np.array([[[0, 9], [0, 0], [0, 0]]], np.int32)), KernelError, r"expert_ids: values must be in \[0, 4\)"),
    (dict(table=np.where(np.arange(5)[None, :, None] == 0, 0, TABLE).astype(np.int32)), KernelError,
     "expert_rank_table: values must be in \\[1"),
    (dict(table=np.where(TABLE == 1, 3, TABLE).astype(np.int32)), KernelError, "expert_rank_table"),
    (dict(session=2), KernelError, "session_id: values"),
    (dict(mb=2), KernelError, "micro_batch_id: values"),
    (dict(quant_mode=1), AclnnError, "quant_mode"),
    (dict(sync_flag=2), AclnnError, "sync_flag"),
    (dict(ffn_token_info_table_shape=[A, M, 10]), KernelError, "ffn_token_info_table_shape"),
    (dict(world_size=2), KernelError, "world_size"),
])
def test_checks_name_field_and_rule(group, change, err, match):
    x = change.pop("x", make_x())
    with pytest.raises(err, match=match):
        send(group, x, **change)


def _numpy_copy_rows(dst, dst_index, src, src_index, width):
    dst[dst_index, :width] = src[src_index, :width]


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_row_copy_writes_the_bytes_numpy_writes(dev, monkeypatch, seed):
    """Random tokens and routes, fp16 / bf16 / int8 (quant_mode 2): the FFN windows hold the same bytes with the
    compiled row copy (each token's K+1 slots from its row, no gathered temporary) as with numpy's gather."""
    from afd.ops import _kernels
    rng = np.random.default_rng(seed)
    dtype, quant = [(np.float16, 0), (BF16, 0), (BF16, 2)][seed % 3]
    x = rng.standard_normal((1, BS, H), dtype=np.float32).astype(dtype)
    experts = rng.integers(0, 4, (1, BS, K)).astype(np.int32)
    images = []
    for copy in (_kernels.copy_rows, _numpy_copy_rows):
        monkeypatch.setattr(_kernels, "copy_rows", copy)
        windows = {}
        for r in FFN_RANKS:
            windows[r] = LocalWindow(dev, dev.malloc(FFN_SIZE).address, FFN_SIZE)
            windows[r].bytes[:] = 7
        for r in ATTN_RANKS:
            windows[r] = LocalWindow(dev, dev.malloc(1024).address, 1024)
        g = Group(f"a2f-copy-{seed}-{len(images)}", 4, windows, notify=None)
        send(g, x, experts=experts, quant_mode=quant,  # (int8 tokens: 64 B + their fp32 scale, in 128-byte slots)
             ffn_token_data_shape=[A, M, BS, K1, 128 if quant else HS])
        images.append([windows[r].bytes.copy() for r in FFN_RANKS])
    for fast, slow in zip(*images):
        assert np.array_equal(fast, slow)
