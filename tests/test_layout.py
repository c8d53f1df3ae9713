"""Unit tests of afd.layout: the ScheduleContext offsets and accessors, the window layouts, align512."""
from __future__ import annotations

import numpy as np
import pytest

from afd.errors import AfdError
from afd.layout import (
    ATTENTION_MICRO_BATCH_ID_OFFSET,
    CONTEXT_SIZE,
    FFN_OUT_NUM_OFFSET,
    FFN_POLLING_INDEX_OFFSET,
    RUN_FLAG_OFFSET,
    SCHEDULE_CONTEXT_DTYPE,
    AttentionWindowLayout,
    FfnOutLayout,
    FfnWindowLayout,
    ScheduleContext,
    align512,
    field_offsets,
)

# The offsets of the spec (§1), confirmed by the batching kernel's hard-coded 384/400/416/528/544/560/576.
EXPECTED_OFFSETS = {
    "common.session_num": 0, "common.micro_batch_num": 4, "common.micro_batch_size": 8,
    "common.selected_expert_num": 12, "common.expert_num": 16, "common.attn_to_ffn_token_size": 20,
    "common.ffn_to_attn_token_size": 24, "common.schedule_mode": 28,
    "control.run_flag": 128,
    "attention.token_info_buf": 256, "attention.token_info_buf_size": 264, "attention.token_data_buf": 272,
    "attention.token_data_buf_size": 280, "attention.micro_batch_id": 288,
    "ffn.token_info_buf": 384, "ffn.token_info_buf_size": 392, "ffn.token_data_buf": 400,
    "ffn.token_data_buf_size": 408, "ffn.polling_index": 416,
    "ffn.layer_ids_buf": 512, "ffn.layer_ids_buf_size": 520, "ffn.session_ids_buf": 528,
    "ffn.session_ids_buf_size": 536, "ffn.micro_batch_ids_buf": 544, "ffn.micro_batch_ids_buf_size": 552,
    "ffn.expert_ids_buf": 560, "ffn.expert_ids_buf_size": 568, "ffn.out_num": 576,
}
EXPECTED_TYPES = {"common.schedule_mode": "<i4", "control.run_flag": "<i4", "attention.micro_batch_id": "<u4",
                  "ffn.out_num": "<u4"}


def _dtype_of(name: str) -> np.dtype:
    area, field = name.split(".")
    return SCHEDULE_CONTEXT_DTYPE.fields[area][0].fields[field][0]


def test_size_is_1024():
    assert CONTEXT_SIZE == 1024 == SCHEDULE_CONTEXT_DTYPE.itemsize
    assert len(ScheduleContext().to_bytes()) == 1024


def test_field_offsets_are_the_documented_ones():
    assert field_offsets() == EXPECTED_OFFSETS


def test_field_types():
    for name in EXPECTED_OFFSETS:
        expected = EXPECTED_TYPES.get(name, "<u4" if name.startswith("common.") else "<u8")
        assert _dtype_of(name) == np.dtype(expected), name


def test_hot_path_offsets_agree_with_the_struct():
    offs = field_offsets()
    assert RUN_FLAG_OFFSET == offs["control.run_flag"]
    assert ATTENTION_MICRO_BATCH_ID_OFFSET == offs["attention.micro_batch_id"]
    assert FFN_POLLING_INDEX_OFFSET == offs["ffn.polling_index"]
    assert FFN_OUT_NUM_OFFSET == offs["ffn.out_num"]


@pytest.mark.parametrize("name, offset", sorted(EXPECTED_OFFSETS.items()))
def test_each_field_lands_at_its_byte_offset(name, offset):
    dt = _dtype_of(name)
    value = 0x0102030405060708 if dt.itemsize == 8 else 0x01020304
    ctx = ScheduleContext()
    area, field = name.split(".")
    setattr(getattr(ctx, area), field, value)
    raw = ctx.to_bytes()
    assert raw[offset:offset + dt.itemsize] == value.to_bytes(dt.itemsize, "little")
    assert raw[:offset] == bytes(offset) and raw[offset + dt.itemsize:] == bytes(CONTEXT_SIZE - offset - dt.itemsize)


def test_attribute_access_reads_and_writes_the_buffer():
    buf = bytearray(CONTEXT_SIZE)
    ctx = ScheduleContext(buf)
    ctx.control.run_flag = 1
    ctx.attention.micro_batch_id = 3
    ctx.common.schedule_mode = -1
    assert buf[128:132] == (1).to_bytes(4, "little")  # writes go straight into the caller's buffer
    assert buf[288:292] == (3).to_bytes(4, "little")
    assert ctx.run_flag == 1 and ctx.attention.micro_batch_id == 3 and ctx.common.schedule_mode == -1
    assert isinstance(ctx.attention.micro_batch_id, int)
    assert "micro_batch_id" in dir(ctx.attention)
    buf[128:132] = bytes(4)  # and reads see the buffer, not a cached copy
    assert ctx.control.run_flag == 0 and ctx.run_flag == 0


def test_reserved_arrays_are_accessible_and_excluded_from_as_dict():
    ctx = ScheduleContext()
    ctx.common.reserve0 = np.arange(96, dtype=np.int8)
    assert ctx.common.reserve0[95] == 95
    assert ctx.to_bytes()[32 + 95] == 95
    d = ctx.as_dict()
    assert set(d) == {"common", "control", "attention", "ffn"}
    assert not any(k.startswith("reserve") for area in d.values() for k in area)
    assert {f"{a}.{k}" for a, fs in d.items() for k in fs} == set(EXPECTED_OFFSETS)


def test_from_bytes_to_bytes_round_trip():
    src = ScheduleContext()
    src.set_fields({"common": {"micro_batch_num": 2, "schedule_mode": 1}, "ffn.out_num": 7,
                    "attention.token_info_buf": 0x1240_0000_0000_0000})
    data = src.to_bytes()
    back = ScheduleContext.from_bytes(data)
    assert back.to_bytes() == data
    assert back.as_dict() == src.as_dict()
    assert back.ffn.out_num == 7 and back.attention.token_info_buf == 0x1240_0000_0000_0000
    back.ffn.out_num = 8  # from_bytes copies: the source bytes are not aliased
    assert src.ffn.out_num == 7


@pytest.mark.parametrize("size", [0, 1023, 1025, 2048])
def test_from_bytes_needs_exactly_1024(size):
    with pytest.raises(AfdError) as exc:
        ScheduleContext.from_bytes(bytes(size))
    assert exc.value.field == "schedule_context" and "1024" in exc.value.rule and str(size) in exc.value.rule


def test_context_over_a_short_buffer_is_rejected():
    with pytest.raises(AfdError, match="1024"):
        ScheduleContext(bytearray(100))


@pytest.mark.parametrize("fields, field, words", [
    ({"bogus": {"x": 1}}, "bogus", "unknown area"),
    ({"common": {"bogus": 1}}, "common.bogus", "unknown field"),
    ({"common.bogus": 1}, "common.bogus", "unknown field"),
    ({"bogus.session_num": 1}, "bogus.session_num", "unknown field"),
    ({"session_num": 1}, "session_num", "area.field"),
    ({"common.": 1}, "common.", "area.field"),
])
def test_set_fields_names_the_bad_key(fields, field, words):
    with pytest.raises(AfdError) as exc:
        ScheduleContext().set_fields(fields)
    assert exc.value.field == field
    assert words in str(exc.value)


@pytest.mark.parametrize("name, value", [
    ("common.session_num", -1), ("common.session_num", 2**32), ("common.schedule_mode", 2**31),
    ("common.schedule_mode", -2**31 - 1), ("control.run_flag", 2**31), ("attention.token_info_buf", -1),
    ("attention.token_info_buf", 2**64), ("ffn.out_num", 2**32),
])
def test_out_of_range_value_names_field_and_range(name, value):
    ctx = ScheduleContext()
    with pytest.raises(AfdError) as exc:
        ctx.set_fields({name: value})
    assert exc.value.field == name
    assert str(value) in exc.value.rule and "does not fit" in exc.value.rule
    assert ctx.to_bytes() == bytes(CONTEXT_SIZE)  # nothing was written


@pytest.mark.parametrize("name, value", [
    ("common.session_num", 2**32 - 1), ("common.schedule_mode", -2**31), ("control.run_flag", 2**31 - 1),
    ("attention.token_info_buf", 2**64 - 1), ("ffn.out_num", 0),
])
def test_boundary_values_fit(name, value):
    ctx = ScheduleContext()
    ctx.set_fields({name: value})
    area, field = name.split(".")
    assert getattr(getattr(ctx, area), field) == value


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 512), (511, 512), (512, 512), (513, 1024), (3456, 3584)])
def test_align512(n, expected):
    assert align512(n) == expected


def test_attention_window_layout():
    w = AttentionWindowLayout(micro_batch_num=2, micro_batch_size=48, selected_expert_num=9, hidden_stride=7168)
    assert w.flags_shape == (2, 48, 9)
    assert w.flag_count == 2 * 48 * 9
    assert w.info_bytes == 2 * 48 * 9 * 4 == 3456
    assert w.data_offset == align512(3456) == 3584
    assert w.slot_bytes == 7168 * 2
    assert w.data_bytes == 2 * 48 * 9 * 7168 * 2
    assert w.total_bytes == 3584 + w.data_bytes
    assert w.flag_offset(0, 0, 0) == 0  # flags at the window base
    assert w.flag_offset(1, 0, 0) == 48 * 9 * 4  # one micro-batch record = BS*(K+1) int32, no header
    assert w.flag_offset(1, 2, 3) == ((1 * 48 + 2) * 9 + 3) * 4
    assert w.data_slot_offset(0, 0, 0) == 3584
    assert w.data_slot_offset(1, 2, 3) == 3584 + ((1 * 48 + 2) * 9 + 3) * 7168 * 2
    # Vectorised use: the slots of one micro-batch are contiguous and in [token, k] order.
    slots = w.slot(1, np.arange(48)[:, None], np.arange(9)[None, :])
    assert slots.shape == (48, 9) and (np.diff(slots.reshape(-1)) == 1).all()


def test_attention_window_data_offset_is_aligned_even_when_flags_are():
    w = AttentionWindowLayout(1, 16, 8, 1024, itemsize=4)  # 512 bytes of flags: already aligned
    assert w.data_offset == 512


def test_ffn_window_layout():
    w = FfnWindowLayout(session_num=2, micro_batch_num=2, micro_batch_size=48, selected_expert_num=9, token_bytes=512)
    assert w.record_ints == 2 + 48 * 9
    assert w.record_bytes == 4 * (2 + 48 * 9)
    assert w.records_shape == (2, 2, 2 + 48 * 9)
    assert w.info_bytes == 4 * (2 + 48 * 9) * 2 * 2 == 6944
    assert w.data_offset == 7168
    assert w.record_offset(0, 0) == 0
    assert w.record_offset(0, 1) == w.record_bytes  # [session][micro_batch] order
    assert w.record_offset(1, 0) == 2 * w.record_bytes
    assert w.data_bytes == 2 * 2 * 48 * 9 * 512
    assert w.total_bytes == 7168 + w.data_bytes
    assert w.data_slot_offset(1, 0, 2, 3) == 7168 + (((1 * 2 + 0) * 48 + 2) * 9 + 3) * 512


def test_ffn_out_layout():
    o = FfnOutLayout(session_num=2, micro_batch_size=48, selected_expert_num=9)
    assert o.ids_bytes == 8
    assert o.expert_ids_bytes == 4 * 2 * 48 * 9
    assert o.offsets == {"layer_ids_buf": 0, "session_ids_buf": 512, "micro_batch_ids_buf": 1024,
                         "expert_ids_buf": 1536}
    assert o.total_bytes == 1536 + align512(3456)
