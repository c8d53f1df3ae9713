"""Groups and windows as serving code makes them: an hccl group built the afd-plugin way, a caller's npu tensor
exposed as a rank's window (exchange_windows), released by release_windows and destroy_process_group."""
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed import Backend
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

from afd import comm
from afd.errors import AfdError
from afd.npu import hccl

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "afd_plugin_windows.py"
NPU = torch.device("npu")


@pytest.fixture
def window_group():
    """A one-rank world group and an `afd_window` group made as afd-plugin's init_afd_process_group makes it; both
    destroyed afterwards whatever the test did."""
    timeout = timedelta(seconds=20)
    dist.init_process_group("hccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pg, _ = _new_process_group_helper(1, 0, [], Backend("hccl"), PrefixStore("afd_window", dist.HashStore()),
                                          group_name="afd_window", backend_options=None, timeout=timeout)
        _world.pg_group_ranks[pg] = {0: 0}
        yield pg
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_afd_plugin_group_has_a_rank_a_size_and_the_comm_name_the_operators_resolve(window_group):
    pg = window_group
    assert (dist.get_rank(pg), dist.get_world_size(pg), pg.group_name) == (0, 1, "afd_window")
    name = pg._get_backend(NPU).get_hccl_comm_name(0, init_comm=False)
    assert name == pg._get_backend(NPU).get_hccl_comm_name(0)
    assert name != dist.distributed_c10d._get_default_group()._get_backend(NPU).get_hccl_comm_name(0)
    assert comm.resolve(name).world_size == 1 and comm.resolve(name).windows == {}


def test_a_callers_tensor_becomes_the_window_the_operators_write_into(window_group):
    pg = window_group
    tensor = torch.full((4096,), 0xEE, dtype=torch.uint8, device="npu")
    got = hccl.exchange_windows(pg, tensor.data_ptr() + 512, 2048, zero=True)
    assert got == hccl.ExchangedWindows(pg._get_backend(NPU).get_hccl_comm_name(0), 0, 1,
                                        (tensor.data_ptr() + 512,), (2048,))
    host = tensor.cpu().numpy()
    assert (host[512:2560] == 0).all() and (host[:512] == 0xEE).all() and (host[2560:] == 0xEE).all()
    win = hccl.writer_group(comm.resolve(got.group_name), 0).window(0)
    win.put_rows(64, 16, np.array([2]), np.full((1, 16), 5, np.uint8))
    win.put_i32(0, np.array([1]), 42)
    host = tensor.cpu().numpy()
    assert (host[512 + 96:512 + 112] == 5).all() and host[516:520].view("<i4")[0] == 42
    with pytest.raises(AfdError, match="runs past the 2048-byte window"):
        win.put_rows(2040, 16, np.array([0]), np.zeros((1, 16), np.uint8))


def test_without_zero_the_window_keeps_its_bytes(window_group):
    tensor = torch.full((1024,), 3, dtype=torch.uint8, device="npu")
    hccl.exchange_windows(window_group, tensor.data_ptr(), 1024)
    assert (tensor.cpu() == 3).all()


@pytest.mark.parametrize("address, size, field, rule", [
    (0, 64, "window_addr", "must be a positive npu device address"),
    (-5, 64, "window_addr", "must be a positive npu device address"),
    ("tensor", 64, "window_addr", "must be an int, got str"),
    (None, 64, "window_addr", "must be an int, got NoneType"),
    ("npu", 0, "window_size", "must be a positive number of bytes, got 0"),
    ("npu", True, "window_size", "must be an int, got bool"),
    ("npu", 4097, "window_size", "4097 bytes from 0x[0-9a-f]+ run past its npu allocation of 4096 bytes"),
    ("cpu", 64, "window_addr", "is not npu memory of this process"),
])
def test_a_bad_window_names_the_argument(window_group, address, size, field, rule):
    npu = torch.zeros(4096, dtype=torch.uint8, device="npu")
    cpu = torch.zeros(4096, dtype=torch.uint8)
    address = {"npu": npu.data_ptr(), "cpu": cpu.data_ptr()}.get(address, address)
    with pytest.raises(hccl.WindowError, match=rf"^{field}: .*{rule}") as info:
        hccl.exchange_windows(window_group, address, size)
    assert info.value.field == field
    name = window_group._get_backend(NPU).get_hccl_comm_name(0)
    assert comm.resolve(name).windows == {}  # nothing was exposed


def test_a_freed_tensor_is_no_window(window_group):
    address = torch.zeros(4096, dtype=torch.uint8, device="npu").data_ptr()
    with pytest.raises(hccl.WindowError, match=r"^window_addr: .* lies in a freed npu block"):
        hccl.exchange_windows(window_group, address, 64)


def test_not_an_hccl_group_is_refused(window_group):
    gloo = dist.new_group([0], backend="gloo")
    npu = torch.zeros(64, dtype=torch.uint8, device="npu")
    with pytest.raises(hccl.WindowError, match="^group: .*not an hccl process group"):
        hccl.exchange_windows(gloo, npu.data_ptr(), 64)
    with pytest.raises(hccl.WindowError, match="^group: no hccl process group with comm name 'nope'"):
        hccl.exchange_windows("nope", npu.data_ptr(), 64)


def test_one_window_per_group_until_released_then_another(window_group):
    pg = window_group
    name = pg._get_backend(NPU).get_hccl_comm_name(0)
    first = torch.zeros(2048, dtype=torch.uint8, device="npu")
    hccl.exchange_windows(pg._get_backend(NPU), first.data_ptr(), 2048)
    with pytest.raises(hccl.WindowError, match="^group: this rank already has a window"):
        hccl.exchange_windows(name, first.data_ptr(), 1024)
    assert comm.resolve(name).window(0).size == 2048
    hccl.release_windows(pg)
    hccl.release_windows(pg)
    with pytest.raises(AfdError, match="has no window for rank 0"):
        comm.resolve(name).window(0)
    assert (first.cpu() == 0).all()  # the caller's memory is left as it was
    second = torch.zeros(512, dtype=torch.uint8, device="npu")
    assert hccl.exchange_windows(name, second.data_ptr(), 512).sizes == (512,)
    assert comm.resolve(name).window(0).size == 512


def test_two_groups_of_one_process_have_a_window_each(window_group):
    world = dist.distributed_c10d._get_default_group()
    a = torch.zeros(1024, dtype=torch.uint8, device="npu")
    b = torch.zeros(2048, dtype=torch.uint8, device="npu")
    wa = hccl.exchange_windows(world, a.data_ptr(), 1024)
    wb = hccl.exchange_windows(window_group, b.data_ptr(), 2048)
    assert wa.group_name != wb.group_name
    hccl.writer_group(comm.resolve(wb.group_name), 0).window(0).put_i32(0, np.array([0]), 9)
    assert a[:4].view(torch.int32).item() == 0 and b[:4].view(torch.int32).item() == 9


def test_destroy_process_group_releases_the_group_and_its_windows(window_group):
    pg = window_group
    name = pg._get_backend(NPU).get_hccl_comm_name(0)
    npu = torch.zeros(1024, dtype=torch.uint8, device="npu")
    hccl.exchange_windows(pg, npu.data_ptr(), 1024)
    server = pg._exposure.server.thread
    dist.destroy_process_group(pg)
    assert pg not in _world.pg_map and not server.is_alive()
    with pytest.raises(AfdError, match="no communication group named"):
        comm.resolve(name)
    hccl.release_windows(pg)  # a buffer's destroy() after its group's: nothing left to do
    hccl.release_windows(name)
    with pytest.raises(hccl.WindowError, match="was destroyed"):
        hccl.exchange_windows(pg, npu.data_ptr(), 1024)
    world = dist.distributed_c10d._get_default_group()._get_backend(NPU)
    world._window_register_and_exchange(4096, [])
    world_name = world.get_hccl_comm_name(0)
    assert comm.resolve(world_name).window(0).size == 4096
    dist.destroy_process_group()
    assert world_name not in comm._groups and hccl._groups == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ranks(result, world: int, remote: dict[int, list[int]]) -> None:
    assert result.returncode == 0, result.output[-3000:]
    assert {r: v.exit_code for r, v in result.ranks.items()} == {r: 0 for r in range(world)}
    for rank in range(world):
        lines = result.ranks[rank].output.splitlines()
        expected = [
            f"group {rank} {world} afd_window", f"comm name True True {world}", "no windows yet True",
            "refused window_addr", "refused window_size",
            "refused window_size: 1000000000 bytes" if rank == world - 1 else "refused group: rank LAST",
            f"exchanged True {rank} True True", f"zeroed 0 {512 if rank == 1 else 0}",
            f"remote peers {remote[rank]}",
            "past the end window: write of 1 rows at offset SIZE-32 stride 64 runs past the SIZE-byte window "
            "[status 1]".replace("SIZE-32", str(8192 * ((rank + 1) % world + 1) - 32)),
            "own window True True 0", "world window True", "released True", "again True", "destroyed True False",
            "all released True False 0"]
        got = [line for line in lines if line.split(" ")[0] in {e.split(" ")[0] for e in expected}]
        for want in expected:
            assert any(line.startswith(want) for line in got), (rank, want, got)


@pytest.mark.timeout(240)
def test_three_ranks_on_one_host_expose_plain_tensors_as_windows(afd_torchrun):
    result = afd_torchrun(SCRIPT, _free_port(), nproc=3)
    _check_ranks(result, 3, {r: [] for r in range(3)})


@pytest.mark.timeout(300)
def test_two_nodes_reach_each_others_windows_through_the_window_transport(afd_torchrun):
    result = afd_torchrun(SCRIPT, _free_port(), nproc=2, nnodes=2)
    _check_ranks(result, 4, {0: [2, 3], 1: [2, 3], 2: [0, 1], 3: [0, 1]})


@pytest.mark.timeout(240)
def test_a_crash_or_sigterm_with_windows_exposed_leaves_nothing_behind(afd_torchrun):
    """The ranks end (torchrun ends the waiting one), and the fixture finds no process and no listing left; the
    windows were memfds, which the kernel frees with their last process."""
    result = afd_torchrun(HERE / "scripts" / "window_crash.py", nproc=3)
    assert result.returncode != 0 and not result.timed_out
    for rank in range(3):
        assert "exchanged [0, 1, 2]" in result.ranks[rank].output.splitlines(), result.output[-3000:]
    assert "RuntimeError: rank 1 crashes with its window exposed" in result.ranks[1].output
    assert all(result.ranks[r].exit_code != 0 for r in range(3))  # (which signal or code each got is a race)
