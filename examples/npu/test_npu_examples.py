"""The examples/npu scripts under `afd npu -- torchrun`: they run unmodified and give afd-sim's reference bit for bit.

The reference is the same chain of afd-sim operators on numpy arrays in one process (afd.ops over two windows of
afd.device memory), fed the same inputs and the same expert function as the script's.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import afd.npu
from afd.comm import Group, LocalWindow
from afd.device import Device
from afd.ops import (
    attention_to_ffn,
    attention_worker_combine,
    create_schedule_context_holder,
    ffn_to_attention,
    ffn_worker_batching,
)

HERE = Path(__file__).parent
afd.npu.install()  # the scripts import torch_npu; their helpers are used here for the reference


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"npu_example_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rt = load("window_round_trip")


@pytest.fixture
def dev():
    d = Device()
    yield d
    d.close()


def bf16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def reference_round_trip(argv: list[str], dev) -> list[np.ndarray]:
    """window_round_trip.py's combine outputs, computed by afd.ops in this process."""
    a = rt.parse_args(argv)
    k1 = a.topk + 1
    sizes = {r: rt.window_size(a, r) for r in (rt.FFN_RANK, rt.ATTENTION_RANK)}
    bufs = {r: dev.malloc(sizes[r]) for r in sizes}
    for b in bufs.values():
        b.view()[:] = 0
    common = dict(session_num=1, micro_batch_num=1, micro_batch_size=a.bs, selected_expert_num=k1,
                  expert_num=a.experts + 1, attn_to_ffn_token_size=rt.token_bytes(a),
                  ffn_to_attn_token_size=2 * a.hidden)
    attn = create_schedule_context_holder(1, attention_window=bufs[1].address, attention_window_size=sizes[1],
                                          device=dev, **common)
    ffn = create_schedule_context_holder(0, ffn_window=bufs[0].address, ffn_window_size=sizes[0], device=dev,
                                         **common)
    attn.init()
    ffn.init()
    group = Group("reference", 2, {r: LocalWindow(dev, bufs[r].address, sizes[r]) for r in bufs})
    table = rt.expert_rank_table(a).numpy()
    one = np.zeros(1, np.int32)
    outputs = []
    try:
        for step in range(a.steps):
            x, expert_ids, scales = rt.make_inputs(a, step)
            active = a.bs if a.active is None else a.active
            mask = (np.arange(a.bs) < active)[None]
            hs = rt.token_bytes(a) if a.quant_mode == 2 else a.hidden
            attention_to_ffn(bf16(x), one, one, one, expert_ids.numpy(), table, active_mask=mask, group=group,
                             world_size=2, ffn_token_info_table_shape=[1, 1, 2 + a.bs * k1],
                             ffn_token_data_shape=[1, 1, a.bs, k1, hs], attn_token_info_table_shape=[1, a.bs, k1],
                             moe_expert_num=a.experts, quant_mode=a.quant_mode, sync_flag=0,
                             ffn_start_rank_id=rt.FFN_RANK, rank=rt.ATTENTION_RANK)
            batch = ffn_worker_batching(ffn.get_schedule_context(), a.experts + 1, [1, a.bs, k1, a.hidden],
                                        token_dtype=2 if a.quant_mode == 2 else 1, need_schedule=1)
            n = int(batch.actual_token_num[0])
            hidden = torch.from_numpy(np.ascontiguousarray(batch.y).view(np.int8 if a.quant_mode == 2 else np.int16))
            if a.quant_mode != 2:
                hidden = hidden.view(torch.bfloat16)
            out = rt.experts(hidden, torch.from_numpy(batch.dynamic_scale), torch.from_numpy(batch.group_list), n,
                             a.quant_mode)
            ffn_to_attention(bf16(out), batch.session_ids, batch.micro_batch_ids, batch.token_ids,
                             batch.expert_offsets, batch.actual_token_num, group, 2, [1, a.bs, k1],
                             [1, a.bs, k1, a.hidden], attn_rank_table=np.array([rt.ATTENTION_RANK], np.int32))
            y, _ = attention_worker_combine(attn.get_schedule_context(), scales.numpy(), np.zeros(1, np.int32),
                                            a.hidden, token_dtype=1, need_schedule=1)
            outputs.append(y[:active])
    finally:
        attn.close()
        ffn.close()
    return outputs


ROUND_TRIPS = {
    "BS256-K1=7-quant2": ["--bs", "256", "--topk", "6", "--quant-mode", "2", "--steps", "3"],
    "BS256-K1=9-quant0": ["--bs", "256", "--topk", "8", "--quant-mode", "0", "--steps", "2"],
    "BS128-K1=9-quant2-active100": ["--bs", "128", "--topk", "8", "--quant-mode", "2", "--steps", "2",
                                    "--active", "100"],
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("argv", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_window_round_trip_equals_the_reference_bit_for_bit(argv, afd_torchrun, tmp_path, dev):
    result = afd_torchrun(HERE / "window_round_trip.py", *argv, "--out", tmp_path)
    assert result.returncode == 0, result.failure()
    assert {r: v.exit_code for r, v in result.ranks.items()} == {0: 0, 1: 0}
    got = torch.load(tmp_path / "outputs.pt")
    want = reference_round_trip(argv, dev)
    assert len(got) == len(want) == rt.parse_args(argv).steps
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.bfloat16 and tuple(g.shape) == w.shape
        same = bf16(g).view(np.uint16) == w.view(np.uint16)
        assert same.all(), f"step {step}: {int((~same).sum())} of {same.size} values differ from the reference"
    assert "flags_left=0" in result.ranks[1].output


pp = load("ping_pong")


def reference_ping_pong(argv: list[str], dev) -> list[np.ndarray]:
    """ping_pong.py's final hidden states: the same layers and micro-batches through afd.ops in this process."""
    a = pp.parse_args(argv)
    M, k1 = a.micro_batches, a.topk + 1
    sizes = {r: pp.window_size(a, r) for r in (pp.FFN_RANK, pp.ATTENTION_RANK)}
    bufs = {r: dev.malloc(sizes[r]) for r in sizes}
    for b in bufs.values():
        b.view()[:] = 0
    common = dict(session_num=1, micro_batch_num=M, micro_batch_size=a.bs, selected_expert_num=k1,
                  expert_num=a.experts + 1, attn_to_ffn_token_size=2 * a.hidden, ffn_to_attn_token_size=2 * a.hidden)
    attn = create_schedule_context_holder(1, attention_window=bufs[1].address, attention_window_size=sizes[1],
                                          device=dev, **common)
    ffn = create_schedule_context_holder(0, ffn_window=bufs[0].address, ffn_window_size=sizes[0], device=dev,
                                         **common)
    attn.init()
    ffn.init()
    group = Group("reference-pp", 2, {r: LocalWindow(dev, bufs[r].address, sizes[r]) for r in bufs})
    attn_w, router, h = pp.weights(a)
    table = pp.expert_rank_table(a).numpy()
    try:
        for layer in range(a.layers):
            scales = []
            for mb in range(M):
                x = pp.attention(attn_w[layer], h[mb])
                ids, w = pp.gate(router[layer], x, a.topk)
                scales.append(w.numpy())
                attention_to_ffn(bf16(x)[None], np.zeros(1, np.int32), np.array([mb], np.int32),
                                 np.zeros(1, np.int32), ids.numpy()[None], table, group=group, world_size=2,
                                 ffn_token_info_table_shape=[1, M, 2 + a.bs * k1],
                                 ffn_token_data_shape=[1, M, a.bs, k1, a.hidden],
                                 attn_token_info_table_shape=[M, a.bs, k1], moe_expert_num=a.experts,
                                 ffn_start_rank_id=pp.FFN_RANK, rank=pp.ATTENTION_RANK)
            for mb in range(M):
                batch = ffn_worker_batching(ffn.get_schedule_context(), a.experts + 1, [1, a.bs, k1, a.hidden],
                                            token_dtype=1, need_schedule=1)
                hidden = torch.from_numpy(np.ascontiguousarray(batch.y).view(np.int16)).view(torch.bfloat16)
                out = pp.experts(hidden, torch.from_numpy(batch.group_list), int(batch.actual_token_num[0]))
                ffn_to_attention(bf16(out), batch.session_ids, batch.micro_batch_ids, batch.token_ids,
                                 batch.expert_offsets, batch.actual_token_num, group, 2, [M, a.bs, k1],
                                 [M, a.bs, k1, a.hidden], attn_rank_table=np.array([pp.ATTENTION_RANK], np.int32))
            for mb in range(M):
                y, _ = attention_worker_combine(attn.get_schedule_context(), scales[mb],
                                                np.array([layer], np.int32), a.hidden, token_dtype=1,
                                                need_schedule=1)
                y_t = torch.from_numpy(y.view(np.int16).copy()).view(torch.bfloat16)
                h[mb] = (h[mb].float() + y_t.float()).to(torch.bfloat16)
    finally:
        attn.close()
        ffn.close()
    return [bf16(t) for t in h]


@pytest.mark.timeout(240)
def test_ping_pong_on_two_streams_equals_the_reference(afd_torchrun, tmp_path, dev):
    argv = ["--layers", "3", "--micro-batches", "2", "--bs", "32"]
    result = afd_torchrun(HERE / "ping_pong.py", *argv, "--out", tmp_path)
    assert result.returncode == 0, result.failure()
    got = torch.load(tmp_path / "hidden.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 for the ranks: the gate's matmul sums alike
    try:
        want = reference_ping_pong(argv, dev)
    finally:
        torch.set_num_threads(threads)
    for mb, (g, w) in enumerate(zip(got, want)):
        same = bf16(g).view(np.uint16) == w.view(np.uint16)
        assert same.all(), f"micro-batch {mb}: {int((~same).sum())} of {same.size} values differ"


fd = load("fault_demo")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", list(fd.FAULTS))
def test_each_fault_kind_ends_as_documented(kind, tmp_path, dev):
    result = fd.run(kind, str(tmp_path))
    assert fd.as_documented(kind, result), (kind, {r: v.exit_code for r, v in result.ranks.items()},
                                            result.output[-3000:])
    if kind == "kill":
        assert result.seconds < 30  # the other rank did not wait for the 60 s stall bound
    if kind in ("delay", "reorder"):
        got = torch.load(tmp_path / "outputs.pt")
        want = reference_round_trip(fd.SHAPE, dev)
        same = [bool((bf16(g).view(np.uint16) == w.view(np.uint16)).all()) for g, w in zip(got, want)]
        # a straggler changes nothing; flags before data make the second step's combine read stale data
        assert same == ([True, True, True] if kind == "delay" else [True, False, True])


wc = load("window_connector")  # (imports cann_ops_transformer: the fake's, served by afd.npu.install())


def reference_window_connector(argv: list[str]) -> list[list[list[np.ndarray]]]:
    """window_connector.py's attention outputs [session][step][micro-batch], computed here: the same gate and
    experts, the 950's int8 quantisation of the A2F payload (afd.tokens), the combine's fp32 sum in k order."""
    from afd.model import combine_reference
    from afd.tokens import BF16, quantize_int8
    a = wc.parse_args(argv)
    attn_w, router = wc.weights(a)
    out = []
    for session in range(a.attention):
        steps = []
        for step in range(a.steps):
            h = [wc.inputs(a, session, step, mb) for mb in range(a.micro_batches)]
            for layer in range(a.layers):
                for mb in range(a.micro_batches):
                    x = wc.attention(attn_w[layer], h[mb])
                    ids, w = wc.gate(a, router[layer], x)
                    scale = None
                    rows = x
                    if a.quant_mode == 2:
                        q, s = quantize_int8(x.float().numpy(), "950")
                        rows, scale = torch.from_numpy(q), torch.from_numpy(s)
                    experts = [[int(e) for e in ids[:, k]] for k in range(a.topk)] + [[a.experts] * len(x)]
                    data = torch.stack([wc.expert_rows(rows, scale, torch.tensor(
                        [wc.factor(layer, e) for e in col], dtype=torch.float32)) for col in experts], dim=1)
                    y = combine_reference(bf16(data), w.numpy(), BF16)
                    y_t = torch.from_numpy(y.view(np.int16).copy()).view(torch.bfloat16)
                    h[mb] = (h[mb].float() + y_t.float()).to(torch.bfloat16)
            steps.append([bf16(t) for t in h])
        out.append(steps)
    return out


CONNECTOR_RUNS = {
    "A1-F3-async-M2-quant0-idle-rank": ["--attention", "1", "--ffn", "3", "--mode", "async", "--micro-batches", "2",
                                        "--quant-mode", "0", "--idle-rank", "2"],
    "A2-F2-sync-M1-quant2": ["--attention", "2", "--ffn", "2", "--mode", "sync", "--micro-batches", "1",
                             "--quant-mode", "2", "--active", "16,9,3,1"],
    "A2-F3-async-M2-quant2": ["--attention", "2", "--ffn", "3", "--mode", "async", "--micro-batches", "2",
                              "--quant-mode", "2", "--layers", "2"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv", CONNECTOR_RUNS.values(), ids=CONNECTOR_RUNS.keys())
def test_the_window_connector_job_equals_the_reference(argv, afd_torchrun, tmp_path):
    a = wc.parse_args(argv)
    from afd.npu.launch import free_port
    result = afd_torchrun(HERE / "window_connector.py", *argv, "--port", free_port(), "--out", tmp_path,
                          nproc=a.attention + a.ffn)
    assert result.returncode == 0, result.failure(4000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 for the ranks: the gate's matmul sums alike
    try:
        want = reference_window_connector(argv)
    finally:
        torch.set_num_threads(threads)
    for session in range(a.attention):
        got = torch.load(tmp_path / f"session{session}.pt")
        for step, (g_step, w_step) in enumerate(zip(got, want[session])):
            for mb, (g, w) in enumerate(zip(g_step, w_step)):
                same = bf16(g).view(np.uint16) == w.view(np.uint16)
                assert same.all(), f"session {session} step {step} mb {mb}: {int((~same).sum())} values differ"
