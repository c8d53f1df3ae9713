"""The hccl process group under torchrun: collectives on npu tensors, gloo beside it, windows on one and on two
nodes (the second is its own shared-memory namespace, reached through afd-sim's window transport)."""
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
EXAMPLES = HERE.parent.parent / "examples" / "npu"


@pytest.mark.timeout(180)
def test_collectives_and_window_calls(afd_torchrun):
    result = afd_torchrun(HERE / "scripts" / "collectives.py")
    assert result.returncode == 0, result.output[-3000:]
    for rank in (0, 1):
        lines = result.ranks[rank].output.splitlines()
        assert "all_reduce [3.0, 3.0, 3.0, 3.0]" in lines
        assert "all_gather [[0.0, 10.0], [1.0, 11.0]]" in lines
        assert "broadcast 7.0" in lines and "gloo 1" in lines and "name True afd_hccl_" in lines
        assert "no window yet: window: no window is registered; call _window_register_and_exchange first" in lines
        assert f"own rank: peer_ranks: {rank} is not another rank of this group (size 2)" in lines
        assert f"window torch.uint8 {4096 * (rank + 1)} npu" in lines


@pytest.mark.timeout(240)
def test_two_nodes_run_the_same_round_trip_through_the_window_transport(afd_torchrun, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("npu_examples_tests", EXAMPLES / "test_npu_examples.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    argv = ["--bs", "64", "--hidden", "2048", "--topk", "8", "--quant-mode", "2", "--steps", "2"]
    result = afd_torchrun(EXAMPLES / "window_round_trip.py", *argv, "--out", tmp_path, nproc=1, nnodes=2)
    assert result.returncode == 0, result.output[-3000:]
    assert {r: v.exit_code for r, v in result.ranks.items()} == {0: 0, 1: 0}
    import torch

    from afd.device import Device
    dev = Device()
    try:
        want = ex.reference_round_trip(argv, dev)
    finally:
        dev.close()
    got = torch.load(tmp_path / "outputs.pt")
    for g, w in zip(got, want):
        assert (ex.bf16(g).view(np.uint16) == w.view(np.uint16)).all()


def test_peer_ranks_and_pids_are_safe_while_another_thread_maps_and_releases(monkeypatch):
    """The watchdog asks peer_ranks() / peer_pid() from a stream's thread while the caller's thread maps peers and
    releases them: neither may see a dict change under its iteration nor a group half gone."""
    import sys
    import threading
    from types import SimpleNamespace

    from afd.npu import hccl

    class Pg:
        _store = SimpleNamespace(set=lambda key, value: None)

        def rank(self):
            return 0

    pg = Pg()
    exposure = hccl._Exposure.__new__(hccl._Exposure)
    exposure.pg, exposure.tag, exposure.peers, exposure.maps, exposure.server = pg, "t", {}, [], None
    pg._exposure = exposure
    monkeypatch.setattr(hccl._Exposure, "_read", lambda self, key, rank, what: {})
    monkeypatch.setattr(hccl._Exposure, "_map_peer", lambda self, rank, info: {"pid": 1000 + rank, "window": None})
    monkeypatch.setitem(hccl._groups, "test-peers", pg)
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: mid-iteration
    done, errors = threading.Event(), []

    def churn():
        try:
            while not done.is_set():
                exposure.map(range(1, 400))
                exposure.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(3000):
            ranks = hccl.peer_ranks()
            assert ranks == sorted(set(ranks)) and set(ranks) <= set(range(1, 400))
            pid = hccl.peer_pid(7)
            assert pid in (None, 1007)
    finally:
        done.set()
        writer.join()
        sys.setswitchinterval(before)
    assert not errors
