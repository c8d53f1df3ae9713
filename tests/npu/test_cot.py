"""cann_ops_transformer on the fake NPU: the package surface, the real schemas, meta shapes, the wrappers' checks."""
import re
import sys

import cann_ops_transformer as cot
import pytest
import torch

from afd.npu import module

# The registrations of the real package, verbatim: hicann/ops-transformer @178f17c2
# mc2/attention_to_ffn_v2/torch_extension/attention_to_ffn.py, mc2/ffn_to_attention_v2/torch_extension/
# ffn_to_attention.py; libochao-huawei/ops-transformer @65a81d8f ffn/ffn_worker_batching/torch_extension/.
COT_SCHEMAS = [
    "npu_attention_to_ffn(Tensor(a!) context, Tensor x, Tensor session_id, Tensor micro_batch_id, Tensor layer_id, "
    "Tensor expert_ids, Tensor expert_rank_table, str group, int world_size, int[] ffn_token_info_table_shape, "
    "int[] ffn_token_data_shape, int[] attn_token_info_table_shape, int moe_expert_num, int quant_mode, "
    "int sync_flag, int ffn_start_rank_id, int ccl_buffer_size, *, Tensor? scales=None, Tensor? active_mask=None) "
    "-> ()",
    "npu_ffn_to_attention(Tensor(a!) context, Tensor x, Tensor session_ids, Tensor micro_batch_ids, "
    "Tensor token_ids, Tensor expert_offsets, Tensor actual_token_num, str group, int world_size, "
    "int[] token_info_table_shape, int[] token_data_shape, int ccl_buffer_size, *, Tensor? attn_rank_table=None) "
    "-> ()",
    "ffn_worker_batching(Tensor(a!) schedule_context, int expert_num, int[] max_out_shape, *, int token_dtype=0, "
    "int need_schedule=0, int layer_num=0, bool sync_flag=False, bool mx_output_uint8=False) -> (Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
]


@pytest.mark.parametrize("schema", COT_SCHEMAS, ids=lambda s: s.split("(")[0])
def test_schema_is_the_real_registration(schema):
    name = schema.split("(")[0]
    assert str(getattr(torch.ops.cann_ops_transformer, name).default._schema) == "cann_ops_transformer::" + schema


def test_the_package_surface_is_the_real_packages():
    assert sys.modules["cann_ops_transformer"] is cot and cot.__afd_fake__
    # a wrapper named like an op is not re-exported: the top level gives the op (the real __init__ skips it)
    assert cot.ffn_worker_batching is torch.ops.cann_ops_transformer.ffn_worker_batching
    assert cot.ops.ffn_worker_batching is not cot.ffn_worker_batching
    assert callable(cot.attention_to_ffn) and callable(cot.ffn_to_attention)
    assert cot.npu_attention_to_ffn is torch.ops.cann_ops_transformer.npu_attention_to_ffn  # falls through
    for name in ("get_buffer_for_attention_to_ffn", "get_buffer_for_ffn_to_attention",
                 "get_attention_to_ffn_ccl_buffer_size", "get_ffn_to_attention_ccl_buffer_size"):
        assert callable(getattr(cot, name)), name
    with pytest.raises(AttributeError, match="has no attribute 'npu_moe_gating'"):
        cot.npu_moe_gating
    import cann_ops_transformer.ops as ops
    assert ops is cot.ops


def test_a_job_that_imports_it_runs_on_a_950_unless_the_soc_is_set(monkeypatch):
    monkeypatch.delenv("AFD_NPU_SOC_NAME", raising=False)
    assert module.generation() == "950" and torch.npu.get_device_name().startswith("Ascend950")
    monkeypatch.setenv("AFD_NPU_SOC_NAME", "Ascend910_9392")
    assert module.generation() == "A3"


def _meta_context():
    return torch.empty(1024, dtype=torch.int8, device="meta")


@pytest.mark.parametrize("token_dtype, y_dtype, y_cols, scale", [
    (0, torch.float16, 64, ((24,), torch.float32)), (1, torch.bfloat16, 64, ((24,), torch.float32)),
    (2, torch.int8, 64, ((24,), torch.float32)), (3, torch.float8_e5m2, 64, ((24, 2), torch.float8_e8m0fnu)),
    (4, torch.float8_e4m3fn, 64, ((24, 2), torch.float8_e8m0fnu)),
    (5, torch.float4_e2m1fn_x2, 32, ((24, 2), torch.float8_e8m0fnu))])
def test_batching_v2_meta_shapes_and_dtypes(token_dtype, y_dtype, y_cols, scale):
    out = cot.ffn_worker_batching(_meta_context(), 7, [2, 3, 4, 64], token_dtype=token_dtype)
    y = 2 * 3 * 4
    assert [(tuple(t.shape), t.dtype) for t in out] == [
        ((y, y_cols), y_dtype), ((7, 2), torch.int64), ((y,), torch.int32), ((y,), torch.int32),
        ((y,), torch.int32), ((y,), torch.int32), scale, ((1,), torch.int64)]


def test_mx_output_uint8_gives_bytes_for_fp4_and_the_scales():
    out = cot.ffn_worker_batching(_meta_context(), 7, [1, 2, 3, 66], token_dtype=5, mx_output_uint8=True)
    assert (tuple(out[0].shape), out[0].dtype, tuple(out[6].shape), out[6].dtype) == (
        (6, 33), torch.uint8, (6, 3), torch.uint8)
    out = cot.ffn_worker_batching(_meta_context(), 7, [1, 2, 3, 64], token_dtype=3, mx_output_uint8=True)
    assert (out[0].dtype, out[6].dtype) == (torch.float8_e5m2, torch.uint8)  # an fp8 y keeps its dtype


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_out_shape=[2, 3, 4]), "max_out_shape must be [A, BS, K, H]"),
    (dict(max_out_shape=[0, 3, 4, 8]), "A must be in [1, 1024], got 0"),
    (dict(max_out_shape=[2, 3, 65, 8]), "K must be in [1, 64], got 65"),
    (dict(expert_num=0), "expert_num must be in [1, 8192], got 0"),
    (dict(token_dtype=6), "token_dtype must be in [0, 5], got 6"),
    (dict(need_schedule=2), "need_schedule must be 0 or 1, got 2"),
    (dict(layer_num=8), "layer_num must be in [0, expert_num], got 8"),
    (dict(need_schedule=1, sync_flag=True), "async RECV requires layer_num > 0"),
    (dict(need_schedule=1, sync_flag=True, layer_num=3), "async RECV requires expert_num divisible by layer_num"),
    (dict(token_dtype=5, max_out_shape=[2, 3, 4, 7]), "FP4 requires even H, got 7"),
])
def test_batching_v2_refuses_what_the_real_validate_refuses(kwargs, message):
    args = dict(expert_num=4, max_out_shape=[2, 3, 4, 8])
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cot.ffn_worker_batching(_meta_context(), args.pop("expert_num"), args.pop("max_out_shape"), **args)


def test_batching_v2_needs_a_950(monkeypatch):
    monkeypatch.setenv("AFD_NPU_SOC_NAME", "Ascend910_9392")
    ctx = torch.zeros(1024, dtype=torch.int8, device="npu")
    with pytest.raises(RuntimeError, match="ffn_worker_batching supports arch35/Ascend950 only, got Ascend910_9392"):
        cot.ffn_worker_batching(ctx, 4, [1, 1, 2, 8])


def test_the_sync_flag_an_int_is_taken_as_the_schema_bool():
    out = cot.ffn_worker_batching(_meta_context(), 4, [1, 2, 3, 8], need_schedule=1, layer_num=2, sync_flag=1)
    assert len(out) == 8  # the connector passes sync_flag=1: torch's bool argument takes it


def test_the_buffer_size_helpers_give_the_real_formulas():
    a, m, bs, k1, hs = 2, 2, 4, 3, 1536
    info, data = [a, m, 2 + bs * k1], [a, m, bs, k1, hs]
    mib2 = 2 << 20

    def up(n, k):
        return (n + k - 1) // k * k

    for quant, b in ((0, 2), (2, 1)):
        needed = (up(a * m * info[2] * 4, 512) + up(a * m * bs * k1 * hs * b, 512) + up(bs * k1 * up(hs * b, 32), 512)
                  + (bs * k1 + 1) * 32)
        assert cot.get_attention_to_ffn_ccl_buffer_size(info, data, quant) == up(needed, mib2)
    w, t = 4, m * bs * k1
    raw = up(up((w - 1) * m * (bs * k1 + 2) * 4, 512) + up((w - 1) * t * hs * 2, 512) + 1024 * 32, 512)
    want = up(raw + w * up(w * t * 16, 512) + 1025 * up(w * 4, 512), mib2)
    assert cot.get_ffn_to_attention_ccl_buffer_size([m, bs, k1], [m, bs, k1, hs], w) == want
    with pytest.raises(RuntimeError, match="ffn_token_info_table_shape should have 3 elements, but got 2"):
        cot.get_attention_to_ffn_ccl_buffer_size([1, 2], data, 0)


def test_the_a2f_and_f2a_meta_checks_speak_as_the_real_ones():
    meta = dict(device="meta")
    i32 = dict(dtype=torch.int32, **meta)
    ctx = torch.empty(8, **i32)
    one = torch.empty(1, **i32)
    with pytest.raises(RuntimeError, match=r"x should be 3D, but got 2D, (\n\[ERROR\].* ERR01003 OPS invalid value)?\."):
        torch.ops.cann_ops_transformer.npu_attention_to_ffn(
            ctx, torch.empty(4, 8, dtype=torch.bfloat16, **meta), one, one, one, torch.empty(1, 4, 2, **i32),
            torch.empty(1, 3, 3, **i32), "g", 3, [1, 1, 11], [1, 1, 4, 3, 8], [1, 4, 3], 2, 0, 0, 0, 1 << 21)
    with pytest.raises(RuntimeError, match="token_data_shape should have 4 elements, but got 3"):
        torch.ops.cann_ops_transformer.npu_ffn_to_attention(
            ctx, torch.empty(4, 8, dtype=torch.bfloat16, **meta), *(torch.empty(4, **i32) for _ in range(4)),
            torch.empty(1, dtype=torch.int64, **meta), "g", 3, [1, 4, 3], [1, 4, 3], 1 << 21)


@pytest.mark.parametrize("token_dtype, quant_mode", [(2, 3), (3, 4), (4, 5)])
def test_the_950_combine_dequantises_mx_slots_through_torch_npu(token_dtype, quant_mode, monkeypatch):
    """torch_npu.npu_attention_worker_combine on a 950 die: packed MX rows in the attention window, E8M0 scales as
    a float8_e8m0fnu tensor, y bf16 = the sum of the dequantised K+1 slots (afd.tokens' arithmetic, in k order)."""
    import numpy as np
    import torch_npu
    from npu_helpers import attention_side

    from afd.npu.tensors import numpy_of
    from afd.tokens import BF16, QUANT_MODES, mx_dequantize, mx_quantize

    monkeypatch.setenv("AFD_NPU_SOC_NAME", "Ascend950PR_9599")
    side = attention_side(M=2, BS=3, K=2, H=64)
    k1, h, mb = side.K + 1, side.H, 0
    element = QUANT_MODES[quant_mode].element
    rows = (torch.randn(side.BS * k1, h, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    payload, scales = mx_quantize(rows.view(torch.int16).numpy().view(BF16), quant_mode)
    row_bytes = payload.shape[1]
    window = numpy_of(side.window).view(np.uint8)
    start = 512 + mb * side.BS * k1 * row_bytes  # the combine reads packed rows after align512(flags)
    window[start:start + payload.size] = payload.reshape(-1)
    side.flags[mb] = 1
    s = scales.shape[1] + scales.shape[1] % 2
    e8m0 = np.zeros((side.BS, k1, s), np.uint8)
    e8m0[:, :, :scales.shape[1]] = scales.reshape(side.BS, k1, -1)
    expert_scales = torch.from_numpy(e8m0).view(torch.float8_e8m0fnu).npu()
    y, _ = torch_npu.npu_attention_worker_combine(side.context, expert_scales, torch.zeros(1, dtype=torch.int32).npu(),
                                                  h, token_dtype=token_dtype, need_schedule=1)
    values = mx_dequantize(payload, scales, element, h).reshape(side.BS, k1, h)
    acc = np.zeros((side.BS, h), np.float32)
    for k in range(k1):
        acc = acc + values[:, k]
    want = acc.astype(BF16)
    got = y.cpu().view(torch.int16).numpy()
    assert (got == want.view(np.int16)).all()
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (side.BS, h)


@pytest.mark.parametrize("change, message", [
    (dict(x=lambda t: t[0]), "The x should be 2D, current dim is: 1"),
    (dict(session_ids=lambda t: t.long()), "dtype of sessionIds should be int32."),
    (dict(actual_token_num=lambda t: t.int()), "dtype of actualTokenNum should be int64."),
    (dict(x=lambda t: t.float()), "dtype of x should be bfloat16 or float16, but got Float"),
    (dict(group=""), "group should not be empty."),
])
def test_the_f2a_op_checks_as_its_pybind_function(change, message):
    """The eager path runs csrc/ffn_to_attention.cpp's TORCH_CHECKs (RuntimeError, their texts) before the op."""
    ids = torch.zeros(4, dtype=torch.int32, device="npu")
    args = dict(context=torch.zeros(8, dtype=torch.int32, device="npu"),
                x=torch.zeros(4, 1024, dtype=torch.bfloat16, device="npu"), session_ids=ids, micro_batch_ids=ids,
                token_ids=ids, expert_offsets=ids, actual_token_num=torch.zeros(1, dtype=torch.int64, device="npu"),
                group="nowhere", world_size=2, token_info_table_shape=[1, 2, 2],
                token_data_shape=[1, 2, 2, 1024], ccl_buffer_size=1 << 21)
    for key, fn in change.items():
        args[key] = fn(args[key]) if callable(fn) else fn
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.cann_ops_transformer.npu_ffn_to_attention(**args)
