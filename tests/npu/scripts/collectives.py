"""torchrun script: the hccl group's collectives on npu tensors, a gloo group beside it, window exchange errors."""
import os

import torch
import torch.distributed as dist
import torch_npu  # noqa: F401

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.npu.set_device(f"npu:{int(os.environ['LOCAL_RANK'])}")
dist.init_process_group(backend="hccl")
gloo = dist.new_group(list(range(world)), backend="gloo")
pg = dist.distributed_c10d._get_default_group()
backend = pg._get_backend(torch.device("npu"))

x = torch.full((4,), float(rank + 1), device="npu")
dist.all_reduce(x)
print("all_reduce", x.tolist())
parts = [torch.zeros(2, device="npu") for _ in range(world)]
dist.all_gather(parts, torch.tensor([rank, 10 + rank], dtype=torch.float32).npu())
print("all_gather", [p.tolist() for p in parts])
b = torch.tensor([7.0 if rank == 0 else 0.0]).npu()
dist.broadcast(b, src=0)
print("broadcast", b.item())
dist.barrier()
dist.barrier(group=gloo)
cpu = torch.tensor([rank])
dist.all_reduce(cpu, group=gloo)
print("gloo", cpu.item())
print("name", backend.get_hccl_comm_name(rank) == backend.get_hccl_comm_name(0), backend.get_hccl_comm_name(rank)[:9])
try:
    backend._get_window_mem()
except Exception as exc:
    print("no window yet:", exc)
try:
    backend._window_register_and_exchange(4096, [rank])
except Exception as exc:
    print("own rank:", exc)
backend._window_register_and_exchange(4096 * (rank + 1), [1 - rank])
win = backend._get_window_mem()
print("window", win.dtype, win.numel(), win.device.type)
dist.barrier(group=gloo)
dist.destroy_process_group(gloo)
dist.destroy_process_group()
