"""torch_npu._afd on the fake NPU: the schedule-context holder over npu windows (afd's holder, torch_npu's errors).

The holder is afd.ops.ScheduleContextHolder with its memory in the npu address space: the window addresses are
`data_ptr()`s of npu tensors (a plain tensor or an HCCL window), the context is an npu int8 tensor of 1024 bytes
(`get_schedule_context_tensor()`), and every operator reads that very memory. Failures come out as torch_npu's do:
`RuntimeError('ScheduleContextHolder init return 1')`, here followed by the field and the rule that failed.

`stop_schedule()` writes run_flag = 0 straight into the context, not as a stream-ordered copy as torch_npu does:
an operator spinning on that stream would otherwise never see it (cann-afd-operators.md, 8.3); here it is seen at
once by an operator spinning on any stream or thread. Each live holder is listed for `afd stop` (see registry).
"""
from __future__ import annotations

import weakref

import torch

from ..errors import AfdError
from ..ops.schedule_context import ScheduleContextHolder as _Holder
from . import registry
from .streams import current_stream
from .tensors import npu_device

K_FAILURE = 1  # kFailure of ScheduleContext.cpp
_live: "weakref.WeakSet[ScheduleContextHolder]" = weakref.WeakSet()


def live_holders() -> list["ScheduleContextHolder"]:
    return [h for h in list(_live) if h._impl is not None]


class ScheduleContextHolder:
    """torch_npu._afd.ScheduleContextHolder: builds the 1024-byte context of one side over its window."""

    def __init__(self, schedule_mode: int, session_num: int, micro_batch_num: int, micro_batch_size: int,
                 selected_expert_num: int, expert_num: int, attn_to_ffn_token_size: int,
                 ffn_to_attn_token_size: int, ffn_window: int = 0, ffn_window_size: int = 0,
                 attention_window: int = 0, attention_window_size: int = 0) -> None:
        self._args = (schedule_mode, session_num, micro_batch_num, micro_batch_size, selected_expert_num, expert_num,
                      attn_to_ffn_token_size, ffn_to_attn_token_size, ffn_window, ffn_window_size, attention_window,
                      attention_window_size)
        self._impl: _Holder | None = None
        self._context = None

    def init(self) -> None:
        if self._impl is not None:  # "Already been initialized, does not need to be initialized again."
            return
        current_stream().synchronize()  # the window as the stream left it: init writes it directly
        try:
            impl = _Holder(*self._args, device=npu_device)
            impl.init()
        except (AfdError, OverflowError, ValueError) as exc:
            raise RuntimeError(f"ScheduleContextHolder init return {K_FAILURE} ({exc})") from None
        self._impl = impl
        self._context = npu_device.tensor_of(impl._context_buf).view(torch.int8)
        _live.add(self)
        registry.add_context(self.context_address())

    def context_address(self) -> int:
        return self._impl.context_address

    def get_schedule_context_tensor(self):
        if self._impl is None:
            raise RuntimeError(f"get_context_tensor returned {K_FAILURE}")
        return self._context

    def stop_schedule(self) -> None:
        if self._impl is None:
            raise RuntimeError(f"stop returned {K_FAILURE}")
        self._impl.stop_schedule()

    def get_schedule_context_info(self) -> str:
        if self._impl is None:
            return "Error: schedule context is not inited!"
        current_stream().synchronize()  # a device-to-host copy of the context
        return info_string(self._impl.get_schedule_context())

    def __del__(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            try:
                registry.remove_context(impl.context_address)
                impl.close()  # the context and out buffers go back to the allocator once no tensor uses them
            except Exception:  # interpreter shutdown
                pass


def info_string(ctx) -> str:
    """ScheduleContextHolder::ToString, field for field."""
    c, r = ctx.common, ctx.control
    s = (f"schedule context: schedule_mode={c.schedule_mode}, session_num={c.session_num}, "
         f"micro_batch_num={c.micro_batch_num}, micro_batch_size={c.micro_batch_size}, "
         f"selected_expert_num={c.selected_expert_num}, expert_num={c.expert_num}, "
         f"attn_to_ffn_token_size={c.attn_to_ffn_token_size}, ffn_to_attn_token_size={c.ffn_to_attn_token_size}, "
         f"run_flag={r.run_flag}")
    if c.schedule_mode == 0:
        f = ctx.ffn
        s += (f", ffn info: token_info_buf={f.token_info_buf}, token_info_buf_size={f.token_info_buf_size}, "
              f"token_data_buf={f.token_data_buf}, token_data_buf_size={f.token_data_buf_size}, "
              f"polling_index={f.polling_index}, layer_ids_buf={f.layer_ids_buf}, "
              f"layer_ids_buf_size={f.layer_ids_buf_size}, session_ids_buf={f.session_ids_buf}, "
              f"session_ids_buf_size={f.session_ids_buf_size}, micro_batch_ids_buf={f.micro_batch_ids_buf}, "
              f"micro_batch_ids_buf_size={f.micro_batch_ids_buf_size}, expert_ids_buf={f.expert_ids_buf}, "
              f"expert_ids_buf_size={f.expert_ids_buf_size}, out_num={f.out_num};")
    elif c.schedule_mode == 1:
        a = ctx.attention
        s += (f", attention info: token_info_buf={a.token_info_buf}, token_info_buf_size={a.token_info_buf_size}, "
              f"token_data_buf={a.token_data_buf}, token_data_buf_size={a.token_data_buf_size}, "
              f"micro_batch_id={a.micro_batch_id};")
    return s


def create_schedule_context_holder(schedule_mode: int, session_num: int, micro_batch_num: int,
                                   micro_batch_size: int, selected_expert_num: int, expert_num: int,
                                   attn_to_ffn_token_size: int, ffn_to_attn_token_size: int, ffn_window: int = 0,
                                   ffn_window_size: int = 0, attention_window: int = 0,
                                   attention_window_size: int = 0) -> ScheduleContextHolder:
    """torch_npu._afd.create_schedule_context_holder: the holder, already init()ed."""
    holder = ScheduleContextHolder(schedule_mode, session_num, micro_batch_num, micro_batch_size,
                                   selected_expert_num, expert_num, attn_to_ffn_token_size, ffn_to_attn_token_size,
                                   ffn_window, ffn_window_size, attention_window, attention_window_size)
    holder.init()
    return holder
