"""npu tensors' operator outputs: kept and handed out again only when nobody holds them, with the new results."""
import pytest
import torch
import torch_npu
from npu_helpers import attention_side, expected_combine

from afd.npu import tensors
from afd.npu.memory import memory

SHAPES, DTYPES = [(4, 256), (1,)], [torch.bfloat16, torch.int32]


def _outputs():
    return tensors.empty_together(SHAPES, DTYPES, 0)


def _comes_back(hold) -> bool:
    """Make outputs, keep what hold(tensors, arrays) returns, drop the rest: are the same outputs made again?"""
    tensors.release_kept()
    ts, arrays = _outputs()
    first = ts[0].data_ptr()
    kept = hold(ts, arrays)  # noqa: F841 (held across the next call)
    del ts, arrays
    ts, _ = _outputs()
    return ts[0].data_ptr() == first


@pytest.mark.parametrize("hold, back", [
    (lambda ts, arrays: None, True),
    (lambda ts, arrays: ts[0], False),  # the caller's output
    (lambda ts, arrays: ts[1], False),
    (lambda ts, arrays: ts[0][1:], False),  # a view of it
    (lambda ts, arrays: tensors.as_cpu(ts[1]), False),  # a CPU alias, as a queued op holds its inputs
    (lambda ts, arrays: arrays[0], False),  # the array a kernel still writes through
    (lambda ts, arrays: arrays[1], False),
], ids=["nothing", "output", "next-layer-id", "view", "cpu-alias", "array-y", "array-next"])
def test_dropped_outputs_come_back_and_held_ones_never_do(hold, back):
    assert _comes_back(hold) is back


def test_large_outputs_are_not_kept_and_empty_cache_lets_kept_ones_go():
    tensors.release_kept()
    big = [(1024, 1024), (1,)]
    (y, n), a = tensors.empty_together(big, DTYPES, 0)
    del y, n, a
    (y, n), a = tensors.empty_together(big, DTYPES, 0)
    assert not tensors._kept.get((tuple(map(tuple, big)), tuple(DTYPES), 0))  # 2 MB: not kept
    del y, n, a
    (y, n), a = _outputs()
    del y, n, a
    before = memory.allocated
    torch.npu.empty_cache()
    assert memory.allocated < before and not tensors._kept


def test_a_kept_combine_output_holds_the_new_call_s_results_and_a_held_one_keeps_its_own():
    tensors.release_kept()
    side = attention_side()
    side.data.copy_(torch.randn(side.data.shape).to(torch.bfloat16).npu())
    lid = torch.zeros(1, dtype=torch.int32).npu()
    a, b = torch.rand(side.BS, side.K).npu(), torch.rand(side.BS, side.K).npu()
    ctx = side.holder._impl.get_schedule_context()

    def combine(scales):
        ctx.attention.micro_batch_id = 0
        y, _ = torch_npu.npu_attention_worker_combine(side.context, scales, lid, side.H, token_dtype=1)
        return y

    y = combine(a)
    address = y.data_ptr()
    del y
    y = combine(b)
    assert y.data_ptr() == address  # the same output again, with b's results
    assert torch.equal(y.cpu().view(torch.int16), expected_combine(side, 0, b).view(torch.int16))
    kept = y
    y = combine(a)
    assert y.data_ptr() != address
    assert torch.equal(kept.cpu().view(torch.int16), expected_combine(side, 0, b).view(torch.int16))
    assert torch.equal(y.cpu().view(torch.int16), expected_combine(side, 0, a).view(torch.int16))


def test_a_numpy_view_of_an_output_keeps_it_from_coming_back():
    assert not _comes_back(lambda ts, arrays: arrays[0][1:])
    assert not _comes_back(lambda ts, arrays: arrays[1][:])
