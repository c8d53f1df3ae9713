"""Byte layouts: the 1024-byte ScheduleContext and the attention / FFN window layouts (pure data, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import AfdError

CONTEXT_SIZE = 1024
VALID_FLAG = 1  # kValidFlag
INVALID_FLAG = 0  # kInvalidFlag
EXPERT_ID_SENTINEL = 0x7F7F7F7F  # memset(0x7F): "invalid" expert id after the FFN scheduler consumes a record
EXPERT_ID_INIT = 0x7FFFFFFF  # INT32_MAX: what the holder initialises expert ids to


def align512(nbytes: int) -> int:
    """Round up to the next multiple of 512 bytes (the windows' region alignment)."""
    return (int(nbytes) + 511) // 512 * 512


def _struct(fields: list[tuple[str, str | np.dtype, int]], itemsize: int) -> np.dtype:
    names, formats, offsets = zip(*fields)
    return np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": itemsize})


# #pragma pack(1) struct ScheduleContext, areas in member order common, control, attention, ffn.
COMMON_DTYPE = _struct([
    ("session_num", "<u4", 0), ("micro_batch_num", "<u4", 4), ("micro_batch_size", "<u4", 8),
    ("selected_expert_num", "<u4", 12), ("expert_num", "<u4", 16), ("attn_to_ffn_token_size", "<u4", 20),
    ("ffn_to_attn_token_size", "<u4", 24), ("schedule_mode", "<i4", 28), ("reserve0", ("i1", 96), 32),
], 128)
CONTROL_DTYPE = _struct([("run_flag", "<i4", 0), ("reserve2", ("i1", 124), 4)], 128)
ATTENTION_DTYPE = _struct([
    ("token_info_buf", "<u8", 0), ("token_info_buf_size", "<u8", 8), ("token_data_buf", "<u8", 16),
    ("token_data_buf_size", "<u8", 24), ("micro_batch_id", "<u4", 32), ("reserve5", ("i1", 92), 36),
], 128)
FFN_DTYPE = _struct([
    ("token_info_buf", "<u8", 0), ("token_info_buf_size", "<u8", 8), ("token_data_buf", "<u8", 16),
    ("token_data_buf_size", "<u8", 24), ("polling_index", "<u8", 32), ("reserve3", ("i1", 88), 40),
    ("layer_ids_buf", "<u8", 128), ("layer_ids_buf_size", "<u8", 136), ("session_ids_buf", "<u8", 144),
    ("session_ids_buf_size", "<u8", 152), ("micro_batch_ids_buf", "<u8", 160),
    ("micro_batch_ids_buf_size", "<u8", 168), ("expert_ids_buf", "<u8", 176), ("expert_ids_buf_size", "<u8", 184),
    ("out_num", "<u4", 192), ("reserve4", ("i1", 60), 196),
], 256)
SCHEDULE_CONTEXT_DTYPE = _struct([
    ("common", COMMON_DTYPE, 0), ("control", CONTROL_DTYPE, 128), ("attention", ATTENTION_DTYPE, 256),
    ("ffn", FFN_DTYPE, 384), ("reserve6", ("i1", 384), 640),
], CONTEXT_SIZE)
AREAS = ("common", "control", "attention", "ffn")

# Absolute byte offsets of the fields ops touch on hot paths (raw loads, no structured access).
RUN_FLAG_OFFSET = 128
ATTENTION_MICRO_BATCH_ID_OFFSET = 288
FFN_POLLING_INDEX_OFFSET = 416
FFN_OUT_NUM_OFFSET = 576


# The fields the ops change as they run, (offset, width) in context order: what static_bytes leaves out.
_VOLATILE = [(RUN_FLAG_OFFSET, 4), (ATTENTION_MICRO_BATCH_ID_OFFSET, 4), (FFN_POLLING_INDEX_OFFSET, 8),
             (FFN_OUT_NUM_OFFSET, 4)]


def field_offsets() -> dict[str, int]:
    """Every non-reserved field as 'area.name' -> absolute byte offset."""
    out = {}
    for area in AREAS:
        sub = SCHEDULE_CONTEXT_DTYPE.fields[area]
        for name, (dt, off) in sub[0].fields.items():
            if not name.startswith("reserve"):
                out[f"{area}.{name}"] = sub[1] + off
    return out


class _Area:
    """Attribute access to one area of a context by the C field names (raw typed loads: ops read these per call)."""

    __slots__ = ("_view", "_name", "_fields", "_ctx")

    def __init__(self, view: np.ndarray, name: str, ctx: "ScheduleContext", base: int):
        object.__setattr__(self, "_view", view)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_ctx", ctx)
        fields = {}
        for fname, (dt, off) in view.dtype.fields.items():
            if not dt.shape:  # scalar fields become (typed array name, element index) on the context
                fields[fname] = ({"<u4": "u32", "<i4": "i32", "<u8": "u64"}[dt.str], (base + off) // dt.itemsize, dt)
        object.__setattr__(self, "_fields", fields)

    def _check(self, name: str) -> np.dtype:
        fields = self._view.dtype.fields
        if name not in fields:
            raise AfdError(f"{self._name}.{name}", f"unknown field; {self._name} has {', '.join(fields)}")
        return fields[name][0]

    def __getattr__(self, name: str):
        f = self._fields.get(name)
        if f is not None:
            return int(getattr(self._ctx, f[0])[f[1]])
        self._check(name)
        return self._view[name][0].copy()

    def __setattr__(self, name: str, value) -> None:
        f = self._fields.get(name)
        if f is None:
            self._check(name)
            self._view[name][0] = value
            return
        info = np.iinfo(f[2])
        value = int(value)
        if not info.min <= value <= info.max:
            raise AfdError(f"{self._name}.{name}", f"{value} does not fit {f[2].name} [{info.min}, {info.max}]")
        getattr(self._ctx, f[0])[f[1]] = value

    def __dir__(self):
        return list(self._view.dtype.names)

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in self._view.dtype.names if not n.startswith("reserve")}


class ScheduleContext:
    """The 1024-byte ScheduleContext over any writable 1024-byte buffer (host bytes or device memory)."""

    def __init__(self, buffer=None, *, device=None, address: int = 0):
        if buffer is None:
            buffer = bytearray(CONTEXT_SIZE)
        raw = np.frombuffer(buffer, dtype=np.uint8)
        if raw.size < CONTEXT_SIZE:
            raise AfdError("schedule_context", f"needs {CONTEXT_SIZE} bytes, got {raw.size}")
        raw = raw[:CONTEXT_SIZE]
        self._raw = raw
        self._rec = raw.view(SCHEDULE_CONTEXT_DTYPE)
        # Hot-path views: ops re-read run_flag every poll, so keep it a plain int32 load.
        self.i32 = raw.view("<i4")
        self.u32 = raw.view("<u4")
        self.u64 = raw.view("<u8")
        self.device = device
        self.address = address
        self.prepared: dict = {}  # (op, args) -> ((static bytes, device, generation), result): ops/_context
        for area in AREAS:
            setattr(self, area, _Area(self._rec[area], area, self, SCHEDULE_CONTEXT_DTYPE.fields[area][1]))

    def static_bytes(self) -> bytes:
        """The context without the fields the ops change as they run (run_flag, attention.micro_batch_id,
        ffn.polling_index, ffn.out_num): what an op's checks and buffer views depend on."""
        b = self._raw.tobytes()
        (v0, w0), (v1, w1), (v2, w2), (v3, w3) = _VOLATILE
        return b[:v0] + b[v0 + w0:v1] + b[v1 + w1:v2] + b[v2 + w2:v3] + b[v3 + w3:]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, device=None) -> "ScheduleContext":
        data = bytes(data)
        if len(data) != CONTEXT_SIZE:
            raise AfdError("schedule_context", f"a context dump must be exactly {CONTEXT_SIZE} bytes, got {len(data)}")
        return cls(bytearray(data), device=device)

    @classmethod
    def on_device(cls, device, address: int) -> "ScheduleContext":
        """A view of the context that lives at `address` in simulated device memory."""
        return cls(device.view(address, CONTEXT_SIZE, field="schedule_context"), device=device, address=address)

    def to_bytes(self) -> bytes:
        return self._raw.tobytes()

    @property
    def raw(self) -> np.ndarray:
        return self._raw

    @property
    def run_flag(self) -> int:
        return int(self.i32[RUN_FLAG_OFFSET // 4])

    def as_dict(self) -> dict:
        return {area: getattr(self, area).as_dict() for area in AREAS}

    def set_fields(self, fields: dict) -> None:
        """Assign nested {'area': {'field': value}} or flat {'area.field': value} values, naming bad keys."""
        for key, value in fields.items():
            if isinstance(value, dict):
                if key not in AREAS:
                    raise AfdError(key, f"unknown area; the context has {', '.join(AREAS)}")
                for name, v in value.items():
                    setattr(getattr(self, key), name, v)
            else:
                area, _, name = key.partition(".")
                if area not in AREAS or not name:
                    raise AfdError(key, f"unknown field; use area.field with area in {', '.join(AREAS)}")
                setattr(getattr(self, area), name, value)

    def __repr__(self) -> str:
        return f"ScheduleContext({self.as_dict()!r})"


@dataclass(frozen=True)
class AttentionWindowLayout:
    """Attention window: flags int32 [M, BS, K+1] at the base, token data [M, BS, K+1, HS] at align512(flags)."""

    micro_batch_num: int
    micro_batch_size: int
    selected_expert_num: int
    hidden_stride: int  # HS, elements per slot
    itemsize: int = 2

    @property
    def flags_shape(self) -> tuple[int, int, int]:
        return (self.micro_batch_num, self.micro_batch_size, self.selected_expert_num)

    @property
    def flag_count(self) -> int:
        return self.micro_batch_num * self.micro_batch_size * self.selected_expert_num

    @property
    def info_bytes(self) -> int:
        return 4 * self.flag_count

    @property
    def data_offset(self) -> int:
        return align512(self.info_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.hidden_stride * self.itemsize

    @property
    def data_bytes(self) -> int:
        return self.flag_count * self.slot_bytes

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def slot(self, micro_batch_id, token_id, expert_offset):
        """Flat slot index (mb*BS + token)*(K+1) + k; works on scalars and arrays."""
        return (micro_batch_id * self.micro_batch_size + token_id) * self.selected_expert_num + expert_offset

    def flag_offset(self, micro_batch_id, token_id, expert_offset):
        return self.slot(micro_batch_id, token_id, expert_offset) * 4

    def data_slot_offset(self, micro_batch_id, token_id, expert_offset):
        return self.data_offset + self.slot(micro_batch_id, token_id, expert_offset) * self.slot_bytes


@dataclass(frozen=True)
class FfnWindowLayout:
    """FFN window: records int32 [A, M, 2 + BS*(K+1)] (flag, layer_id, expert_ids), data [A, M, BS, K+1, HS] after align512."""

    session_num: int
    micro_batch_num: int
    micro_batch_size: int
    selected_expert_num: int
    token_bytes: int  # attn_to_ffn_token_size: bytes per data slot

    @property
    def record_ints(self) -> int:
        return 2 + self.micro_batch_size * self.selected_expert_num

    @property
    def record_bytes(self) -> int:
        return 4 * self.record_ints

    @property
    def info_bytes(self) -> int:
        return self.record_bytes * self.session_num * self.micro_batch_num

    @property
    def records_shape(self) -> tuple[int, int, int]:
        return (self.session_num, self.micro_batch_num, self.record_ints)

    @property
    def data_offset(self) -> int:
        return align512(self.info_bytes)

    @property
    def data_bytes(self) -> int:
        return (self.session_num * self.micro_batch_num * self.micro_batch_size
                * self.selected_expert_num * self.token_bytes)

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    def record_offset(self, session_id, micro_batch_id):
        return (session_id * self.micro_batch_num + micro_batch_id) * self.record_bytes

    def slot(self, session_id, micro_batch_id, token_id, expert_offset):
        return (((session_id * self.micro_batch_num + micro_batch_id) * self.micro_batch_size + token_id)
                * self.selected_expert_num + expert_offset)

    def data_slot_offset(self, session_id, micro_batch_id, token_id, expert_offset):
        return self.data_offset + self.slot(session_id, micro_batch_id, token_id, expert_offset) * self.token_bytes


@dataclass(frozen=True)
class FfnOutLayout:
    """FFN out buffers (layer, session, micro-batch ids [A] i32; expert ids [A, BS, K+1] i32), each aligned to 512."""

    session_num: int
    micro_batch_size: int
    selected_expert_num: int

    @property
    def ids_bytes(self) -> int:
        return 4 * self.session_num

    @property
    def expert_ids_bytes(self) -> int:
        return 4 * self.session_num * self.micro_batch_size * self.selected_expert_num

    @property
    def offsets(self) -> dict[str, int]:
        ids = align512(self.ids_bytes)
        return {"layer_ids_buf": 0, "session_ids_buf": ids, "micro_batch_ids_buf": 2 * ids, "expert_ids_buf": 3 * ids}

    @property
    def total_bytes(self) -> int:
        return 3 * align512(self.ids_bytes) + align512(self.expert_ids_bytes)
