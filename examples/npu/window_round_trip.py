"""A four-operator window round trip on two NPUs, written as torch_npu AFD repro scripts are (FFN rank 0,
attention rank 1): npu_attention_to_ffn -> npu_ffn_worker_batching(need_schedule=1) -> experts ->
npu_ffn_to_attention -> npu_attention_worker_combine(need_schedule=1), over HCCL windows, several steps.

    afd npu -- torchrun --standalone --nproc-per-node 2 examples/npu/window_round_trip.py --out /tmp/rt

Nothing here knows about afd-sim: on two Ascend NPUs the same file runs under plain torchrun. With --out, the
attention rank saves every step's combine output (outputs.pt) for a comparison with a reference.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch_npu

FFN_RANK, ATTENTION_RANK, WORLD_SIZE = 0, 1, 2


def align_up(n, align=512):
    return (n + align - 1) // align * align


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bs", type=int, default=256, help="CAPACITY: tokens per micro-batch")
    p.add_argument("--topk", type=int, default=6, help="routed experts per token (K); K+1 slots with the shared")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=16, help="routed experts (moe_expert_num)")
    p.add_argument("--quant-mode", type=int, default=2, choices=(0, 2))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--active", type=int, default=None, help="tokens of each step that are real (active_mask)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true", help="no line per step")
    return p.parse_args(argv)


def token_bytes(a):
    """Bytes per token slot in the FFN window: int8 H + fp32 scale (quant mode 2) or H bf16 values."""
    return align_up(a.hidden + 4) if a.quant_mode == 2 else 2 * a.hidden


def window_size(a, rank):
    k1 = a.topk + 1
    if rank == ATTENTION_RANK:
        return align_up(4 * k1 * a.bs) + 2 * a.hidden * k1 * a.bs
    return align_up(4 * (k1 * a.bs + 2)) + token_bytes(a) * k1 * a.bs


def make_inputs(a, step):
    """The attention rank's inputs of one step: hidden states, routed expert ids, their gate weights."""
    g = torch.Generator().manual_seed(a.seed * 1000 + step)
    x = (torch.randn(1, a.bs, a.hidden, generator=g) * 0.5).to(torch.bfloat16)
    expert_ids = torch.stack([torch.randperm(a.experts, generator=g)[:a.topk] for _ in range(a.bs)])[None]
    scales = torch.rand(a.bs, a.topk, generator=g)
    scales = scales / scales.sum(dim=1, keepdim=True)
    return x, expert_ids.to(torch.int32), scales.to(torch.float32)


def experts(hidden, dynamic_scale, group_list, actual, quant_mode):
    """A stand-in for the grouped matmul: expert e scales its rows by (e + 1) / 8 after dequantizing (bf16 out)."""
    rows = hidden[:actual].float()
    if quant_mode == 2:
        rows = rows * dynamic_scale[:actual, None]
    factor = torch.empty(actual, dtype=torch.float32, device=hidden.device)
    start = 0
    for expert, count in group_list.tolist():
        if count == 0:
            break
        factor[start:start + count] = (expert + 1) / 8
        start += count
    out = torch.zeros(hidden.shape, dtype=torch.bfloat16, device=hidden.device)
    out[:actual] = (rows * factor[:, None]).to(torch.bfloat16)
    return out


def expert_rank_table(a):
    """[L=1, experts + 1 shared, 3]: every expert has one copy, on the FFN rank, local id = global id."""
    table = torch.zeros(1, a.experts + 1, 3, dtype=torch.int32)
    table[:, :, 0] = 1
    table[:, :, 1] = FFN_RANK
    table[:, :, 2] = torch.arange(a.experts + 1, dtype=torch.int32)
    return table


def main(argv=None):
    a = parse_args(argv)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    k1 = a.topk + 1
    torch.npu.set_device(local_rank)
    device = torch.device(f"npu:{local_rank}")
    dist.init_process_group(backend="hccl")
    control_group = dist.new_group(ranks=[0, 1], backend="gloo")
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("npu"))
    group_name = str(backend.get_hccl_comm_name(rank))
    backend._window_register_and_exchange(window_size(a, rank), [1 - rank])
    window = backend._get_window_mem()
    common = dict(session_num=1, micro_batch_num=1, micro_batch_size=a.bs, selected_expert_num=k1,
                  expert_num=a.experts + 1, attn_to_ffn_token_size=token_bytes(a), ffn_to_attn_token_size=2 * a.hidden)
    size = window.numel() * window.element_size()
    if rank == ATTENTION_RANK:
        holder = torch_npu._afd.create_schedule_context_holder(
            schedule_mode=1, attention_window=window.data_ptr(), attention_window_size=size, **common)
    else:
        holder = torch_npu._afd.create_schedule_context_holder(
            schedule_mode=0, ffn_window=window.data_ptr(), ffn_window_size=size, **common)
    context = holder.get_schedule_context_tensor()
    dist.barrier(group=control_group)

    outputs = []
    if rank == ATTENTION_RANK:
        session_id = torch.zeros(1, dtype=torch.int32, device=device)
        micro_batch_id = torch.zeros(1, dtype=torch.int32, device=device)
        layer_id = torch.zeros(1, dtype=torch.int32, device=device)
        table = expert_rank_table(a).to(device)
        for step in range(a.steps):
            if step == 1:
                t_first = time.perf_counter()  # step 0 warms up; the rate is over the rest
            x, expert_ids, scales = make_inputs(a, step)
            active = a.bs if a.active is None else a.active
            active_mask = (torch.arange(a.bs) < active)[None].to(device)
            torch_npu.npu_attention_to_ffn(
                x.to(device), session_id, micro_batch_id, layer_id, expert_ids.to(device), table, group_name,
                WORLD_SIZE, [1, 1, 2 + a.bs * k1], [1, 1, a.bs, k1, token_bytes(a) if a.quant_mode == 2 else a.hidden],
                [1, a.bs, k1], a.experts, quant_mode=a.quant_mode, sync_flag=0, ffn_start_rank_id=FFN_RANK,
                active_mask=active_mask)
            output, next_layer_id = torch_npu.npu_attention_worker_combine(
                context, scales.to(device), layer_id, a.hidden, token_dtype=1, need_schedule=1)
            torch.npu.synchronize()
            outputs.append(output[:active].cpu())
            flags = window[:4 * a.bs * k1].view(torch.int32)
            if not a.quiet:
                print(f"attention step={step} next_layer_id={next_layer_id.item()} "
                      f"flags_left={int(flags.sum().item())} y[0,:4]={output[0, :4].float().tolist()}")
        if a.steps > 1:
            print(f"round_trips_per_s={(a.steps - 1) / (time.perf_counter() - t_first):.1f}")
    else:
        attn_rank_table = torch.tensor([ATTENTION_RANK], dtype=torch.int32, device=device)
        token_dtype = 2 if a.quant_mode == 2 else 1
        for step in range(a.steps):
            (hidden_states, group_list, session_ids, micro_batch_ids, token_ids, expert_offsets, dynamic_scale,
             actual_token_num) = torch_npu.npu_ffn_worker_batching(
                context, a.experts + 1, [1, a.bs, k1, a.hidden], token_dtype=token_dtype, need_schedule=1,
                layer_num=0)
            actual = int(actual_token_num.item())
            ffn_output = experts(hidden_states, dynamic_scale, group_list, actual, a.quant_mode)
            torch_npu.npu_ffn_to_attention(
                ffn_output, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num.reshape(-1),
                group_name, WORLD_SIZE, [1, a.bs, k1], [1, a.bs, k1, a.hidden], attn_rank_table=attn_rank_table)
            torch.npu.synchronize()
            if not a.quiet:
                print(f"ffn step={step} actual_token_num={actual}")
    dist.barrier(group=control_group)
    holder.stop_schedule()
    if a.out and rank == ATTENTION_RANK:
        os.makedirs(a.out, exist_ok=True)
        torch.save(outputs, os.path.join(a.out, "outputs.pt"))
    dist.destroy_process_group(control_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
