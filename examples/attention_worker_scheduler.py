"""The aclnnInplaceAttentionWorkerScheduler sample program of the origin document, ported step by step."""
from __future__ import annotations

import sys

import numpy as np

from afd.aclnn import (
    ACL_INT8,
    aclCreateTensor,
    aclDestroyTensor,
    aclnnInplaceAttentionWorkerScheduler,
    aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize,
)
from afd.aclrt import (
    ACL_MEM_MALLOC_HUGE_FIRST,
    ACL_MEMCPY_DEVICE_TO_HOST,
    ACL_MEMCPY_HOST_TO_DEVICE,
    ACL_SUCCESS,
    aclFinalize,
    aclInit,
    aclrtCreateStream,
    aclrtDestroyStream,
    aclrtFree,
    aclrtMalloc,
    aclrtMemcpy,
    aclrtResetDevice,
    aclrtSetDevice,
    aclrtSynchronizeStream,
)
from afd.layout import CONTEXT_SIZE, ScheduleContext


def LOG_PRINT(message: str, *args) -> None:
    print(message % args, end="")


def Init(device_id: int):
    """(Fixed boilerplate) aclInit, aclrtSetDevice, aclrtCreateStream; returns (status, stream)."""
    ret = aclInit(None)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclInit failed. ERROR: %d\n", ret)
        return ret, None
    ret = aclrtSetDevice(device_id)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtSetDevice failed. ERROR: %d\n", ret)
        return ret, None
    ret, stream = aclrtCreateStream()
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtCreateStream failed. ERROR: %d\n", ret)
    return ret, stream


def Finalize(device_id: int, stream) -> None:
    aclrtDestroyStream(stream)
    aclrtResetDevice(device_id)  # also unlinks anything an early return left allocated: no /dev/shm leak
    aclFinalize()


def CreateAclTensor(host_data: bytes, shape: list[int], data_type: int):
    """aclrtMalloc + aclrtMemcpy(host->device) + aclCreateTensor; returns (status, device_addr, tensor)."""
    size = int(np.prod(shape))
    ret, device_addr = aclrtMalloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtMalloc failed. ERROR: %d\n", ret)
        return ret, 0, None
    ret = aclrtMemcpy(device_addr, size, host_data, size, ACL_MEMCPY_HOST_TO_DEVICE)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtMemcpy failed. ERROR: %d\n", ret)
        return ret, device_addr, None
    return ACL_SUCCESS, device_addr, aclCreateTensor(shape, data_type, device_addr)


def aclnnAttentionWorkerSchedulerTest(device_id: int, stream) -> int:
    # 2. Build the inputs: the host ScheduleContext (the 1024-byte #pragma pack(1) struct).
    host = ScheduleContext()
    host.common.session_num = 1
    host.common.micro_batch_num = 2
    host.common.micro_batch_size = 48
    host.common.selected_expert_num = 9
    host.common.expert_num = 16
    host.common.attn_to_ffn_token_size = 512
    host.common.ffn_to_attn_token_size = 512
    host.common.schedule_mode = 1  # attention
    host.control.run_flag = 1  # running
    host.attention.micro_batch_id = 1

    # sizeof(AttentionDataDesc) is 0 (int32_t flag[0]): one record is BS*(K+1) int32 flags.
    per_data_desc_size = 0 + 4 * host.common.micro_batch_size * host.common.selected_expert_num
    expect_token_info_buf_size = host.common.micro_batch_num * per_data_desc_size
    ret, token_buf_device_addr = aclrtMalloc(expect_token_info_buf_size, ACL_MEM_MALLOC_HUGE_FIRST)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtMalloc failed. ERROR: %d\n", ret)
        return ret
    host.attention.token_info_buf = token_buf_device_addr
    host.attention.token_info_buf_size = expect_token_info_buf_size

    # Set every flag of the target micro-batch (0) to 1: the scheduler polls (micro_batch_id + 1) % M.
    target_micro_batch_id = 0
    data_desc_flag = host.attention.token_info_buf + per_data_desc_size * target_micro_batch_id
    flag_num = host.common.micro_batch_size * host.common.selected_expert_num
    host_flags = np.ones(flag_num, dtype=np.int32)
    ret = aclrtMemcpy(data_desc_flag, flag_num * 4, host_flags, host_flags.nbytes, ACL_MEMCPY_HOST_TO_DEVICE)
    if ret != ACL_SUCCESS:
        LOG_PRINT("copy flags from host to device failed. ERROR: %d\n", ret)
        return ret

    token_data_buf_size = 100
    ret, token_data_device_addr = aclrtMalloc(token_data_buf_size, ACL_MEM_MALLOC_HUGE_FIRST)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtMalloc failed. ERROR: %d\n", ret)
        return ret
    host.attention.token_data_buf = token_data_device_addr  # (the original leaves token_data_buf_size at 0)

    # Create the scheduleContext aclTensor: int8, shape (1024), in device memory.
    schedule_context_shape = [CONTEXT_SIZE]
    ret, schedule_context_device_addr, schedule_context_ref = CreateAclTensor(
        host.to_bytes(), schedule_context_shape, ACL_INT8)
    if ret != ACL_SUCCESS:
        return ret

    # 3. Call the CANN operator API: phase 1 (checks, workspace size, executor), then phase 2 (run).
    ret, workspace_size, executor = aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(schedule_context_ref)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize failed. ERROR: %d\n", ret)
        return ret
    workspace_addr = 0
    if workspace_size > 0:
        ret, workspace_addr = aclrtMalloc(workspace_size, ACL_MEM_MALLOC_HUGE_FIRST)
        if ret != ACL_SUCCESS:
            LOG_PRINT("allocate workspace failed. ERROR: %d\n", ret)
            return ret
    ret = aclnnInplaceAttentionWorkerScheduler(workspace_addr, workspace_size, executor, stream)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclnnInplaceAttentionWorkerScheduler failed. ERROR: %d\n", ret)
        return ret

    # 4. (Fixed boilerplate) wait for the stream.
    ret = aclrtSynchronizeStream(stream)
    if ret != ACL_SUCCESS:
        LOG_PRINT("aclrtSynchronizeStream failed. ERROR: %d\n", ret)
        return ret

    # 5. Copy the result from device to host and print it.
    size = int(np.prod(schedule_context_shape))
    result_data = np.zeros(size, dtype=np.int8)
    ret = aclrtMemcpy(result_data, result_data.nbytes, schedule_context_device_addr, size, ACL_MEMCPY_DEVICE_TO_HOST)
    if ret != ACL_SUCCESS:
        LOG_PRINT("copy result from device to host failed. ERROR: %d\n", ret)
        return ret
    out_schedule_context = ScheduleContext.from_bytes(result_data.tobytes())
    LOG_PRINT("micro_batch_id = %u.\n", out_schedule_context.attention.micro_batch_id)

    # 6. Release the aclTensor (drop our views so the mappings can close).
    aclDestroyTensor(schedule_context_ref)
    del schedule_context_ref, executor

    # 7. Release device resources.
    aclrtFree(schedule_context_device_addr)
    aclrtFree(token_buf_device_addr)
    aclrtFree(token_data_device_addr)
    if workspace_size > 0:
        aclrtFree(workspace_addr)
    return ACL_SUCCESS


def main() -> int:
    # 1. (Fixed boilerplate) device/stream initialisation.
    device_id = 0
    ret, stream = Init(device_id)
    if ret != ACL_SUCCESS:
        LOG_PRINT("Init acl failed. ERROR: %d\n", ret)
        Finalize(device_id, stream)
        return ret
    try:
        ret = aclnnAttentionWorkerSchedulerTest(device_id, stream)
        if ret != ACL_SUCCESS:
            LOG_PRINT("aclnnAttentionWorkerSchedulerTest failed. ERROR: %d\n", ret)
            return ret
    finally:
        Finalize(device_id, stream)
    return 0


if __name__ == "__main__":
    sys.exit(1 if main() else 0)  # an ACL status (e.g. 161002) would be truncated mod 256 by the shell
