"""torchrun script: three ranks expose windows; then rank 1 crashes (an exception) and rank 2 is SIGTERMed, while
rank 0 waits for them in a barrier (torchrun ends it)."""
import os
import signal

import torch
import torch.distributed as dist
import torch_npu  # noqa: F401

from afd import comm
from afd.npu import hccl

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.npu.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend="hccl")
window = torch.zeros(4096 * (rank + 1), dtype=torch.uint8, device="npu")
got = hccl.exchange_windows(dist.group.WORLD, window.data_ptr(), window.numel(), zero=True)
print(f"exchanged {sorted(comm.resolve(got.group_name).windows)}\n", end="", flush=True)  # one write: ranks share an output
if rank == 1:
    raise RuntimeError("rank 1 crashes with its window exposed")
if rank == 2:
    os.kill(os.getpid(), signal.SIGTERM)
dist.barrier()
