"""torchrun script: a window group built as afd-plugin builds it (tcp:// rendezvous, PrefixStore,
_new_process_group_helper), plain npu tensors of different sizes as windows, writes through the operators' path.

Argument: the free port of the group's tcp:// rendezvous. Prints one line per check; the test reads them.
"""
import os
import sys
import threading
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch_npu  # noqa: F401
from torch.distributed import Backend
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world
from torch.distributed.rendezvous import rendezvous

from afd import comm
from afd.errors import AfdError
from afd.npu import hccl

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
port = int(sys.argv[1])
torch.npu.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend="hccl")  # the worker's world group (vLLM has one; dist.get_rank(group) needs it)
gloo = dist.new_group(list(range(world)), backend="gloo")


def say(*args):
    print(" ".join(map(str, args)), flush=True)  # one write: torchrun's --tee prefixes each


# afd-plugin's init_afd_process_group. A vLLM worker is no torchelastic worker: with this set, the tcp://
# rendezvous below would make every rank a client of a store nobody serves.
os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
timeout = timedelta(seconds=60)
store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", rank, world, timeout=timeout))
store.set_timeout(timeout)
pg, _ = _new_process_group_helper(world, rank, [], Backend("hccl"), PrefixStore("afd_window", store),
                                  group_name="afd_window", backend_options=None, timeout=timeout)
_world.pg_group_ranks[pg] = {i: i for i in range(world)}
say("group", dist.get_rank(pg), dist.get_world_size(pg), pg.group_name)
name = pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank, init_comm=False)
world_name = dist.distributed_c10d._get_default_group()._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
say("comm name", name.startswith("afd_hccl_"), name != world_name, comm.resolve(name).world_size)
say("no windows yet", comm.resolve(name).windows == {})

# windows as serving code makes them; rank 1's starts 512 bytes into its tensor, whose other bytes stay as they are
size = 8192 * (rank + 1)
lead = 512 if rank == 1 else 0
tensor = torch.full((lead + size,), 0xEE, dtype=torch.uint8, device="npu")
address = tensor.data_ptr() + lead

for args in ((0, size), (address, tensor.numel() + 1)):
    try:
        hccl.exchange_windows(pg, *args)
    except AfdError as exc:
        say("refused", str(exc).split(":")[0])
try:  # only the last rank is wrong: the others hear of it at once
    hccl.exchange_windows(pg, address, size if rank != world - 1 else 10 ** 9)
except AfdError as exc:
    say("refused", str(exc).split(" could not")[0].replace(f"rank {world - 1}", "rank LAST"))

exchanged = hccl.exchange_windows(pg, address, size, zero=True)
sizes = tuple(8192 * (r + 1) for r in range(world))
say("exchanged", exchanged.group_name == name, exchanged.rank, exchanged.sizes == sizes,
    exchanged.addresses[rank] == address)
say("zeroed", int(tensor[lead:].cpu().count_nonzero()), int((tensor[:lead].cpu() == 0xEE).sum()))

# a second group of the same process: the world group gets a window of its own
small = torch.zeros(4096, dtype=torch.uint8, device="npu")
hccl.exchange_windows(dist.group.WORLD, small.data_ptr(), 4096)

# every rank writes a row and a flag into every window (its own too), as the operators do: through writer_group
group = hccl.writer_group(comm.resolve(name), rank)
remote = sorted(r for r, w in comm.resolve(name).windows.items() if not isinstance(w, comm.LocalWindow))
say("remote peers", remote)
for r in range(world):
    win = group.window(r)
    assert win.size == sizes[r], (r, win.size)
    win.put_rows(0, 64, np.array([rank]), np.full((1, 64), 16 * rank + r + 1, np.uint8))
    win.put_i32(win.size - 4 * world, np.array([rank]), 1000 * rank + r)
    win.get_i32(0, 1)  # after the puts on this connection: they are in the peer's window
    if r == (rank + 1) % world:
        try:
            win.put_rows(win.size - 32, 64, np.array([0]), np.zeros((1, 64), np.uint8))
        except AfdError as exc:
            say("past the end", str(exc).replace(str(sizes[r]), "SIZE"))
next_world_window = hccl.writer_group(comm.resolve(world_name), rank).window((rank + 1) % world)
next_world_window.put_i32(0, np.array([0]), 77 + rank)
next_world_window.get_i32(0, 1)
dist.barrier(group=gloo)

own = tensor[lead:].cpu().numpy()
rows_ok = all((own[64 * w:64 * w + 64] == 16 * w + rank + 1).all() for w in range(world))
flags_ok = own[size - 4 * world:].view("<i4").tolist() == [1000 * w + rank for w in range(world)]
rest = own[64 * world:size - 4 * world]
say("own window", rows_ok, flags_ok, int(np.count_nonzero(rest)))
say("world window", small[:4].view(torch.int32).item() == 77 + (rank - 1) % world)

# release, then a new window on the same group (a replacement buffer)
hccl.release_windows(pg)
hccl.release_windows(pg)
try:
    comm.resolve(name).window((rank + 1) % world)
except AfdError as exc:
    say("released", "has no window for rank" in str(exc))
dist.barrier(group=gloo)
again = torch.zeros(1024 * (rank + 1), dtype=torch.uint8, device="npu")
say("again", hccl.exchange_windows(pg, again.data_ptr(), again.numel()).sizes ==
    tuple(1024 * (r + 1) for r in range(world)))
dist.barrier(group=gloo)

dist.destroy_process_group(pg)
try:
    comm.resolve(name)
except AfdError as exc:
    say("destroyed", "no communication group named" in str(exc), pg in _world.pg_map)
hccl.release_windows(pg)  # (a buffer's destroy() after the group's: nothing to do)
dist.barrier(group=gloo)
dist.destroy_process_group(gloo)
dist.destroy_process_group()
servers = [t for t in threading.enumerate() if t.name == "npu window server" and t.is_alive()]
say("all released", hccl._groups == {}, world_name in comm._groups, len(servers))
