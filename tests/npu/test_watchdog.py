"""Waits that never hang: a stall raises within the bound naming what is missing; run_flag = 0 ends a spin with OK."""
import threading
import time

import pytest
import torch
import torch_npu
from npu_helpers import attention_side

from afd.npu.streams import StreamError
from afd.waiting import Stall


@pytest.fixture
def stall_1s(monkeypatch):
    monkeypatch.setenv("AFD_NPU_STALL_TIMEOUT_S", "1")


@pytest.mark.timeout(30)
def test_a_combine_whose_flags_never_arrive_raises_within_the_bound_naming_the_missing_slots(stall_1s):
    side = attention_side(M=2, BS=4, K=2)
    side.flags[0].fill_(1)
    side.flags[0, 3, 1] = 0  # one slot of micro-batch 0 never comes back
    scales = torch.rand(side.BS, side.K).npu()
    t0 = time.monotonic()
    torch_npu.npu_attention_worker_combine(side.context, scales, torch.zeros(1, dtype=torch.int32).npu(), side.H,
                                           token_dtype=1, need_schedule=1)
    with pytest.raises(StreamError) as info:
        torch.npu.synchronize()
    waited = time.monotonic() - t0
    assert 1.0 <= waited < 3.0
    message = str(info.value)
    assert "npu_attention_worker_combine" in message and "stalled" in message
    assert "micro_batch_id 0" in message and "(11/12 ready)" in message
    assert "missing: mb 0 token 3 slot 1" in message
    assert isinstance(info.value.error, Stall) and info.value.error.details[0]["expert_slot"] == 1
    assert side.flags[0].sum().item() == 11  # nothing was reset


@pytest.mark.timeout(30)
def test_stop_schedule_from_another_thread_ends_a_spinning_combine_with_ok(stall_1s):
    side = attention_side()
    scales = torch.rand(side.BS, side.K).npu()
    threading.Timer(0.3, side.holder.stop_schedule).start()
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="ended by run_flag = 0"):
        y, next_layer = torch_npu.npu_attention_worker_combine(side.context, scales,
                                                               torch.tensor([2], dtype=torch.int32).npu(), side.H,
                                                               token_dtype=1, need_schedule=1)
        torch.npu.synchronize()  # OK: no error
    assert time.monotonic() - t0 < 1.0  # ended by the stop, well before the 1 s stall bound
    assert "run_flag=0" in side.holder.get_schedule_context_info()
    assert side.holder.get_schedule_context_info().endswith("micro_batch_id=1;")  # unchanged (M - 1)


@pytest.mark.timeout(30)
def test_the_schedulers_return_ok_on_run_flag_0_without_resetting(stall_1s):
    side = attention_side()
    side.flags[0, :2].fill_(1)  # half ready
    threading.Timer(0.2, side.holder.stop_schedule).start()
    torch_npu.attention_worker_scheduler_(side.context)
    torch.npu.synchronize()
    assert side.flags[0].sum().item() == 2 * (side.K + 1)  # flags untouched
    assert side.holder.get_schedule_context_info().endswith("micro_batch_id=1;")


def test_a_bad_stall_bound_names_the_variable(monkeypatch):
    from afd.errors import AfdError
    from afd.npu.watchdog import stall_timeout_s
    monkeypatch.setenv("AFD_NPU_STALL_TIMEOUT_S", "soon")
    with pytest.raises(AfdError, match="AFD_NPU_STALL_TIMEOUT_S: must be a number of seconds, got 'soon'"):
        stall_timeout_s()
