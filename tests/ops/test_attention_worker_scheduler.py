"""AttentionWorkerScheduler: the documented example, run_flag exits, checks, and what counts as ready."""
import threading

import numpy as np
import pytest

from afd.errors import KERNEL_STATUS_OK, KernelError
from afd.layout import ScheduleContext, align512
from afd.ops import attention_worker_scheduler_

M, BS, K1 = 2, 48, 9




def make_ctx(dev, m=M, bs=BS, k1=K1, micro_batch_id=1):
    info = m * bs * k1 * 4
    win = dev.malloc(align512(info) + 512)
    ctx = ScheduleContext.on_device(dev, dev.malloc(1024).address)
    ctx.set_fields({"common": {"schedule_mode": 1, "micro_batch_num": m, "micro_batch_size": bs,
                               "selected_expert_num": k1},
                    "control": {"run_flag": 1},
                    "attention": {"token_info_buf": win.address, "token_info_buf_size": info,
                                  "token_data_buf": win.address + align512(info), "token_data_buf_size": 512,
                                  "micro_batch_id": micro_batch_id}})
    flags = win.view("<i4", (m, bs, k1))
    return ctx, flags


def test_documented_example_all_flags_of_mb0_ready(dev):
    ctx, flags = make_ctx(dev)
    flags[0] = 1
    flags[1] = 1  # the other micro-batch must be left alone
    assert attention_worker_scheduler_(ctx) == KERNEL_STATUS_OK
    assert ctx.attention.micro_batch_id == 0
    assert not flags[0].any()
    assert (flags[1] == 1).all()


def test_run_flag_zero_on_entry_changes_nothing(dev):
    ctx, flags = make_ctx(dev)
    flags[0] = 1
    ctx.control.run_flag = 0
    before = ctx.to_bytes()
    calls = []
    assert attention_worker_scheduler_(ctx, idle=calls.append) == KERNEL_STATUS_OK
    assert ctx.to_bytes() == before
    assert (flags[0] == 1).all()
    assert calls == []  # exits before any scan


@pytest.mark.parametrize("bad", [2, -1, 0])
@pytest.mark.timeout(10)
def test_flags_other_than_one_are_not_ready(dev, bad):
    ctx, flags = make_ctx(dev)
    flags[0] = 1
    flags[0, 5, 3] = bad
    seen = []

    def idle(waiting):
        seen.append(waiting.ready)
        if len(seen) == 3:
            ctx.control.run_flag = 0

    assert attention_worker_scheduler_(ctx, idle=idle) == KERNEL_STATUS_OK
    assert seen == [BS * K1 - 1] * 3
    assert ctx.attention.micro_batch_id == 1  # not advanced
    assert flags[0, 5, 3] == bad and (flags[0].sum() - bad) == BS * K1 - 1  # not reset


@pytest.mark.timeout(10)
def test_waits_then_completes_when_last_flag_arrives(dev):
    ctx, flags = make_ctx(dev, micro_batch_id=0)  # polls mb 1
    flags[1] = 1
    flags[1, -1, -1] = 0
    calls = []

    def idle(waiting):
        calls.append(waiting.micro_batch_id)
        if len(calls) == 5:
            flags[1, -1, -1] = 1

    assert attention_worker_scheduler_(ctx, idle=idle) == KERNEL_STATUS_OK
    assert calls == [1] * 5
    assert ctx.attention.micro_batch_id == 1
    assert not flags[1].any()


@pytest.mark.timeout(10)
def test_stop_from_another_thread_ends_the_spin(dev):
    ctx, flags = make_ctx(dev)
    started = threading.Event()

    def idle(waiting):
        started.set()

    result = []
    t = threading.Thread(target=lambda: result.append(attention_worker_scheduler_(ctx, idle=idle)))
    t.start()
    assert started.wait(5)
    ctx.control.run_flag = 0
    t.join(5)
    assert result == [KERNEL_STATUS_OK]
    assert ctx.attention.micro_batch_id == 1


def test_stop_wins_over_simultaneous_ready(dev):
    ctx, flags = make_ctx(dev)

    def idle(waiting):  # both become true before the next scan
        flags[0] = 1
        ctx.control.run_flag = 0

    ctx.control.run_flag = 1
    assert attention_worker_scheduler_(ctx, idle=idle) == KERNEL_STATUS_OK
    assert ctx.attention.micro_batch_id == 1 and (flags[0] == 1).all()


def test_schedule_mode_2_is_a_parameter_error(dev):
    ctx, _ = make_ctx(dev)
    ctx.common.schedule_mode = 2
    with pytest.raises(KernelError, match="common.schedule_mode"):
        attention_worker_scheduler_(ctx)


def test_micro_batch_id_out_of_range(dev):
    ctx, _ = make_ctx(dev, micro_batch_id=M)
    with pytest.raises(KernelError, match=r"micro_batch_id\[2\] is out of range \[0,2\)"):
        attention_worker_scheduler_(ctx)


@pytest.mark.parametrize("field,value,match", [
    ("attention.token_info_buf", 0, "attention.token_info_buf: must be a non-null"),
    ("attention.token_data_buf", 0, "attention.token_data_buf: must be a non-null"),
    ("attention.token_info_buf_size", M * BS * K1 * 4 - 1, "attention.token_info_buf_size"),
    ("common.micro_batch_size", 0, "common.micro_batch_size: must be > 0"),
])
def test_null_and_small_buffers_name_the_field(dev, field, value, match):
    ctx, _ = make_ctx(dev)
    ctx.set_fields({field: value})
    with pytest.raises(KernelError, match=match):
        attention_worker_scheduler_(ctx)


def test_context_tensor_must_be_1d_and_1024_bytes():
    with pytest.raises(KernelError, match="rank must be 1"):
        attention_worker_scheduler_(np.zeros((2, 1024), np.int8))
    with pytest.raises(KernelError, match=">= 1024"):
        attention_worker_scheduler_(np.zeros(1000, np.int8))
