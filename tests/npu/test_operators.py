"""The AFD operators under torch.ops.npu: torch_npu 2.14's schemas and meta functions, keywords, bad arguments."""
import numpy as np
import pytest
import torch
import torch_npu
from npu_helpers import attention_side
from torch._subclasses.fake_tensor import FakeTensorMode

from afd.npu.operators import NpuOpError
from afd.npu.streams import StreamError

# torch_npu 2.14.0, torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml (func: lines), verbatim.
TORCH_NPU_2_14 = [
    "ffn_worker_scheduler_(Tensor(a!) self, *, int sync_group_size=1, int execute_mode=0) -> Tensor(a!)",
    "ffn_worker_scheduler(Tensor self, *, int sync_group_size=1, int execute_mode=0) -> Tensor",
    "attention_worker_scheduler_(Tensor(a!) self) -> Tensor(a!)",
    "attention_worker_scheduler(Tensor self) -> Tensor",
    "npu_ffn_worker_batching(Tensor schedule_context, int expert_num, int[4] max_out_shape, *, int token_dtype=0, "
    "int need_schedule=0, int layer_num=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "npu_attention_worker_combine(Tensor schedule_context, Tensor expert_scales, Tensor layer_id, int hidden_size, "
    "*, int token_dtype=0, int need_schedule=0) -> (Tensor, Tensor)",
    "npu_attention_to_ffn(Tensor x, Tensor session_id, Tensor micro_batch_id, Tensor layer_id, Tensor expert_ids, "
    "Tensor expert_rank_table, str group, int world_size, int[] ffn_token_info_table_shape, "
    "int[] ffn_token_data_shape, int[] attn_token_info_table_shape, int moe_expert_num, *, Tensor? scales=None, "
    "Tensor? active_mask=None, int quant_mode=0, int sync_flag=0, int ffn_start_rank_id=0) -> ()",
    "npu_ffn_to_attention(Tensor x, Tensor session_ids, Tensor micro_batch_ids, Tensor token_ids, "
    "Tensor expert_offsets, Tensor actual_token_num, str group, int world_size, int[] token_info_table_shape, "
    "int[] token_data_shape, *, Tensor? attn_rank_table=None) -> ()",
]


@pytest.mark.parametrize("schema", TORCH_NPU_2_14, ids=lambda s: s.split("(")[0])
def test_schema_is_torch_npu_2_14s(schema):
    name = schema.split("(")[0]
    assert str(getattr(torch.ops.npu, name).default._schema) == "npu::" + schema
    assert getattr(torch_npu, name) is getattr(torch.ops.npu, name)
    if name in ("attention_worker_scheduler_", "attention_worker_scheduler", "ffn_worker_scheduler_",
                "ffn_worker_scheduler"):
        assert getattr(torch_npu._afd, name) is getattr(torch.ops.npu, name)  # torch_npu/utils/_afd_ops.py


@pytest.mark.parametrize("token_dtype, y_dtype", [(0, torch.float16), (1, torch.bfloat16)])
def test_combine_meta_shapes_and_dtypes(token_dtype, y_dtype):
    ctx = torch.empty(1024, dtype=torch.int8, device="meta")
    y, nxt = torch.ops.npu.npu_attention_worker_combine(ctx, torch.empty(5, 3, device="meta"),
                                                        torch.empty(1, dtype=torch.int32, device="meta"), 64,
                                                        token_dtype=token_dtype, need_schedule=1)
    assert (y.shape, y.dtype, nxt.shape, nxt.dtype) == ((5, 64), y_dtype, (1,), torch.int32)
    assert y.device.type == "meta"


@pytest.mark.parametrize("token_dtype, y_dtype", [(0, torch.float16), (1, torch.bfloat16), (2, torch.int8)])
def test_batching_meta_shapes_and_dtypes(token_dtype, y_dtype):
    ctx = torch.empty(1024, dtype=torch.int8, device="meta")
    out = torch.ops.npu.npu_ffn_worker_batching(ctx, 7, [2, 3, 4, 16], token_dtype=token_dtype)
    y = 2 * 3 * 4
    assert [(tuple(t.shape), t.dtype) for t in out] == [
        ((y, 16), y_dtype), ((7, 2), torch.int64), ((y,), torch.int32), ((y,), torch.int32), ((y,), torch.int32),
        ((y,), torch.int32), ((y,), torch.float32), ((1,), torch.int64)]


def test_meta_under_fake_tensor_mode_on_npu_tensors():
    side = attention_side()
    mode = FakeTensorMode()
    ctx, scales, lid = (mode.from_tensor(t) for t in (side.context, torch.rand(4, 2).npu(),
                                                      torch.zeros(1, dtype=torch.int32).npu()))
    with mode:
        y, nxt = torch.ops.npu.npu_attention_worker_combine(ctx, scales, lid, side.H, token_dtype=1)
        same = torch.ops.npu.attention_worker_scheduler_(ctx)
        copy = torch.ops.npu.attention_worker_scheduler(ctx)
        none = torch.ops.npu.npu_ffn_to_attention(ctx, ctx, ctx, ctx, ctx, ctx, "g", 2, [1], [1])
    assert (tuple(y.shape), y.dtype, y.device.type, tuple(nxt.shape)) == ((4, side.H), torch.bfloat16, "npu", (1,))
    assert same is ctx and copy is not ctx and copy.shape == ctx.shape and none is None


def test_keywords_defaults_and_unknown_keywords():
    side = attention_side()
    side.holder._impl.get_schedule_context().attention.micro_batch_id = 0
    scales = torch.rand(side.BS, side.K).npu()
    lid = torch.zeros(1, dtype=torch.int32).npu()
    y, _ = torch_npu.npu_attention_worker_combine(side.context, scales, lid, side.H)  # defaults: fp16, no schedule
    assert y.dtype == torch.float16
    y, _ = torch_npu.npu_attention_worker_combine(schedule_context=side.context, expert_scales=scales, layer_id=lid,
                                                  hidden_size=side.H, token_dtype=1, need_schedule=0)
    assert y.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="Unknown keyword argument .sync_flag."):  # 2.14 has no such argument
        torch_npu.npu_ffn_worker_batching(side.context, 8, [1, 4, 3, 64], sync_flag=1)


@pytest.mark.parametrize("change, match", [
    (dict(expert_scales=lambda t: t.half()), r"expert_scales: dtype must be float32, got float16 \[status 161002\]"),
    (dict(expert_scales=lambda t: t.cpu()), r"expert_scales: must be an npu tensor, got one on cpu"),
    (dict(schedule_context=lambda t: t.view(torch.uint8)), r"schedule_context: dtype must be int8"),
    (dict(schedule_context=lambda t: t.view(2, 512)), r"schedule_context: must be a non-empty 1-D tensor"),
    (dict(layer_id=lambda t: t.long()), r"layer_id: dtype must be int32, got int64 \[status 161002\]"),
    (dict(expert_scales=lambda t: t[None]), r"expert_scales: must be 2-D"),
    (dict(token_dtype=5), r"token_dtype: must be 0 \(fp16\) or 1 \(bf16\), got 5 \[status 161002\]"),
])
def test_bad_combine_arguments_raise_at_the_call_naming_the_argument(change, match, monkeypatch):
    monkeypatch.setenv("AFD_NPU_SOC_NAME", "Ascend910_9392")  # an A3 (the 950's combine has more token dtypes)
    side = attention_side()
    args = dict(schedule_context=side.context, expert_scales=torch.rand(side.BS, side.K).npu(),
                layer_id=torch.zeros(1, dtype=torch.int32).npu(), hidden_size=side.H, token_dtype=1)
    for key, fn in change.items():
        args[key] = fn(args[key]) if callable(fn) else fn
    with pytest.raises(NpuOpError, match=match) as info:
        torch_npu.npu_attention_worker_combine(**args)
    assert "call aclnnAttentionWorkerCombine failed" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_a_short_context_and_other_kernel_checks_fail_at_the_next_sync():
    side = attention_side()
    short = side.context[:512]
    torch_npu.attention_worker_scheduler_(short)
    with pytest.raises(StreamError, match=r"schedule_context: data size must be >= 1024 bytes, got 512"):
        torch.npu.synchronize()
    with pytest.raises(NpuOpError, match=r"max_out_shape: must have 4 entries, got \[1, 4, 3\]"):
        torch_npu.npu_ffn_worker_batching(side.context, 8, [1, 4, 3])
    with pytest.raises(NpuOpError, match=r"group: no communication group named 'nowhere'"):
        x = torch.zeros(4, 64, dtype=torch.bfloat16).npu()
        ids = torch.zeros(4, dtype=torch.int32).npu()
        torch_npu.npu_ffn_to_attention(x, ids, ids, ids, ids, torch.tensor([4]).npu(), "nowhere", 2, [1, 4, 3],
                                       [1, 4, 3, 64])


def test_the_out_of_place_scheduler_schedules_a_copy_of_the_context():
    side = attention_side()
    side.flags[0].fill_(1)
    out = torch_npu.attention_worker_scheduler(side.context)
    torch.npu.synchronize()
    mb = lambda t: int(np.frombuffer(t.cpu().numpy().tobytes(), np.uint32)[288 // 4])  # attention.micro_batch_id
    assert mb(out) == 0 and mb(side.context) == 1  # the copy advanced, the holder's context did not
    assert side.flags[0].sum().item() == 0  # the window is shared: its flags were consumed


def test_a_plain_call_skips_the_dispatcher_and_gives_what_the_dispatcher_gives(monkeypatch):
    """torch_npu.<op> is still torch.ops.npu.<op> (an OpOverloadPacket); a call the dispatcher would only pass on
    goes straight to the npu kernel, anything else still through the dispatcher, with its errors."""
    from torch._ops import OpOverloadPacket
    side = attention_side()
    side.holder._impl.get_schedule_context().attention.micro_batch_id = 0
    packet = torch_npu.npu_attention_worker_combine
    assert isinstance(packet, OpOverloadPacket) and packet is torch.ops.npu.npu_attention_worker_combine
    calls = []
    kernel = packet._kernel
    monkeypatch.setattr(packet, "_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    scales, lid = torch.rand(side.BS, side.K).npu(), torch.zeros(1, dtype=torch.int32).npu()
    y, nxt = torch_npu.npu_attention_worker_combine(side.context, scales, lid, side.H, token_dtype=1)
    assert calls == [1]
    y2, nxt2 = torch.ops.npu.npu_attention_worker_combine.default(side.context, scales, lid, side.H, token_dtype=1)
    assert calls == [1]  # (the OpOverload is the dispatcher's way)
    assert torch.equal(y.cpu().view(torch.int16), y2.cpu().view(torch.int16)) and torch.equal(nxt.cpu(), nxt2.cpu())
    with pytest.raises(RuntimeError, match="positional"):  # token_dtype is keyword-only in the schema
        torch_npu.npu_attention_worker_combine(side.context, scales, lid, side.H, 1)
    with pytest.raises(RuntimeError, match="hidden_size"):
        torch_npu.npu_attention_worker_combine(side.context, scales, lid, "7168")
    with pytest.raises(NpuOpError, match="expert_scales: must be an npu tensor"):
        torch_npu.npu_attention_worker_combine(side.context, scales.cpu(), lid, side.H)
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in (side.context, scales, lid)]
    with mode:
        y3, _ = torch_npu.npu_attention_worker_combine(*fake, side.H, token_dtype=1)
    assert tuple(y3.shape) == (side.BS, side.H) and y3.dtype == torch.bfloat16
    assert calls == [1]


def test_fx_keeps_the_window_writes_and_traced_or_profiled_calls_take_the_dispatcher(monkeypatch):
    """The packets torch.ops.npu holds (the direct ones) are the side-effectful ones FX keeps; under the
    profiler or torch.jit.trace a call goes through the dispatcher, where they see the op."""
    from torch.fx.node import _side_effectful_functions
    assert torch.ops.npu.npu_attention_to_ffn.default in _side_effectful_functions
    assert torch.ops.npu.npu_ffn_to_attention.default in _side_effectful_functions
    side = attention_side()
    side.holder._impl.get_schedule_context().attention.micro_batch_id = 0
    packet = torch_npu.npu_attention_worker_combine
    calls = []
    kernel = packet._kernel
    monkeypatch.setattr(packet, "_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    scales, lid = torch.rand(side.BS, side.K).npu(), torch.zeros(1, dtype=torch.int32).npu()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch_npu.npu_attention_worker_combine(side.context, scales, lid, side.H, token_dtype=1)
    assert calls == [] and any(e.name == "npu::npu_attention_worker_combine" for e in prof.events())
    with pytest.raises(RuntimeError):  # beyond int64: the dispatcher's overflow error, not the kernel's
        torch_npu.npu_attention_worker_combine(side.context, scales, lid, 1 << 70)
    assert calls == []
