"""ScheduleContextHolder: parameter rules, attention and FFN window layouts, stop_schedule, close."""
import pytest

from afd.errors import AfdError
from afd.layout import CONTEXT_SIZE, EXPERT_ID_INIT, ScheduleContext
from afd.ops import ScheduleContextError, attention_worker_scheduler_, create_schedule_context_holder

A, M, BS, K1, E = 3, 3, 4, 3, 16




def attention_holder(dev, window_size=None, **kw):
    info = 4 * K1 * BS * M  # 144 -> align512 = 512
    size = window_size or 512 + M * BS * K1 * 1024
    win = dev.malloc(size)
    win.view()[:] = 0xAB  # garbage the holder must clear (info) or leave (data)
    args = dict(schedule_mode=1, session_num=A, micro_batch_num=M, micro_batch_size=BS, selected_expert_num=K1,
                expert_num=E, attn_to_ffn_token_size=1024, ffn_to_attn_token_size=1024, attention_window=win.address,
                attention_window_size=size, device=dev)
    args.update(kw)
    return create_schedule_context_holder(**args), win, info


def test_attention_layout_and_initial_micro_batch_id(dev):
    holder, win, info = attention_holder(dev)
    holder.init()
    try:
        ctx = holder.get_schedule_context()
        assert isinstance(ctx, ScheduleContext) and ctx.device is dev and ctx.address == holder.context_address
        c, a = ctx.common, ctx.attention
        assert (c.session_num, c.micro_batch_num, c.micro_batch_size, c.selected_expert_num, c.expert_num,
                c.attn_to_ffn_token_size, c.ffn_to_attn_token_size, c.schedule_mode) == (A, M, BS, K1, E, 1024, 1024,
                                                                                          1)
        assert ctx.control.run_flag == 1
        assert a.micro_batch_id == M - 1
        assert a.token_info_buf == win.address and a.token_info_buf_size == info == 144
        assert a.token_data_buf == win.address + 512 and a.token_data_buf_size == win.size - 512
        raw = win.view()
        assert not raw[:info].any() and (raw[info:] == 0xAB).all()  # only the info region is memset
        assert ctx.ffn.token_info_buf == 0 and ctx.ffn.layer_ids_buf == 0
        # The first scheduler call polls micro-batch 0.
        win.view("<i4", (M, BS, K1))[0] = 1
        attention_worker_scheduler_(ctx)
        assert ctx.attention.micro_batch_id == 0
    finally:
        holder.close()


def test_ffn_layout_records_and_out_buffers(dev):
    info = (4 * K1 * BS + 8) * M * A  # 56 * 9 = 504 -> align512 = 512
    size = 512 + A * M * BS * K1 * 512
    win = dev.malloc(size)
    win.view()[:] = 0x11
    holder = create_schedule_context_holder(0, A, M, BS, K1, E, 512, 512, ffn_window=win.address,
                                            ffn_window_size=size, device=dev)
    holder.init()
    try:
        ctx = holder.get_schedule_context()
        f = ctx.ffn
        assert ctx.common.schedule_mode == 0 and ctx.control.run_flag == 1
        assert f.token_info_buf == win.address and f.token_info_buf_size == info == 504
        assert f.token_data_buf == win.address + 512 and f.token_data_buf_size == size - 512
        assert f.polling_index == 0 and f.out_num == 0
        recs = win.view("<i4", (A, M, 2 + BS * K1))
        assert (recs[:, :, 0] == 0).all() and (recs[:, :, 1] == 0).all() and (recs[:, :, 2:] == EXPERT_ID_INIT).all()
        assert (win.view()[info:] == 0x11).all()
        # One allocation, order layer / session / mb / expert, each piece at a 512-aligned offset.
        base = f.layer_ids_buf
        assert (f.session_ids_buf - base, f.micro_batch_ids_buf - base, f.expert_ids_buf - base) == (512, 1024, 1536)
        assert (f.layer_ids_buf_size, f.session_ids_buf_size, f.micro_batch_ids_buf_size,
                f.expert_ids_buf_size) == (4 * A, 4 * A, 4 * A, 4 * A * BS * K1)
        assert dev.allocation_size(base) == 1536 + 512  # 144 bytes of expert ids, aligned up
        assert not dev.view(base, 2048).any()
        assert ctx.attention.token_info_buf == 0 and ctx.attention.micro_batch_id == 0
    finally:
        holder.close()


@pytest.mark.parametrize("change,field", [
    (dict(schedule_mode=2), "schedule_mode"),
    (dict(schedule_mode=-1), "schedule_mode"),
    (dict(session_num=0), "session_num"),
    (dict(micro_batch_num=0), "micro_batch_num"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(selected_expert_num=0), "selected_expert_num"),
    (dict(expert_num=0), "expert_num"),
    (dict(attn_to_ffn_token_size=1000), "attn_to_ffn_token_size"),
    (dict(ffn_to_attn_token_size=0), "ffn_to_attn_token_size"),
    (dict(attention_window=0), "attention_window"),
    (dict(attention_window_size=0), "attention_window_size"),
    (dict(attention_window_size=512), "attention_window_size"),  # must be > align512(info) = 512
])
def test_parameter_errors_name_the_parameter(dev, change, field):
    with pytest.raises(ScheduleContextError) as err:
        attention_holder(dev, **change)
    assert err.value.field == field and isinstance(err.value, AfdError)


def test_window_size_beyond_its_allocation(dev):
    win = dev.malloc(4096)
    with pytest.raises(ScheduleContextError, match="attention_window_size.*only 4096 bytes"):
        create_schedule_context_holder(1, A, M, BS, K1, E, 512, 512, attention_window=win.address,
                                       attention_window_size=8192, device=dev)


def test_ffn_mode_needs_the_ffn_window(dev):
    win = dev.malloc(4096)
    with pytest.raises(ScheduleContextError, match="ffn_window: must be non-zero in schedule_mode 0"):
        create_schedule_context_holder(0, A, M, BS, K1, E, 512, 512, attention_window=win.address,
                                       attention_window_size=4096, device=dev)


def test_stop_schedule_writes_only_run_flag(dev):
    holder, win, _ = attention_holder(dev)
    holder.init()
    try:
        ctx = holder.get_schedule_context()
        ctx.attention.micro_batch_id = 1  # an op moved on since init: stop must not roll it back
        before = ctx.to_bytes()
        holder.stop_schedule()
        after = ctx.to_bytes()
        assert ctx.control.run_flag == 0
        diff = [i for i in range(CONTEXT_SIZE) if before[i] != after[i]]
        assert diff and all(128 <= i < 132 for i in diff)
    finally:
        holder.close()


def test_close_frees_what_init_allocated_and_lifecycle_errors(dev):
    info = (4 * K1 * BS + 8) * M * A
    win = dev.malloc(4096)
    holder = create_schedule_context_holder(0, A, M, BS, K1, E, 512, 512, ffn_window=win.address,
                                            ffn_window_size=4096, device=dev)
    with pytest.raises(ScheduleContextError, match="call init"):
        holder.get_schedule_context()
    owned = set(dev.owned_segments())
    holder.init()
    assert len(set(dev.owned_segments()) - owned) == 2  # context + out buffers
    with pytest.raises(ScheduleContextError, match="already initialised"):
        holder.init()
    holder.close()
    holder.close()  # idempotent
    assert set(dev.owned_segments()) == owned
    with pytest.raises(ScheduleContextError):
        holder.stop_schedule()
    assert info < 4096
