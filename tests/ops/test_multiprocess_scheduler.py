"""The attention scheduler spinning in one OS process: released by flags from a second, or run_flag=0 from a third."""
import os
import time

import multiprocess
import numpy as np
import pytest

from afd.device import Device
from afd.errors import KERNEL_STATUS_OK
from afd.layout import ScheduleContext
from afd.ops import attention_worker_scheduler_, create_schedule_context_holder

M, BS, K1 = 2, 48, 9
FLAGS = M * BS * K1
SPAWN = multiprocess.get_context("spawn")
JOIN_S = 30


def run_scheduler(namespace, ctx_address, flags_address, spinning, results):
    """Process 1: the AICPU scheduler loop; reports status, micro_batch_id, scans and mb-0 flag sum."""
    dev = Device(namespace)
    try:
        ctx = ScheduleContext.on_device(dev, ctx_address)
        scans = []

        def idle(waiting):
            scans.append(waiting.ready)
            spinning.set()
            os.sched_yield()

        status = attention_worker_scheduler_(ctx, idle=idle)
        flags = dev.view(flags_address, FLAGS * 4, "<i4").reshape(M, BS, K1)
        results.put((status, ctx.attention.micro_batch_id, len(scans), int(flags[0].sum())))
    finally:
        dev.close()


def write_flags(namespace, flags_address, micro_batch_id, count):
    """Process 2: the FFN side's flag writes (F2A), `count` flags of one micro-batch."""
    dev = Device(namespace)
    try:
        flags = dev.view(flags_address, FLAGS * 4, "<i4").reshape(M, BS * K1)
        flags[micro_batch_id, :count] = 1
    finally:
        dev.close()


def write_run_flag_zero(namespace, ctx_address):
    """Process 3: a stopper that writes run_flag = 0 into the shared context."""
    dev = Device(namespace)
    try:
        ScheduleContext.on_device(dev, ctx_address).control.run_flag = 0
    finally:
        dev.close()


@pytest.fixture
def setup():
    dev = Device()
    win = dev.malloc(512 * 7 + FLAGS * 512)
    holder = create_schedule_context_holder(1, 1, M, BS, K1, 16, 512, 512, attention_window=win.address,
                                            attention_window_size=win.size, device=dev)
    holder.init()
    procs = []
    yield dev, holder, win, procs
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    holder.close()
    dev.close()


def start(procs, target, *args):
    p = SPAWN.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def spinning_scheduler(dev, holder, win, procs):
    spinning, results = SPAWN.Event(), SPAWN.Queue()
    sched = start(procs, run_scheduler, dev.namespace, holder.context_address, win.address, spinning, results)
    assert spinning.wait(JOIN_S), "the scheduler process never started polling"
    return sched, results


def finish(sched, results):
    t0 = time.monotonic()
    sched.join(JOIN_S)
    assert not sched.is_alive(), "the scheduler did not return in bounded time"
    assert sched.exitcode == 0
    return results.get(timeout=5), time.monotonic() - t0


@pytest.mark.timeout(120)
def test_flags_written_by_another_process_release_the_scheduler(setup):
    dev, holder, win, procs = setup
    ctx = holder.get_schedule_context()
    assert ctx.attention.micro_batch_id == 1  # documented example: M=2, micro_batch_id=1 -> polls mb 0
    sched, results = spinning_scheduler(dev, holder, win, procs)
    writer = start(procs, write_flags, dev.namespace, win.address, 0, BS * K1)
    writer.join(JOIN_S)
    assert writer.exitcode == 0
    (status, mb, scans, mb0_sum), took = finish(sched, results)
    assert status == KERNEL_STATUS_OK and mb == 0 and scans >= 1 and mb0_sum == 0
    assert ctx.attention.micro_batch_id == 0
    assert not win.view("<i4", (M, BS, K1))[0].any()


@pytest.mark.timeout(120)
def test_run_flag_zero_from_a_third_process_stops_it(setup):
    dev, holder, win, procs = setup
    ctx = holder.get_schedule_context()
    sched, results = spinning_scheduler(dev, holder, win, procs)
    writer = start(procs, write_flags, dev.namespace, win.address, 0, BS * K1 - 1)  # one flag short
    writer.join(JOIN_S)
    assert writer.exitcode == 0
    assert sched.is_alive()  # still waiting for the last flag
    stopper = start(procs, write_run_flag_zero, dev.namespace, holder.context_address)
    stopper.join(JOIN_S)
    assert stopper.exitcode == 0
    (status, mb, scans, mb0_sum), _ = finish(sched, results)
    assert status == KERNEL_STATUS_OK and mb == 1 and mb0_sum == BS * K1 - 1  # nothing reset, id unchanged
    assert ctx.attention.micro_batch_id == 1 and ctx.control.run_flag == 0


@pytest.mark.timeout(120)
def test_holder_stop_schedule_is_visible_to_a_spinning_process(setup):
    dev, holder, win, procs = setup
    sched, results = spinning_scheduler(dev, holder, win, procs)
    holder.stop_schedule()
    (status, mb, scans, mb0_sum), _ = finish(sched, results)
    assert status == KERNEL_STATUS_OK and mb == 1 and mb0_sum == 0
    assert np.array_equal(win.view("<i4", (M, BS, K1)), np.zeros((M, BS, K1), np.int32))
