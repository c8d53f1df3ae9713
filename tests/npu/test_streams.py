"""torch.npu streams and events: operators return at once and run in order; events order streams; syncs wait."""
import threading
import time

import pytest
import torch
import torch_npu
from npu_helpers import attention_side, expected_combine

from afd.npu import operators
from afd.npu.streams import StreamError


@pytest.mark.timeout(30)
def test_a_spinning_combine_returns_at_once_and_the_host_goes_on():
    side = attention_side()
    scales = torch.rand(side.BS, side.K).npu()
    side.data[0].copy_(torch.randn(side.data[0].shape).to(torch.bfloat16))
    s1 = torch.npu.Stream()
    operators._ensure_warm(1)  # a process's first AFD call loads the operators and their kernels: not timed here
    t0 = time.monotonic()
    with torch.npu.stream(s1):
        y, next_layer = torch_npu.npu_attention_worker_combine(side.context, scales, torch.tensor([4]).int().npu(),
                                                               side.H, token_dtype=1, need_schedule=1)
    assert time.monotonic() - t0 < 1.0 and not s1.query()  # the host is back while the op waits for flags
    time.sleep(0.2)
    assert not s1.query()
    side.flags[0].fill_(1)  # the peer's F2A, played by the default stream (idle, so it runs now)
    s1.synchronize()
    assert y.cpu().view(torch.int16).equal(expected_combine(side, 0, scales).view(torch.int16))
    assert next_layer.item() == 5
    assert side.flags[0].sum().item() == 0  # need_schedule=1 zeroes the flags it consumed
    assert side.holder.get_schedule_context_info().endswith("micro_batch_id=0;")


@pytest.mark.timeout(30)
def test_work_queued_behind_a_waiting_op_runs_after_it_in_order():
    side = attention_side()
    scales = torch.rand(side.BS, side.K).npu()
    y, _ = torch_npu.npu_attention_worker_combine(side.context, scales, torch.zeros(1, dtype=torch.int32).npu(),
                                                  side.H, token_dtype=1, need_schedule=1)
    z = y.float() * 2  # queued behind the combine on the same stream: must see its output
    threading.Timer(0.2, _peer_sets_flags, (side, 0)).start()
    torch.npu.synchronize()
    assert z.cpu().equal(y.cpu().float() * 2)


def _peer_sets_flags(side, mb):
    """What a peer's remote write does: plain stores into this rank's window, outside any stream."""
    from afd.npu.tensors import as_cpu
    as_cpu(side.flags)[mb] = 1


@pytest.mark.timeout(30)
def test_events_order_streams():
    s1, s2 = torch.npu.Stream(), torch.npu.Stream()
    x = torch.zeros(1000, device="npu")
    gate = threading.Event()
    with torch.npu.stream(s1):
        s1.launch(lambda: gate.wait(5), "slow work")  # s1 is busy: what follows is queued
        x.fill_(3)
        done = torch.npu.Event()
        done.record()
    with torch.npu.stream(s2):
        done.wait()
        y = x + 1  # s2 waits for s1's fill through the event
    assert not s2.query()
    gate.set()
    s2.synchronize()
    assert y.cpu().unique().tolist() == [4.0]
    assert done.query()


@pytest.mark.timeout(30)
def test_a_kernel_error_is_kept_and_raised_at_the_next_sync():
    side = attention_side()
    side.holder._impl.get_schedule_context().attention.micro_batch_id = 9  # out of range [0, M)
    torch_npu.attention_worker_scheduler_(side.context)  # returns at once; the kernel check fails on the stream
    with pytest.raises(StreamError, match=r"attention_worker_scheduler_ failed: .*micro_batch_id\[9\] is out of "
                                          r"range \[0,2\).*507018"):
        torch.npu.synchronize()
    torch.npu.synchronize()  # raised once


def test_current_and_default_streams_are_per_device_and_thread():
    s = torch.npu.Stream()
    assert torch.npu.current_stream() == torch.npu.default_stream()
    with torch.npu.stream(s):
        assert torch.npu.current_stream() == s
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.npu.current_stream()))
        t.start()
        t.join()
        assert seen == [torch.npu.default_stream()]
    assert torch.npu.current_stream() == torch.npu.default_stream()
    x = torch.ones(4, device="npu")
    x.record_stream(s)  # accepted (nothing to do: queued work keeps its tensors alive)


@pytest.mark.timeout(30)
def test_an_in_place_op_of_the_wrong_shape_behind_pending_work_fails_at_the_call():
    """Queued behind a waiting combine, add_ of a mismatched shape is refused at the call by its meta kernel (as on
    an idle stream), after the work before it, not later on the stream where it would fail every kernel after it."""
    from afd.npu.tensors import numpy_of
    side = attention_side()
    scales = torch.rand(side.BS, side.K).npu()
    y, _ = torch_npu.npu_attention_worker_combine(side.context, scales, torch.zeros(1, dtype=torch.int32).npu(),
                                                  side.H, token_dtype=1, need_schedule=1)
    a, b = torch.zeros(4, 8).npu(), torch.zeros(3, 8).npu()
    flags = numpy_of(side.flags)
    threading.Timer(0.3, lambda: flags[0].fill(1)).start()  # the peer's F2A, from outside the streams
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):  # (the CPU kernel's own words)
        a.add_(b)
    torch.npu.synchronize()  # nothing was left failed on the stream
    assert y.cpu().view(torch.int16).equal(expected_combine(side, 0, scales).view(torch.int16))
