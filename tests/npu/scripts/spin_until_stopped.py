"""torchrun script: both ranks spin in an operator that nothing will feed, until `afd stop` writes run_flag = 0."""
import os

import torch
import torch.distributed as dist
import torch_npu

rank = int(os.environ["RANK"])
torch.npu.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend="hccl")
window = torch.zeros(1 << 16, dtype=torch.int8).npu()
common = dict(session_num=1, micro_batch_num=1, micro_batch_size=4, selected_expert_num=3, expert_num=4,
              attn_to_ffn_token_size=512, ffn_to_attn_token_size=512)
if rank == 1:
    holder = torch_npu._afd.create_schedule_context_holder(schedule_mode=1, attention_window=window.data_ptr(),
                                                           attention_window_size=window.numel(), **common)
    y, _ = torch_npu.npu_attention_worker_combine(holder.get_schedule_context_tensor(), torch.rand(4, 2).npu(),
                                                  torch.zeros(1, dtype=torch.int32).npu(), 64, token_dtype=1,
                                                  need_schedule=1)
else:
    holder = torch_npu._afd.create_schedule_context_holder(schedule_mode=0, ffn_window=window.data_ptr(),
                                                           ffn_window_size=window.numel(), **common)
    torch_npu.npu_ffn_worker_batching(holder.get_schedule_context_tensor(), 4, [1, 4, 3, 64], token_dtype=1,
                                      need_schedule=1)
print("spinning", flush=True)
torch.npu.synchronize()
print("stopped:", "run_flag=0" in holder.get_schedule_context_info())
dist.destroy_process_group()
