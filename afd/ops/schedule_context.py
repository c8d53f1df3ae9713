"""ScheduleContextHolder: torch_npu's owner of the 1024-byte context, its window layout, and stop_schedule()."""
from __future__ import annotations

from .. import device as _device
from ..errors import AfdError
from ..layout import (
    CONTEXT_SIZE,
    EXPERT_ID_INIT,
    RUN_FLAG_OFFSET,
    AttentionWindowLayout,
    FfnOutLayout,
    FfnWindowLayout,
    ScheduleContext,
    align512,
)

FFN_MODE = 0
ATTENTION_MODE = 1


class ScheduleContextError(AfdError, ValueError):
    """A holder parameter broke one of torch_npu's ScheduleContext rules."""


class ScheduleContextHolder:
    """Builds the context for one role (FFN or Attention) over caller-provided windows in device memory."""

    def __init__(self, schedule_mode: int, session_num: int, micro_batch_num: int, micro_batch_size: int,
                 selected_expert_num: int, expert_num: int, attn_to_ffn_token_size: int,
                 ffn_to_attn_token_size: int, ffn_window: int = 0, ffn_window_size: int = 0,
                 attention_window: int = 0, attention_window_size: int = 0, *, device=None):
        self.device = device if device is not None else _device.current()
        self.schedule_mode = int(schedule_mode)
        self.session_num = int(session_num)
        self.micro_batch_num = int(micro_batch_num)
        self.micro_batch_size = int(micro_batch_size)
        self.selected_expert_num = int(selected_expert_num)
        self.expert_num = int(expert_num)
        self.attn_to_ffn_token_size = int(attn_to_ffn_token_size)
        self.ffn_to_attn_token_size = int(ffn_to_attn_token_size)
        self.ffn_window, self.ffn_window_size = int(ffn_window), int(ffn_window_size)
        self.attention_window, self.attention_window_size = int(attention_window), int(attention_window_size)
        self._context_buf: _device.DeviceBuffer | None = None
        self._out_buf: _device.DeviceBuffer | None = None
        self._check()

    # -- checks (ScheduleContext.cpp) ---------------------------------------------------------
    def _check(self) -> None:
        for name in ("session_num", "micro_batch_num", "micro_batch_size", "selected_expert_num", "expert_num"):
            value = getattr(self, name)
            if value <= 0:
                raise ScheduleContextError(name, f"must be > 0, got {value}")
            if value >= 1 << 32:
                raise ScheduleContextError(name, f"must fit uint32, got {value}")
        for name in ("attn_to_ffn_token_size", "ffn_to_attn_token_size"):
            value = getattr(self, name)
            if value <= 0 or value % 512:
                raise ScheduleContextError(name, f"must be a positive multiple of 512, got {value}")
        if self.schedule_mode not in (FFN_MODE, ATTENTION_MODE):
            raise ScheduleContextError("schedule_mode", f"must be 0 (FFN) or 1 (attention), got {self.schedule_mode}")
        prefix = "attention" if self.schedule_mode == ATTENTION_MODE else "ffn"
        window, size = getattr(self, f"{prefix}_window"), getattr(self, f"{prefix}_window_size")
        if window == 0:
            raise ScheduleContextError(f"{prefix}_window", f"must be non-zero in schedule_mode {self.schedule_mode}")
        if size <= 0:
            raise ScheduleContextError(f"{prefix}_window_size", f"must be > 0 in schedule_mode {self.schedule_mode}")
        info = self.info_bytes
        # The attention rule is torch_npu's; the FFN side gets the same rule so that token_data_buf_size > 0 [INF].
        if size <= align512(info):
            raise ScheduleContextError(f"{prefix}_window_size",
                                       f"must be > align512(info) = {align512(info)} bytes, got {size}")
        available = self.device.allocation_size(window, field=f"{prefix}_window")
        if available < size:
            raise ScheduleContextError(f"{prefix}_window_size",
                                       f"is {size} bytes but only {available} bytes are allocated at {window:#x}")

    @property
    def info_bytes(self) -> int:
        """Bytes of the flag/record region of this role's window."""
        if self.schedule_mode == ATTENTION_MODE:
            return self.attention_layout.info_bytes
        return self.ffn_layout.info_bytes

    @property
    def attention_layout(self) -> AttentionWindowLayout:
        return AttentionWindowLayout(self.micro_batch_num, self.micro_batch_size, self.selected_expert_num,
                                     self.ffn_to_attn_token_size // 2, 2)

    @property
    def ffn_layout(self) -> FfnWindowLayout:
        return FfnWindowLayout(self.session_num, self.micro_batch_num, self.micro_batch_size,
                               self.selected_expert_num, self.attn_to_ffn_token_size)

    @property
    def out_layout(self) -> FfnOutLayout:
        return FfnOutLayout(self.session_num, self.micro_batch_size, self.selected_expert_num)

    # -- lifecycle ----------------------------------------------------------------------------
    def init(self) -> None:
        """Allocate the context, lay out and initialise this role's window, set run_flag = 1."""
        if self._context_buf is not None:
            raise ScheduleContextError("init", "the holder is already initialised; close() it first")
        host = ScheduleContext()  # built on the host, then copied to the device in one go (like the real H2D copy)
        host.set_fields({"common": {
            "session_num": self.session_num, "micro_batch_num": self.micro_batch_num,
            "micro_batch_size": self.micro_batch_size, "selected_expert_num": self.selected_expert_num,
            "expert_num": self.expert_num, "attn_to_ffn_token_size": self.attn_to_ffn_token_size,
            "ffn_to_attn_token_size": self.ffn_to_attn_token_size, "schedule_mode": self.schedule_mode}})
        host.control.run_flag = 1
        info = self.info_bytes
        dev = self.device
        if self.schedule_mode == ATTENTION_MODE:
            base, size = self.attention_window, self.attention_window_size
            dev.view(base, info, field="attention_window")[:] = 0
            area = host.attention
            area.token_info_buf, area.token_info_buf_size = base, info
            area.token_data_buf, area.token_data_buf_size = base + align512(info), size - align512(info)
            # "scheduler will scan from (micro_batch_id + 1) % micro_batch_num": the first poll targets mb 0.
            area.micro_batch_id = self.micro_batch_num - 1
        else:
            base, size = self.ffn_window, self.ffn_window_size
            records = dev.view(base, info, "<i4", field="ffn_window").reshape(self.ffn_layout.records_shape)
            records[:, :, 0] = 0
            records[:, :, 1] = 0
            records[:, :, 2:] = EXPERT_ID_INIT
            area = host.ffn
            area.token_info_buf, area.token_info_buf_size = base, info
            area.token_data_buf, area.token_data_buf_size = base + align512(info), size - align512(info)
            area.polling_index = 0
            out = self.out_layout
            self._out_buf = dev.malloc(out.total_bytes)
            self._out_buf.view()[:] = 0
            sizes = {"layer_ids_buf": out.ids_bytes, "session_ids_buf": out.ids_bytes,
                     "micro_batch_ids_buf": out.ids_bytes, "expert_ids_buf": out.expert_ids_bytes}
            for name, offset in out.offsets.items():
                setattr(area, name, self._out_buf.address + offset)
                setattr(area, f"{name}_size", sizes[name])
            area.out_num = 0
        try:
            self._context_buf = dev.malloc(CONTEXT_SIZE)
        except BaseException:
            self._free_out()
            raise
        self._context_buf.view()[:] = host.raw

    def _require_init(self) -> _device.DeviceBuffer:
        if self._context_buf is None:
            raise ScheduleContextError("schedule_context", "the holder is not initialised; call init() first")
        return self._context_buf

    @property
    def context_address(self) -> int:
        """Device address of the 1024-byte context (pass it to other processes as an int)."""
        return self._require_init().address

    def get_schedule_context(self) -> ScheduleContext:
        """The device view of the context: what the ops take as schedule_context."""
        return ScheduleContext.on_device(self.device, self._require_init().address)

    def stop_schedule(self) -> None:
        """run_flag = 0: writes only the 4 bytes at offset 128, so a concurrent op's other writes survive."""
        buf = self._require_init()
        self.device.view(buf.address + RUN_FLAG_OFFSET, 4, "<i4", field="schedule_context.control.run_flag")[0] = 0

    def _free_out(self) -> None:
        if self._out_buf is not None:
            self.device.free(self._out_buf)
            self._out_buf = None

    def close(self) -> None:
        """Free what init() allocated (the context and the FFN out buffers); the windows stay the caller's."""
        self._free_out()
        if self._context_buf is not None:
            self.device.free(self._context_buf)
            self._context_buf = None

    def __enter__(self) -> "ScheduleContextHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_schedule_context_holder(schedule_mode: int, session_num: int, micro_batch_num: int,
                                   micro_batch_size: int, selected_expert_num: int, expert_num: int,
                                   attn_to_ffn_token_size: int, ffn_to_attn_token_size: int, ffn_window: int = 0,
                                   ffn_window_size: int = 0, attention_window: int = 0,
                                   attention_window_size: int = 0, *, device=None) -> ScheduleContextHolder:
    """torch_npu._afd.create_schedule_context_holder: checks the parameters; call .init() to allocate."""
    return ScheduleContextHolder(schedule_mode, session_num, micro_batch_num, micro_batch_size, selected_expert_num,
                                 expert_num, attn_to_ffn_token_size, ffn_to_attn_token_size, ffn_window,
                                 ffn_window_size, attention_window, attention_window_size, device=device)
