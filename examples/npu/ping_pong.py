"""Multi-layer ping-pong with two micro-batches on two streams, in the style of the DeepSeek AFD reference models.

The attention rank (1) splits its batch into M = 2 micro-batches. Per layer it issues, on a send stream, the
attention stand-in, the gate and npu_attention_to_ffn of every micro-batch, then, on a receive stream, the
npu_attention_worker_combine(need_schedule=1) of each in round-robin order and the residual add; events order the
streams (a micro-batch's next layer waits for its combine). The FFN rank (0) runs npu_ffn_worker_batching
(need_schedule=1) -> experts -> npu_ffn_to_attention for each micro-batch of each layer.

    afd npu -- torchrun --standalone --nproc-per-node 2 examples/npu/ping_pong.py --out /tmp/pp
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch_npu

FFN_RANK, ATTENTION_RANK, WORLD_SIZE = 0, 1, 2


def align_up(n, align=512):
    return (n + align - 1) // align * align


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bs", type=int, default=32, help="tokens per micro-batch")
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def window_size(a, rank):
    k1 = a.topk + 1
    slots = a.micro_batches * a.bs * k1
    if rank == ATTENTION_RANK:
        return align_up(4 * slots) + 2 * a.hidden * slots
    return align_up(4 * a.micro_batches * (2 + a.bs * k1)) + 2 * a.hidden * slots


def weights(a):
    """The attention stand-in's per-layer scale, the router, and the input micro-batches (same on every run)."""
    g = torch.Generator().manual_seed(a.seed)
    attn = [(torch.rand(a.hidden, generator=g) + 0.5).to(torch.bfloat16) for _ in range(a.layers)]
    router = [torch.randn(a.hidden, a.experts, generator=g) / a.hidden ** 0.5 for _ in range(a.layers)]
    inputs = [(torch.randn(a.bs, a.hidden, generator=g) * 0.5).to(torch.bfloat16) for _ in range(a.micro_batches)]
    return attn, router, inputs


def attention(w, h):
    return (h.float() * w.float()).to(torch.bfloat16)


def gate(router, x, topk):
    """Top-k experts by router logits (ids int32) and their softmax weights over the top k (float32)."""
    logits = x.float() @ router
    values, ids = torch.topk(logits, topk, dim=-1)
    return ids.to(torch.int32), torch.softmax(values, dim=-1)


def experts(hidden, group_list, actual):
    """Expert e scales its rows by (e + 1) / 8 (the stand-in for the grouped matmul), bf16 out."""
    factor = torch.empty(actual, dtype=torch.float32, device=hidden.device)
    start = 0
    for expert, count in group_list.tolist():
        if count == 0:
            break
        factor[start:start + count] = (expert + 1) / 8
        start += count
    out = torch.zeros(hidden.shape, dtype=torch.bfloat16, device=hidden.device)
    out[:actual] = (hidden[:actual].float() * factor[:, None]).to(torch.bfloat16)
    return out


def expert_rank_table(a):
    table = torch.zeros(1, a.experts + 1, 3, dtype=torch.int32)
    table[:, :, 0], table[:, :, 1] = 1, FFN_RANK
    table[:, :, 2] = torch.arange(a.experts + 1, dtype=torch.int32)
    return table


def attention_rank(a, context, group_name, device):
    M, k1 = a.micro_batches, a.topk + 1
    attn_w, router, inputs = weights(a)
    attn_w = [w.to(device) for w in attn_w]
    router = [r.to(device) for r in router]
    h = [x.to(device) for x in inputs]
    table = expert_rank_table(a).to(device)
    session_id = torch.zeros(1, dtype=torch.int32, device=device)
    mb_ids = torch.arange(M, dtype=torch.int32, device=device)
    layer_ids = torch.arange(a.layers, dtype=torch.int32, device=device)
    a2f_layer = torch.zeros(1, dtype=torch.int32, device=device)  # sync mode: A2F layer id 0
    send, recv = torch.npu.Stream(), torch.npu.Stream()
    combined = [None] * M
    for layer in range(a.layers):
        sent, scales = [], []
        for mb in range(M):
            with torch.npu.stream(send):
                if combined[mb] is not None:
                    send.wait_event(combined[mb])  # this micro-batch's previous layer is combined
                x = attention(attn_w[layer], h[mb])
                ids, weights_ = gate(router[layer], x, a.topk)
                torch_npu.npu_attention_to_ffn(
                    x[None], session_id, mb_ids[mb:mb + 1], a2f_layer, ids[None], table, group_name, WORLD_SIZE,
                    [1, M, 2 + a.bs * k1], [1, M, a.bs, k1, a.hidden], [M, a.bs, k1], a.experts,
                    quant_mode=0, sync_flag=0, ffn_start_rank_id=FFN_RANK)
                event = torch.npu.Event()
                event.record(send)
                sent.append(event)
                scales.append(weights_)
        for mb in range(M):  # the combine takes micro-batches round robin: 0, 1, 0, 1, ...
            with torch.npu.stream(recv):
                recv.wait_event(sent[mb])
                scales[mb].record_stream(recv)
                y, _ = torch_npu.npu_attention_worker_combine(context, scales[mb], layer_ids[layer:layer + 1],
                                                              a.hidden, token_dtype=1, need_schedule=1)
                h[mb] = (h[mb].float() + y.float()).to(torch.bfloat16)
                combined[mb] = torch.npu.Event()
                combined[mb].record(recv)
    torch.npu.synchronize()
    return [t.cpu() for t in h]


def ffn_rank(a, context, group_name, device):
    M, k1 = a.micro_batches, a.topk + 1
    attn_rank_table = torch.tensor([ATTENTION_RANK], dtype=torch.int32, device=device)
    for layer in range(a.layers):
        for mb in range(M):
            (hidden, group_list, session_ids, micro_batch_ids, token_ids, expert_offsets, _,
             actual_token_num) = torch_npu.npu_ffn_worker_batching(context, a.experts + 1, [1, a.bs, k1, a.hidden],
                                                                   token_dtype=1, need_schedule=1)
            out = experts(hidden, group_list, int(actual_token_num.item()))
            torch_npu.npu_ffn_to_attention(out, session_ids, micro_batch_ids, token_ids, expert_offsets,
                                           actual_token_num, group_name, WORLD_SIZE, [M, a.bs, k1],
                                           [M, a.bs, k1, a.hidden], attn_rank_table=attn_rank_table)
    torch.npu.synchronize()


def main(argv=None):
    a = parse_args(argv)
    rank = int(os.environ["RANK"])
    torch.npu.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("npu", torch.npu.current_device())
    dist.init_process_group(backend="hccl")
    control = dist.new_group(ranks=[0, 1], backend="gloo")
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("npu"))
    group_name = backend.get_hccl_comm_name(rank)
    backend._window_register_and_exchange(window_size(a, rank), [1 - rank])
    window = backend._get_window_mem()
    common = dict(session_num=1, micro_batch_num=a.micro_batches, micro_batch_size=a.bs,
                  selected_expert_num=a.topk + 1, expert_num=a.experts + 1, attn_to_ffn_token_size=2 * a.hidden,
                  ffn_to_attn_token_size=2 * a.hidden)
    side = "attention" if rank == ATTENTION_RANK else "ffn"
    holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=1 if rank == ATTENTION_RANK else 0, **{f"{side}_window": window.data_ptr(),
                                                              f"{side}_window_size": window.numel()}, **common)
    context = holder.get_schedule_context_tensor()
    dist.barrier(group=control)
    if rank == ATTENTION_RANK:
        out = attention_rank(a, context, group_name, device)
        print(f"attention done: {a.layers} layers x {a.micro_batches} micro-batches, "
              f"h[0][0,:3]={out[0][0, :3].float().tolist()}")
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            torch.save(out, os.path.join(a.out, "hidden.pt"))
    else:
        ffn_rank(a, context, group_name, device)
        print("ffn done")
    dist.barrier(group=control)
    holder.stop_schedule()
    dist.destroy_process_group(control)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
