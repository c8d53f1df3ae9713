"""Fixtures shared by the op tests."""
import pytest

from afd.layout import FfnWindowLayout
from afd.ops import create_schedule_context_holder


@pytest.fixture
def ffn_window(dev):
    """make(A, M, BS, K+1) -> (context, live records [A, M, 2 + BS*(K+1)], window buffer): an FFN-side context over a
    fresh window (8 experts, 512-byte slots); the holders are closed after the test."""
    holders = []

    def make(a, m, bs, k1):
        layout = FfnWindowLayout(a, m, bs, k1, 512)
        win = dev.malloc(layout.total_bytes)
        holder = create_schedule_context_holder(0, a, m, bs, k1, 8, 512, 512, ffn_window=win.address,
                                                ffn_window_size=layout.total_bytes, device=dev)
        holder.init()
        holders.append(holder)
        return holder.get_schedule_context(), win.view("<i4", layout.records_shape), win

    yield make
    for holder in holders:
        holder.close()
