"""torch_npu._afd on the fake NPU: the holder's keywords, checks, context tensor, stop and info; torch_npu's
own docstring examples for the two schedulers, run as written."""
import inspect
import re

import numpy as np
import pytest
import torch
import torch_npu

from afd.layout import EXPERT_ID_INIT

REAL_KEYWORDS = ["schedule_mode", "session_num", "micro_batch_num", "micro_batch_size", "selected_expert_num",
                 "expert_num", "attn_to_ffn_token_size", "ffn_to_attn_token_size", "ffn_window", "ffn_window_size",
                 "attention_window", "attention_window_size"]


def attention_args(window, **change):
    args = dict(schedule_mode=1, session_num=1, micro_batch_num=2, micro_batch_size=4, selected_expert_num=3,
                expert_num=8, attn_to_ffn_token_size=512, ffn_to_attn_token_size=512,
                attention_window=window.data_ptr(), attention_window_size=window.numel())
    args.update(change)
    return args


def test_the_real_keyword_names_and_defaults():
    sig = inspect.signature(torch_npu._afd.create_schedule_context_holder)
    assert list(sig.parameters) == REAL_KEYWORDS
    assert [sig.parameters[k].default for k in REAL_KEYWORDS[8:]] == [0, 0, 0, 0]


@pytest.mark.parametrize("change, match", [
    (dict(attn_to_ffn_token_size=100), "attn_to_ffn_token_size: must be a positive multiple of 512, got 100"),
    (dict(ffn_to_attn_token_size=1000), "ffn_to_attn_token_size: must be a positive multiple of 512, got 1000"),
    (dict(schedule_mode=2), r"schedule_mode: must be 0 \(FFN\) or 1 \(attention\), got 2"),
    (dict(attention_window=0), "attention_window: must be non-zero in schedule_mode 1"),
    (dict(session_num=0), "session_num: must be > 0, got 0"),
    (dict(attention_window_size=512), r"attention_window_size: must be > align512\(info\) = 512 bytes, got 512"),
    (dict(schedule_mode=0), "ffn_window: must be non-zero in schedule_mode 0"),
])
def test_bad_parameters_fail_init_as_torch_npu_does_naming_the_rule(change, match):
    window = torch.zeros(8192, dtype=torch.int8).npu()
    with pytest.raises(RuntimeError, match=r"^ScheduleContextHolder init return 1 \(" + match):
        torch_npu._afd.create_schedule_context_holder(**attention_args(window, **change))


def test_a_window_that_is_not_npu_memory_is_named():
    cpu_window = torch.zeros(8192, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="attention_window: address 0x[0-9a-f]+ is not npu memory"):
        torch_npu._afd.create_schedule_context_holder(**attention_args(cpu_window))


def test_the_context_tensor_aliases_what_the_operators_read_and_stop_writes_run_flag():
    window = torch.zeros(8192, dtype=torch.int8).npu()
    holder = torch_npu._afd.create_schedule_context_holder(**attention_args(window))
    holder.init()  # a second init does nothing, as torch_npu's
    ctx = holder.get_schedule_context_tensor()
    assert (ctx.shape, ctx.dtype, ctx.device.type) == ((1024,), torch.int8, "npu")
    assert holder.get_schedule_context_tensor().data_ptr() == ctx.data_ptr()
    info = holder.get_schedule_context_info()
    assert info.startswith("schedule context: schedule_mode=1, session_num=1, micro_batch_num=2, "
                           "micro_batch_size=4, selected_expert_num=3, expert_num=8, attn_to_ffn_token_size=512, "
                           "ffn_to_attn_token_size=512, run_flag=1, attention info: token_info_buf=")
    assert f"token_info_buf={window.data_ptr()}, token_info_buf_size=96, token_data_buf={window.data_ptr() + 512}" \
        in info and info.endswith("micro_batch_id=1;")
    ctx[288:292].view(torch.int32).fill_(0)  # written through the tensor, read by the holder (and the ops)
    assert holder.get_schedule_context_info().endswith("micro_batch_id=0;")
    holder.stop_schedule()
    assert "run_flag=0" in holder.get_schedule_context_info()
    assert ctx[128:132].view(torch.int32).item() == 0


def test_the_ffn_side_initialises_its_records():
    A, M, BS, K1 = 2, 2, 4, 3
    window = torch.zeros(1 << 16, dtype=torch.int8).npu()
    holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=0, session_num=A, micro_batch_num=M, micro_batch_size=BS, selected_expert_num=K1,
        expert_num=8, attn_to_ffn_token_size=512, ffn_to_attn_token_size=512, ffn_window=window.data_ptr(),
        ffn_window_size=window.numel())
    records = window[:4 * A * M * (2 + BS * K1)].view(torch.int32).view(A, M, 2 + BS * K1).cpu()
    assert records[:, :, :2].eq(0).all() and records[:, :, 2:].eq(EXPERT_ID_INIT).all()
    info = holder.get_schedule_context_info()
    assert ", ffn info: token_info_buf=" in info and info.endswith("out_num=0;")
    sizes = dict(re.findall(r"(\w+_buf_size)=(\d+)", info))
    assert sizes["layer_ids_buf_size"] == str(4 * A) and sizes["expert_ids_buf_size"] == str(4 * A * BS * K1)


def test_torch_npus_attention_worker_scheduler_example_as_written():
    window_size = 209715200
    attn_window_tensor = torch.zeros([window_size], dtype=torch.int8).npu()
    attn_workers, micro_batch_number, batch_size, top_k, hidden_size, expert_num = 144, 3, 30, 8, 7168, 288  # noqa: F841
    attn_to_ffn_token_size = (7168 + 4 + 511) // 512 * 512
    ffn_to_attn_token_size = 7168 * 2
    attn_window = attn_window_tensor.data_ptr()
    context_holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=1, session_num=attn_workers, micro_batch_num=micro_batch_number, micro_batch_size=batch_size,
        selected_expert_num=top_k + 1, expert_num=expert_num, attn_to_ffn_token_size=attn_to_ffn_token_size,
        ffn_to_attn_token_size=ffn_to_attn_token_size, attention_window=attn_window,
        attention_window_size=window_size)
    schedule_context = context_holder.get_schedule_context_tensor()
    num_int8 = batch_size * (top_k + 1) * 4 * micro_batch_number
    int32_view = attn_window_tensor[:num_int8].view(torch.int32)
    int32_view[:] = 1
    torch_npu.attention_worker_scheduler_(schedule_context)
    torch.npu.synchronize()
    flags = int32_view.view(micro_batch_number, -1).cpu()
    assert flags[0].eq(0).all() and flags[1:].eq(1).all()  # micro-batch 0 consumed, the others untouched
    assert context_holder.get_schedule_context_info().endswith("micro_batch_id=0;")


def test_torch_npus_ffn_worker_scheduler_example_as_written():
    window_size = 209715200
    ffn_window_tensor = torch.zeros([window_size], dtype=torch.int8).npu()
    attn_workers, micro_batch_number, batch_size, top_k, hidden_size, expert_num = 2, 3, 6, 8, 7168, 288  # noqa: F841
    attn_to_ffn_token_size = (7168 + 4 + 511) // 512 * 512
    ffn_to_attn_token_size = 7168 * 2
    ffn_window = ffn_window_tensor.data_ptr()
    context_holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=0, session_num=attn_workers, micro_batch_num=micro_batch_number, micro_batch_size=batch_size,
        selected_expert_num=top_k + 1, expert_num=expert_num, attn_to_ffn_token_size=attn_to_ffn_token_size,
        ffn_to_attn_token_size=ffn_to_attn_token_size, ffn_window=ffn_window, ffn_window_size=window_size)
    schedule_context = context_holder.get_schedule_context_tensor()
    num_int8 = attn_workers * micro_batch_number * (8 + batch_size * top_k * 4)
    int32_view = ffn_window_tensor[:num_int8].view(torch.int32)
    int32_view[:] = 1
    torch_npu.ffn_worker_scheduler_(schedule_context, sync_group_size=2)
    torch.npu.synchronize()
    info = context_holder.get_schedule_context_info()
    assert "polling_index=1," in info and info.endswith("out_num=2;")  # both sessions of micro-batch 0
    record = 8 + batch_size * (top_k + 1) * 4
    flags = [int(np.frombuffer(ffn_window_tensor[i * record:i * record + 4].cpu().numpy().tobytes(), np.int32)[0])
             for i in range(attn_workers * micro_batch_number)]
    assert flags == [0, 1, 1, 0, 1, 1]  # (session, mb 0) released, the rest still set
