"""FfnWorkerBatching: stable sort by expert, sentinels dropped, group list, expert_offsets = k, both schedule modes."""
import ml_dtypes
import numpy as np
import pytest

from afd.errors import AclnnError, KernelError
from afd.layout import EXPERT_ID_INIT, EXPERT_ID_SENTINEL, FfnWindowLayout
from afd.ops import Stopped, create_schedule_context_holder, ffn_worker_batching, ffn_worker_scheduler_
from afd.ops.ffn_worker_batching import FfnBatch

A, M, BS, K1, H, E = 2, 2, 3, 3, 64, 5
N = BS * K1
HS = 512  # attn_to_ffn_token_size: bytes per FFN data slot
BF16 = np.dtype(ml_dtypes.bfloat16)




@pytest.fixture
def ffn(dev):
    layout = FfnWindowLayout(A, M, BS, K1, HS)
    win = dev.malloc(layout.total_bytes)
    holder = create_schedule_context_holder(0, A, M, BS, K1, E, HS, 512, ffn_window=win.address,
                                            ffn_window_size=layout.total_bytes, device=dev)
    holder.init()
    recs = win.view("<i4", layout.records_shape)
    data = win.view(np.uint8, (A * M * N, HS), layout.data_offset)
    yield holder.get_schedule_context(), recs, data
    holder.close()


def fill_data(data, dtype):
    """Slot g holds the row g + arange(H)/64 (every slot distinct, exact in fp16/bf16 for small g)."""
    rows = (np.arange(A * M * N)[:, None] + np.arange(H)[None, :] / 64).astype(np.float32).astype(dtype)
    data[:, :H * 2] = rows.view(np.uint8).reshape(A * M * N, H * 2)
    return rows


def expected(emitted):
    """Straightforward reference: walk (session, mb, ids) rows, t, k; keep non-sentinels; stable sort by expert."""
    items = []
    for s, mb, ids in emitted:
        for t in range(BS):
            for k in range(K1):
                e = int(ids[t * K1 + k])
                if e not in (EXPERT_ID_SENTINEL, EXPERT_ID_INIT):
                    items.append((e, s, mb, t, k))
    items.sort(key=lambda it: it[0])
    return items


def check(batch, items, rows, dtype):
    n = len(items)
    y_cap = A * BS * K1
    assert batch.actual_token_num.tolist() == [n] and batch.actual_token_num.dtype == np.int64
    assert batch.y.shape == (y_cap, H) and batch.y.dtype == dtype
    assert [tuple(v) for v in zip(batch.session_ids[:n], batch.micro_batch_ids[:n], batch.token_ids[:n],
                                  batch.expert_offsets[:n])] == [it[1:] for it in items]
    for i, (e, s, mb, t, k) in enumerate(items):
        assert np.array_equal(batch.y[i].view(np.uint16), rows[((s * M + mb) * BS + t) * K1 + k].view(np.uint16))
    assert not batch.y[n:].view(np.uint16).any() and not batch.session_ids[n:].any()
    experts = sorted({it[0] for it in items})
    gl = [[e, sum(1 for it in items if it[0] == e)] for e in experts]
    assert batch.group_list.shape == (E, 2) and batch.group_list.dtype == np.int64
    assert batch.group_list[:len(gl)].tolist() == gl
    assert batch.group_list[len(gl):].tolist() == [[0, 0]] * (E - len(gl))


@pytest.mark.parametrize("dtype,token_dtype", [(np.dtype(np.float16), 0), (BF16, 1)])
def test_need_schedule_0_consumes_the_scheduler_out_buffers(ffn, dtype, token_dtype):
    ctx, recs, data = ffn
    rows = fill_data(data, dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, E, size=(A, N)).astype(np.int32)
    ids[0, [1, 4]] = EXPERT_ID_SENTINEL
    ids[1, 2] = EXPERT_ID_INIT
    ctx.ffn.polling_index = 1
    recs[:, 1, 0] = 1
    recs[:, 1, 2:] = ids
    assert ffn_worker_scheduler_(ctx, A) == 0
    batch = ffn_worker_batching(ctx, E, [A, BS, K1, H], token_dtype, 0)
    check(batch, expected([(s, 1, ids[s]) for s in range(A)]), rows, dtype)
    assert (recs[:, 1, 2:] == EXPERT_ID_SENTINEL).all()  # the scheduler reset them, batching left them alone


def test_need_schedule_0_reads_out_num_sessions_in_emitted_order(ffn):
    ctx, recs, data = ffn
    rows = fill_data(data, np.float16)
    dev = ctx.device
    f = ctx.ffn
    ids = np.array([[4, 0, 4, 1, 1, 0, 4, 4, 0]], np.int32)  # ties: stable order by (row, t, k)
    dev.view(f.session_ids_buf, 4, "<i4")[0] = 1
    dev.view(f.micro_batch_ids_buf, 4, "<i4")[0] = 0
    dev.view(f.expert_ids_buf, 4 * N, "<i4")[:] = ids[0]
    f.out_num = 1
    batch = ffn_worker_batching(ctx, E, [A, BS, K1, H])
    items = expected([(1, 0, ids[0])])
    assert [it[0] for it in items] == [0, 0, 0, 1, 1, 4, 4, 4, 4]
    assert batch.expert_offsets[:3].tolist() == [1, 2, 2]  # the k slot of ids 1, 5, 8: (t0,k1) (t1,k2) (t2,k2)
    assert batch.token_ids[:3].tolist() == [0, 1, 2]
    check(batch, items, rows, np.dtype(np.float16))
    assert batch.group_list[:4].tolist() == [[0, 3], [1, 2], [4, 4], [0, 0]]
    assert not batch.dynamic_scale.any()
    f.out_num = 0
    empty = ffn_worker_batching(ctx, E, [A, BS, K1, H])
    assert empty.actual_token_num[0] == 0 and not empty.group_list.any()


@pytest.mark.timeout(10)
def test_need_schedule_1_polls_all_sessions_at_polling_index_then_resets(ffn):
    ctx, recs, data = ffn
    rows = fill_data(data, BF16)
    ids = np.arange(A * N).reshape(A, N).astype(np.int32) % E
    recs[:, 0, 2:] = ids
    recs[0, 0, 0] = 1
    recs[1, 0, 0] = 2  # not ready
    recs[:, 1, 0] = 1  # another micro-batch: not polled
    calls = []

    def idle(w):
        calls.append((w.micro_batch_id, w.ready))
        if len(calls) == 2:
            recs[1, 0, 0] = 1

    batch = ffn_worker_batching(ctx, E, [A, BS, K1, H], 1, 1, idle=idle)
    assert calls == [(0, 1), (0, 1)]
    check(batch, expected([(s, 0, ids[s]) for s in range(A)]), rows, BF16)
    assert ctx.ffn.polling_index == 1
    assert (recs[:, 0, 0] == 0).all() and (recs[:, 0, 2:] == EXPERT_ID_INIT).all()
    assert (recs[:, 1, 0] == 1).all()


@pytest.mark.timeout(10)
def test_need_schedule_1_raises_stopped_on_run_flag_zero(ffn):
    ctx, recs, _ = ffn
    recs[0, 0, 0] = 1
    snapshot = recs.copy()

    def idle(w):
        ctx.control.run_flag = 0

    with pytest.raises(Stopped):
        ffn_worker_batching(ctx, E, [A, BS, K1, H], 0, 1, idle=idle)
    assert ctx.ffn.polling_index == 0 and np.array_equal(recs, snapshot)


def test_int8_rows_and_dynamic_scale(ffn):
    ctx, recs, data = ffn
    q = (np.arange(A * M * N)[:, None] + np.arange(H)[None, :]) % 200 - 100
    data[:, :H] = q.astype(np.int8).view(np.uint8)
    data[:, 64:68] = (np.arange(A * M * N, dtype="<f4") / 8).view(np.uint8).reshape(-1, 4)  # at align32(H)=64
    recs[:, 0, 0] = 1
    recs[:, 0, 2:] = EXPERT_ID_SENTINEL
    recs[1, 0, 2 + 4] = 3  # session 1, token 1, k 1
    batch = ffn_worker_batching(ctx, E, [A, BS, K1, H], 2, 1)
    slot = ((1 * M + 0) * BS + 1) * K1 + 1
    assert batch.y.dtype == np.int8 and batch.actual_token_num[0] == 1
    assert np.array_equal(batch.y[0], q[slot].astype(np.int8))
    assert batch.dynamic_scale[0] == slot / 8 and not batch.dynamic_scale[1:].any()


def test_checks(ffn):
    ctx, recs, _ = ffn
    with pytest.raises(KernelError, match="max_out_shape"):
        ffn_worker_batching(ctx, E, [A, BS + 1, K1, H])
    with pytest.raises(AclnnError, match="token_dtype"):
        ffn_worker_batching(ctx, E, [A, BS, K1, H], 3)
    with pytest.raises(AclnnError, match="need_schedule"):
        ffn_worker_batching(ctx, E, [A, BS, K1, H], 0, 2)
    with pytest.raises(KernelError, match=r"expert_num: must be in \(0, 8192\]"):
        ffn_worker_batching(ctx, 8193, [A, BS, K1, H])
    with pytest.raises(KernelError, match="layer_num"):
        ffn_worker_batching(ctx, E, [A, BS, K1, H], layer_num=2)
    with pytest.raises(KernelError, match="attn_to_ffn_token_size"):
        ffn_worker_batching(ctx, E, [A, BS, K1, 300])
    dev, f = ctx.device, ctx.ffn
    dev.view(f.expert_ids_buf, 4, "<i4")[0] = E  # neither a valid id nor a sentinel
    f.out_num = 1
    with pytest.raises(KernelError, match="expert_ids: id 5"):
        ffn_worker_batching(ctx, E, [A, BS, K1, H])
    f.out_num = A + 1
    with pytest.raises(KernelError, match="ffn.out_num"):
        ffn_worker_batching(ctx, E, [A, BS, K1, H])


def _numpy_copy_rows(dst, dst_index, src, src_index, width):
    dst[dst_index, :width] = src[src_index, :width]


@pytest.mark.parametrize("seed", range(8))
def test_the_compiled_gather_equals_numpy_s_over_random_shapes(dev, monkeypatch, seed):
    """Random A, M, BS, K+1, H (odd too) and slot sizes, all three token dtypes: every output of the batching is
    the same bit for bit with the compiled row copy as with numpy's fancy indexing doing it."""
    from afd.ops import _kernels
    rng = np.random.default_rng(seed)
    a, m, bs, k1 = (int(v) for v in rng.integers(1, 4, 4))
    token_dtype = seed % 3
    h = int(rng.choice([1, 7, 64, 100, 255]))
    row = (h + 31) // 32 * 32 + 4 if token_dtype == 2 else 2 * h
    hs = (row + 511) // 512 * 512
    e = int(rng.integers(1, 9))
    layout = FfnWindowLayout(a, m, bs, k1, hs)
    win = dev.malloc(layout.total_bytes)
    holder = create_schedule_context_holder(0, a, m, bs, k1, e, hs, 512, ffn_window=win.address,
                                            ffn_window_size=layout.total_bytes, device=dev)
    holder.init()
    try:
        ctx, recs = holder.get_schedule_context(), win.view("<i4", layout.records_shape)
        data = win.view(np.uint8, (a * m * bs * k1, hs), layout.data_offset)
        data[:] = rng.integers(0, 255, data.shape, dtype=np.uint8)
        ids = rng.integers(0, e, (a, bs * k1)).astype(np.int32)
        ids[rng.random(ids.shape) < 0.2] = EXPERT_ID_SENTINEL
        outs = []
        for copy in (_kernels.copy_rows, _numpy_copy_rows):
            monkeypatch.setattr(_kernels, "copy_rows", copy)
            recs[:, 0, 0], recs[:, 0, 2:] = 1, ids
            ctx.ffn.polling_index = 0
            outs.append(ffn_worker_batching(ctx, e, [a, bs, k1, h], token_dtype, 1))
        fast, slow = outs
        for name in ("y", "group_list", "session_ids", "micro_batch_ids", "token_ids", "expert_offsets",
                     "dynamic_scale", "actual_token_num"):
            assert np.array_equal(getattr(fast, name).view(np.uint8), getattr(slow, name).view(np.uint8)), name
    finally:
        holder.close()



def test_outputs_given_are_written_in_place_and_others_allocated(ffn):
    """out=: each array of the op's shape and dtype is the one returned, its stale values gone (rows past n
    zeroed); one of another dtype is replaced by a new array. The result equals a call without out."""
    ctx, recs, data = ffn
    fill_data(data, BF16)
    dev, f = ctx.device, ctx.ffn
    dev.view(f.session_ids_buf, 4, "<i4")[0] = 1
    dev.view(f.micro_batch_ids_buf, 4, "<i4")[0] = 0
    dev.view(f.expert_ids_buf, 4 * N, "<i4")[:] = [4, 0, 4, 1, EXPERT_ID_SENTINEL, 0, 4, 4, 0]
    f.out_num = 1
    want = ffn_worker_batching(ctx, E, [A, BS, K1, H], 1)
    y_cap = want.y.shape[0]
    given = FfnBatch(np.full_like(want.y, 7), np.full_like(want.group_list, 9),
                     *(np.full(y_cap, 5, np.int32) for _ in range(4)), np.full(y_cap, 3.0, np.float32),
                     np.zeros(1, np.int64))._replace(token_ids=np.zeros(y_cap, np.int64))  # wrong dtype: not used
    got = ffn_worker_batching(ctx, E, [A, BS, K1, H], 1, out=given)
    assert int(got.actual_token_num[0]) == 8
    for name in FfnBatch._fields:
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
        assert (getattr(got, name) is getattr(given, name)) == (name != "token_ids"), name
