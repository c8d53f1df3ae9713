"""FfnWorkerScheduler: all-sync and grouped modes, polling_index, out buffers, record reset, checks."""
import threading

import numpy as np
import pytest

from afd.errors import KERNEL_STATUS_OK, AclnnError, KernelError
from afd.layout import EXPERT_ID_SENTINEL
from afd.ops import ffn_worker_scheduler_

A, M, BS, K1 = 4, 2, 2, 3
N = BS * K1




@pytest.fixture
def ffn(ffn_window):
    ctx, recs, _ = ffn_window(A, M, BS, K1)
    return ctx, recs


def out(ctx):
    f = ctx.ffn
    dev = ctx.device
    return (dev.view(f.layer_ids_buf, 4 * A, "<i4").tolist(), dev.view(f.session_ids_buf, 4 * A, "<i4").tolist(),
            dev.view(f.micro_batch_ids_buf, 4 * A, "<i4").tolist(),
            dev.view(f.expert_ids_buf, 4 * A * N, "<i4").reshape(A, N))


def ready(recs, sessions, mb, layer=3):
    for s in sessions:
        recs[s, mb, 0] = 1
        recs[s, mb, 1] = layer + s
        recs[s, mb, 2:] = np.arange(N) + 10 * s + 100 * mb


def test_all_sync_emits_every_session_and_advances_polling_index(ffn):
    ctx, recs = ffn
    ready(recs, range(A), 0)
    ready(recs, range(A), 1)
    before_mb1 = recs[:, 1].copy()
    assert ffn_worker_scheduler_(ctx, A) == KERNEL_STATUS_OK
    layers, sessions, mbs, experts = out(ctx)
    assert ctx.ffn.out_num == A
    assert layers == [3, 4, 5, 6] and sessions == [0, 1, 2, 3] and mbs == [0, 0, 0, 0]
    assert np.array_equal(experts, np.arange(N)[None, :] + 10 * np.arange(A)[:, None])
    assert (recs[:, 0, 0] == 0).all() and (recs[:, 0, 2:] == EXPERT_ID_SENTINEL).all()
    assert (recs[:, 0, 1] == [3, 4, 5, 6]).all()  # layer id is left as it was
    assert np.array_equal(recs[:, 1], before_mb1)
    assert ctx.ffn.polling_index == 1
    assert ffn_worker_scheduler_(ctx, A) == KERNEL_STATUS_OK  # next call takes mb 1 and wraps
    assert out(ctx)[2] == [1, 1, 1, 1] and ctx.ffn.polling_index == 0


@pytest.mark.parametrize("bad", [2, -1])
@pytest.mark.timeout(10)
def test_all_sync_waits_for_polling_index_only_and_exact_ones(ffn, bad):
    ctx, recs = ffn
    ready(recs, range(A), 1)  # ready, but not the polled micro-batch
    ready(recs, range(A), 0)
    recs[2, 0, 0] = bad
    ctx.ffn.out_num = 3  # stale value: reset to 0 on entry
    snapshot = recs.copy()
    seen = []

    def idle(w):
        seen.append((w.micro_batch_id, w.ready))
        if len(seen) == 3:
            ctx.control.run_flag = 0

    assert ffn_worker_scheduler_(ctx, A, idle=idle) == KERNEL_STATUS_OK
    assert seen == [(0, A - 1)] * 3
    assert ctx.ffn.out_num == 0 and ctx.ffn.polling_index == 0
    assert np.array_equal(recs, snapshot)


def test_grouped_mode_emits_lowest_ready_micro_batch_per_group(ffn):
    ctx, recs = ffn
    ready(recs, [0, 1], 1)  # group 0 ready at mb 1 only
    ready(recs, [2, 3], 0)  # group 1 ready at mb 0 and 1: takes 0
    ready(recs, [2, 3], 1)
    recs[0, 0, 0] = 1  # half of group 0 at mb 0 does not make it ready
    assert ffn_worker_scheduler_(ctx, 2) == KERNEL_STATUS_OK
    layers, sessions, mbs, experts = out(ctx)
    assert ctx.ffn.out_num == 4
    assert sessions == [0, 1, 2, 3] and mbs == [1, 1, 0, 0]
    assert experts[0, 0] == 100 and experts[2, 0] == 20
    assert (recs[[0, 1], 1, 0] == 0).all() and (recs[[2, 3], 0, 0] == 0).all()
    assert (recs[[2, 3], 1, 0] == 1).all() and recs[0, 0, 0] == 1  # left for later
    assert ctx.ffn.polling_index == 0  # not used in grouped mode


@pytest.mark.timeout(10)
def test_grouped_mode_waits_then_emits_only_ready_groups(ffn):
    ctx, recs = ffn
    n = []

    def idle(w):
        n.append(1)
        if len(n) == 2:
            ready(recs, [3], 1)  # sync_group_size 1: session 3 alone is a group

    assert ffn_worker_scheduler_(ctx, 1, idle=idle) == KERNEL_STATUS_OK
    assert len(n) == 2
    assert ctx.ffn.out_num == 1 and out(ctx)[1][0] == 3 and out(ctx)[2][0] == 1


@pytest.mark.timeout(10)
def test_stop_from_another_thread(ffn):
    ctx, recs = ffn
    spinning = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(ffn_worker_scheduler_(ctx, 2, idle=lambda w: spinning.set())))
    t.start()
    assert spinning.wait(5)
    ctx.control.run_flag = 0
    t.join(5)
    assert result == [KERNEL_STATUS_OK] and ctx.ffn.out_num == 0


def test_run_flag_zero_on_entry(ffn):
    ctx, recs = ffn
    ready(recs, range(A), 0)
    snapshot = recs.copy()
    ctx.control.run_flag = 0
    assert ffn_worker_scheduler_(ctx, A) == KERNEL_STATUS_OK
    assert ctx.ffn.out_num == 0 and np.array_equal(recs, snapshot)


@pytest.mark.parametrize("size", [0, 3, 5, -1])
def test_sync_group_size_must_divide_session_num(ffn, size):
    ctx, _ = ffn
    with pytest.raises(KernelError, match=r"sync_group_size: must be in \[1, 4\] and divide session_num 4"):
        ffn_worker_scheduler_(ctx, size)


def test_host_checks(ffn):
    ctx, _ = ffn
    with pytest.raises(AclnnError, match="execute_mode.*161002"):
        ffn_worker_scheduler_(ctx, A, execute_mode=1)
    with pytest.raises(AclnnError, match="schedule_context: must not be null.*161001"):
        ffn_worker_scheduler_(None, A)
    with pytest.raises(AclnnError, match="schedule_context.*161002"):
        ffn_worker_scheduler_(np.zeros((2, 1024), np.int8), A)


@pytest.mark.parametrize("field,value,match", [
    ("common.schedule_mode", 1, "common.schedule_mode"),
    ("ffn.polling_index", M, r"polling_index\[2\] is out of range \[0,2\)"),
    ("ffn.token_info_buf", 0, "ffn.token_info_buf: must be a non-null"),
    ("ffn.token_info_buf_size", A * M * (8 + 4 * N) - 1, "ffn.token_info_buf_size"),
    ("ffn.expert_ids_buf", 0, "ffn.expert_ids_buf: must be a non-null"),
    ("ffn.session_ids_buf_size", 4 * A - 1, "ffn.session_ids_buf_size"),
    ("common.session_num", 0, "common.session_num: must be > 0"),
])
def test_context_checks_name_the_field(ffn, field, value, match):
    ctx, _ = ffn
    ctx.set_fields({field: value})
    with pytest.raises(KernelError, match=match):
        ffn_worker_scheduler_(ctx, 1)
