"""prepared: an op's checks and views kept on its context only while the context, the device and its mappings
stay as they were."""
import numpy as np
import pytest

from afd.errors import KERNEL_STATUS_OK, DeviceAddressError, KernelError
from afd.ops import ffn_worker_scheduler as scheduler_module
from afd.ops import ffn_worker_scheduler_
from afd.ops._context import prepared

A, M, BS, K1 = 2, 2, 2, 3


@pytest.fixture
def ffn(ffn_window):
    return ffn_window(A, M, BS, K1)


def _ready(recs, mb):
    recs[:, mb, 0] = 1
    recs[:, mb, 2:] = 5


def _counting(monkeypatch):
    calls = []
    real = scheduler_module._scheduler_views
    monkeypatch.setattr(scheduler_module, "_scheduler_views", lambda ctx: calls.append(1) or real(ctx))
    return calls


def test_an_unchanged_context_is_checked_once_and_its_volatile_fields_every_call(ffn, monkeypatch):
    ctx, recs, _ = ffn
    calls = _counting(monkeypatch)
    for mb in (0, 1, 0):
        _ready(recs, mb)
        assert ffn_worker_scheduler_(ctx, A) == KERNEL_STATUS_OK
        assert ctx.ffn.out_num == A and ctx.ffn.polling_index == (mb + 1) % M
    assert len(calls) == 1  # polling_index and out_num changed on every call: not part of what is kept
    ctx.ffn.polling_index = M  # ... and still checked on every call
    with pytest.raises(KernelError, match="polling_index"):
        ffn_worker_scheduler_(ctx, A)
    assert len(calls) == 1


def test_a_changed_static_field_is_checked_again(ffn, monkeypatch):
    ctx, recs, _ = ffn
    calls = _counting(monkeypatch)
    _ready(recs, 0)
    ffn_worker_scheduler_(ctx, A)
    ctx.ffn.session_ids_buf_size = 4  # < 4 * A
    with pytest.raises(KernelError, match="session_ids_buf_size"):
        ffn_worker_scheduler_(ctx, A)
    with pytest.raises(KernelError, match="session_ids_buf_size"):  # a failed check is not kept either
        ffn_worker_scheduler_(ctx, A)
    assert len(calls) == 3


def test_a_freed_window_is_not_read_through_a_kept_view(dev, ffn):
    ctx, recs, win = ffn
    _ready(recs, 0)
    ffn_worker_scheduler_(ctx, A)
    del recs
    dev.free(win)  # the device's mappings changed: every kept view is dropped
    with pytest.raises(DeviceAddressError, match="token_info_buf.*not allocated"):
        ffn_worker_scheduler_(ctx, A)


def test_args_are_part_of_the_key_and_a_device_without_generation_is_never_kept(ffn):
    ctx = ffn[0]
    seen = []
    assert prepared(ctx, "op", lambda c, x: seen.append(x) or x * 2, 3) == 6
    assert prepared(ctx, "op", lambda c, x: seen.append(x) or x * 2, 3) == 6
    assert prepared(ctx, "op", lambda c, x: seen.append(x) or x * 2, 4) == 8
    assert seen == [3, 4]

    class Untracked:  # e.g. the fake NPU's memory: its blocks come and go with torch's allocator
        view = None
    ctx.device = Untracked()
    assert [prepared(ctx, "op", lambda c, x: seen.append(x) or x, 5) for _ in range(2)] == [5, 5]
    assert seen == [3, 4, 5, 5]
    assert np.frombuffer(ctx.static_bytes(), np.uint8).size == 1024 - 4 - 4 - 8 - 4


def test_static_bytes_leave_out_exactly_the_fields_the_ops_change():
    from afd.layout import _VOLATILE, SCHEDULE_CONTEXT_DTYPE, ScheduleContext, field_offsets

    names = ["control.run_flag", "attention.micro_batch_id", "ffn.polling_index", "ffn.out_num"]
    widths = [SCHEDULE_CONTEXT_DTYPE[n.split(".")[0]].fields[n.split(".")[1]][0].itemsize for n in names]
    assert _VOLATILE == [(field_offsets()[n], w) for n, w in zip(names, widths)]
    ctx = ScheduleContext()
    before = ctx.static_bytes()
    ctx.control.run_flag, ctx.attention.micro_batch_id, ctx.ffn.polling_index, ctx.ffn.out_num = 1, 2, 3, 4
    assert ctx.static_bytes() == before
    for name in field_offsets():  # every other field is in them
        if name not in names:
            area, field = name.split(".")
            setattr(getattr(ctx, area), field, 1 + int(getattr(getattr(ctx, area), field)))
            assert ctx.static_bytes() != before, name
            before = ctx.static_bytes()
