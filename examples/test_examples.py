"""The runnable examples run as the user would run them, plus the aclnn facade they are written against."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afd import aclnn, aclrt, device
from afd.errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, KERNEL_STATUS_PARAM_INVALID
from afd.layout import CONTEXT_SIZE, ScheduleContext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.mark.timeout(60)
def test_attention_worker_scheduler_example_prints_the_documented_line():
    before = set(device.list_segments())
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE / "attention_worker_scheduler.py")], capture_output=True,
                          text=True, timeout=50, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "micro_batch_id = 0." in proc.stdout.splitlines(), proc.stdout
    assert "Traceback" not in proc.stderr
    assert set(device.list_segments()) - before == set(), "the example left /dev/shm segments behind"


# -- the aclnn facade the example calls ---------------------------------------------------------------------------

@pytest.fixture
def dev(monkeypatch):
    """A private default device for in-process aclrt/aclnn calls, closed (segments unlinked) afterwards."""
    d = device.Device()
    monkeypatch.setattr(device, "_current", d)
    yield d
    d.close()


def _context_tensor(dev, *, schedule_mode=1, run_flag=1, micro_batch_id=1, ready=True):
    """The origin document's context (M=2, BS=48, K+1=9) in device memory; returns (tensor, flags [M, BS*(K+1)])."""
    m, bs, k1 = 2, 48, 9
    info = dev.malloc(m * bs * k1 * 4)
    data = dev.malloc(100)
    flags = info.view("<i4", (m, bs * k1))
    if ready:
        flags[0] = 1
    ctx = ScheduleContext()
    ctx.set_fields({"common": {"session_num": 1, "micro_batch_num": m, "micro_batch_size": bs,
                               "selected_expert_num": k1, "expert_num": 16, "attn_to_ffn_token_size": 512,
                               "ffn_to_attn_token_size": 512, "schedule_mode": schedule_mode},
                    "control": {"run_flag": run_flag},
                    "attention": {"token_info_buf": info.address, "token_info_buf_size": info.size,
                                  "token_data_buf": data.address, "micro_batch_id": micro_batch_id}})
    buf = dev.malloc(CONTEXT_SIZE)
    tensor = aclnn.aclCreateTensor([CONTEXT_SIZE], aclnn.ACL_INT8, buf.address)
    tensor.view(np.uint8)[:] = np.frombuffer(ctx.to_bytes(), np.uint8)
    return tensor, flags


def _run(tensor, stream=None):
    status, ws, executor = aclnn.aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(tensor)
    assert (status, ws) == (0, 0)
    return aclnn.aclnnInplaceAttentionWorkerScheduler(None, ws, executor, stream), executor


@pytest.mark.timeout(10)
def test_facade_runs_the_documented_case(dev):
    tensor, flags = _context_tensor(dev)
    status, _ = _run(tensor)
    assert status == 0
    out = ScheduleContext(tensor.view(np.uint8))
    assert out.attention.micro_batch_id == 0
    assert not flags[0].any(), "the scheduler zeroes the flags it consumed"


@pytest.mark.parametrize("bad, code, words", [
    (None, ACLNN_ERR_PARAM_NULLPTR, "null"),
    (np.zeros((2, 512), np.int8), ACLNN_ERR_PARAM_INVALID, "dim must be 1"),
    (np.zeros(0, np.int8), ACLNN_ERR_PARAM_INVALID, "empty"),
    (np.zeros(256, np.float32), ACLNN_ERR_PARAM_INVALID, "dtype must be int8"),
    (np.zeros(2048, np.int8)[::2], ACLNN_ERR_PARAM_INVALID, "non-contiguous"),
])
def test_phase1_host_checks_return_the_real_status_codes(bad, code, words):
    status, ws, executor = aclnn.aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(bad)
    assert status == code and executor is None
    assert "scheduleContextRef" in aclrt.aclGetRecentErrMsg() and words in aclrt.aclGetRecentErrMsg()


@pytest.mark.timeout(10)
def test_size_is_not_checked_on_the_host_but_the_kernel_rejects_it():
    short = np.zeros(512, np.int8)
    status, ws, executor = aclnn.aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(short)
    assert status == 0 and executor is not None  # the host does not check 1024
    _, stream = aclrt.aclrtCreateStream()
    status = aclnn.aclnnInplaceAttentionWorkerScheduler(None, ws, executor, stream)
    assert status == aclrt.ACL_ERROR_RT_AICPU_EXCEPTION
    assert executor.kernel_status == KERNEL_STATUS_PARAM_INVALID
    assert "1024" in aclrt.aclGetRecentErrMsg()
    assert aclrt.aclrtSynchronizeStream(stream) == aclrt.ACL_ERROR_RT_AICPU_EXCEPTION  # sticky until the sync
    assert aclrt.aclrtSynchronizeStream(stream) == 0


@pytest.mark.timeout(10)
def test_kernel_check_failure_names_the_field(dev):
    tensor, _ = _context_tensor(dev, schedule_mode=2)
    status, executor = _run(tensor)
    assert status == aclrt.ACL_ERROR_RT_AICPU_EXCEPTION
    assert executor.error.field == "common.schedule_mode"
    assert "common.schedule_mode" in aclrt.aclGetRecentErrMsg()


@pytest.mark.timeout(10)
def test_run_flag_zero_is_a_success_and_changes_nothing(dev):
    tensor, flags = _context_tensor(dev, run_flag=0)
    status, _ = _run(tensor)
    assert status == 0
    assert ScheduleContext(tensor.view(np.uint8)).attention.micro_batch_id == 1
    assert flags[0].all()


@pytest.mark.timeout(10)
def test_executor_runs_once_and_null_executor_is_rejected(dev):
    tensor, _ = _context_tensor(dev)
    status, executor = _run(tensor)
    assert status == 0
    assert aclnn.aclnnInplaceAttentionWorkerScheduler(None, 0, executor, None) == ACLNN_ERR_PARAM_INVALID
    assert aclnn.aclnnInplaceAttentionWorkerScheduler(None, 0, None, None) == ACLNN_ERR_PARAM_NULLPTR


def test_schedule_context_object_is_accepted(dev):
    tensor, _ = _context_tensor(dev)
    ctx = ScheduleContext.on_device(dev, dev.malloc(CONTEXT_SIZE).address)
    ctx.raw[:] = tensor.view(np.uint8)
    status, _ = _run(ctx)
    assert status == 0 and ctx.attention.micro_batch_id == 0


def test_aclrt_memcpy_checks(dev):
    status, addr = aclrt.aclrtMalloc(16)
    assert status == 0 and addr != 0
    src = np.arange(16, dtype=np.uint8)
    assert aclrt.aclrtMemcpy(addr, 16, src, 16, aclrt.ACL_MEMCPY_HOST_TO_DEVICE) == 0
    back = bytearray(16)
    assert aclrt.aclrtMemcpy(back, 16, addr, 16, aclrt.ACL_MEMCPY_DEVICE_TO_HOST) == 0
    assert bytes(back) == src.tobytes()
    assert aclrt.aclrtMemcpy(back, 8, addr, 16, aclrt.ACL_MEMCPY_DEVICE_TO_HOST) == aclrt.ACL_ERROR_RT_PARAM_INVALID
    assert "destMax" in aclrt.aclGetRecentErrMsg()
    too_many = aclrt.aclrtMemcpy(addr, 32, bytes(32), 32, aclrt.ACL_MEMCPY_HOST_TO_DEVICE)
    assert too_many == aclrt.ACL_ERROR_RT_PARAM_INVALID
    assert "dst" in aclrt.aclGetRecentErrMsg()
    assert aclrt.aclrtMemcpy(0, 4, bytes(4), 4, aclrt.ACL_MEMCPY_HOST_TO_DEVICE) == aclrt.ACL_ERROR_RT_PARAM_INVALID
    assert "null" in aclrt.aclGetRecentErrMsg()
    assert aclrt.aclrtMalloc(0) == (aclrt.ACL_ERROR_RT_PARAM_INVALID, 0)
    assert aclrt.aclrtFree(addr) == 0
    assert dev.owned_segments() == []
