"""The npu device: tensors, the ordinary ops AFD code uses around the operators, real aliasing, host reads."""
import numpy as np
import pytest
import torch

from afd.npu.memory import memory


def test_device_type_and_index():
    x = torch.zeros(3, device="npu:1")
    assert x.device == torch.device("npu:1") and x.device.type == "npu" and x.is_npu
    assert torch.ones(2).npu().device.type == "npu"
    assert torch.ones(2).to("npu").device.type == "npu"
    assert torch.ones(2, device="npu").cpu().device.type == "cpu"


def test_factories_and_host_reads():
    x = torch.arange(6, device="npu", dtype=torch.int64).reshape(2, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert x.sum().item() == 15 and isinstance(x.sum().item(), int)
    assert torch.full((2,), 2.5, device="npu").tolist() == [2.5, 2.5]
    assert "device='npu:0'" in repr(torch.zeros(2, device="npu"))


def test_a_write_through_any_view_is_seen_through_the_base_and_every_other_view():
    base = torch.zeros(64, dtype=torch.int8, device="npu")
    ints = base.view(torch.int32)  # a window reinterpreted, as AFD code does
    rows = ints.reshape(4, 4)
    ints[:4] = 1
    rows[1].fill_(7)
    base[48:52].copy_(torch.tensor([1, 0, 0, 0], dtype=torch.int8))
    assert ints[:4].tolist() == [1, 1, 1, 1]
    assert rows[1].tolist() == [7, 7, 7, 7]
    assert ints[12].item() == 1
    assert base.data_ptr() == ints.data_ptr() == rows.data_ptr()
    assert rows[1].data_ptr() == base.data_ptr() + 16
    # the operators read the same bytes through data_ptr()
    raw = memory.view(base.data_ptr(), 64, np.int32, field="t")
    assert raw[4:8].tolist() == [7, 7, 7, 7]


def test_indexing_slicing_arithmetic_reductions_casts():
    x = torch.arange(12, dtype=torch.float32).npu().reshape(3, 4)
    assert x[1, 2].item() == 6
    assert x[:, 1].tolist() == [1, 5, 9]
    x[0, :2] = -1
    assert x[0].tolist() == [-1, -1, 2, 3]
    idx = torch.tensor([2, 0]).npu()
    assert x[idx].cpu().tolist() == [[8, 9, 10, 11], [-1, -1, 2, 3]]
    assert (x * 2 + 1).max().item() == 23
    assert x.mean(dim=1).cpu().tolist() == pytest.approx([0.75, 5.5, 9.5])
    assert x.to(torch.bfloat16).dtype == torch.bfloat16 and x.half().float().cpu().equal(x.cpu())
    assert x.repeat(2, 1).shape == (6, 4) and x.t().contiguous().shape == (4, 3)
    assert torch.cat([x, x]).shape == (6, 4)
    mask = x > 4
    assert x[mask].cpu().tolist() == [5, 6, 7, 8, 9, 10, 11]  # data-dependent shape: waits, then runs


def test_out_of_range_and_freed_addresses_are_clear_errors_and_warnings():
    from afd.errors import DeviceAddressError
    from afd.npu.memory import FreedBlockWarning

    t = torch.zeros(1000, dtype=torch.uint8, device="npu")
    with pytest.raises(DeviceAddressError, match="token_info_buf: .* runs past its allocation"):
        memory.view(t.data_ptr() + 512, 1024, field="token_info_buf")
    with pytest.raises(DeviceAddressError, match="ffn_window: address 0x.* is not npu memory"):
        memory.view(torch.zeros(8).data_ptr(), 8, field="ffn_window")  # a CPU tensor's address
    with pytest.raises(DeviceAddressError, match="null"):
        memory.view(0, 8, field="attention_window")
    address = torch.full((4096,), 7, dtype=torch.uint8).npu().data_ptr()  # the temporary is freed at once
    with pytest.warns(FreedBlockWarning, match="freed npu block"):
        assert memory.view(address, 4, field="token_data_buf").tolist() == [7, 7, 7, 7]


def test_cpu_and_npu_results_are_bit_identical():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    want = (a.float() * b.float()).sum(dim=0).to(torch.bfloat16)
    got = (a.npu().float() * b.npu().float()).sum(dim=0).to(torch.bfloat16).cpu()
    assert got.view(torch.int16).equal(want.view(torch.int16))


def test_autograd_through_npu_tensors():
    x = torch.ones(3, device="npu", requires_grad=True)
    ((x * 2).sum()).backward()
    assert x.grad.device.type == "npu" and x.grad.tolist() == [2.0, 2.0, 2.0]
