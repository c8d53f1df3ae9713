"""An Ascend 950 AFD job in the style of afd-plugin's WindowAFDConnector: cann_ops_transformer's V2 window operators.

World: F FFN ranks first (FFN rank 0 holds the shared expert, the others split the routed experts), then A attention
ranks. The process group is built as afd-plugin builds it (tcp:// rendezvous, PrefixStore,
_new_process_group_helper with Backend("hccl")); every rank's window is a plain npu tensor registered through the
cann_ops_transformer buffers; the holders are torch_npu's. Per step, layer and micro-batch, an attention rank pads
its tokens to the capacity BS and sends them with cot.attention_to_ffn (sync_flag 1 in async mode, 0 in sync mode),
then combines the experts' rows with torch_npu.npu_attention_worker_combine. An FFN rank batches with
cot.ffn_worker_batching (async: the snapshot receive, layer-encoded expert ids) or torch_npu.npu_ffn_worker_batching
(sync), runs its experts and writes the rows back with cot.ffn_to_attention. In async mode with M = 2 the attention
side runs A2F and the combine on streams of their own, ordered by events.

    afd npu -- torchrun --standalone --nproc-per-node 4 examples/npu/window_connector.py --attention 1 --ffn 3
"""
import argparse
import os
import threading
import warnings
from datetime import timedelta

import cann_ops_transformer as cot
import torch
import torch.distributed as dist
import torch_npu
from torch.distributed import Backend
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world
from torch.distributed.rendezvous import rendezvous


def align_up(n, align=512):
    return (n + align - 1) // align * align


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--attention", type=int, default=1, help="attention ranks A")
    p.add_argument("--ffn", type=int, default=2, help="FFN ranks F (rank 0: the shared expert)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bs", type=int, default=16, help="token capacity per micro-batch")
    p.add_argument("--active", default="16,5,1", help="active tokens, cycled over (step, micro-batch)")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--experts", type=int, default=4, help="routed experts E")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--quant-mode", type=int, default=0, choices=(0, 2))
    p.add_argument("--mode", default="async", choices=("async", "sync"))
    p.add_argument("--idle-rank", type=int, default=None, help="a routed FFN rank the gate never picks")
    p.add_argument("--port", type=int, default=None, help="the tcp:// rendezvous port (default MASTER_PORT + 1)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# -- the model: the same on every rank and in the test's reference ----------------------------------------------------
def expert_home(a, expert):
    """(FFN rank, local id) of a routed expert, or of the shared expert (id E) on FFN rank 0."""
    if expert == a.experts:
        return 0, 0
    routed_ranks = a.ffn - 1
    return 1 + expert % routed_ranks, expert // routed_ranks


def local_experts(a, rank):
    """The global expert ids an FFN rank holds, by local id."""
    if rank == 0:
        return [a.experts]
    return [e for e in range(a.experts) if expert_home(a, e)[0] == rank]


def expert_rank_table(a):
    table = torch.zeros(1, a.experts + 1, 3, dtype=torch.int32)
    for e in range(a.experts + 1):
        table[0, e] = torch.tensor([1, *expert_home(a, e)], dtype=torch.int32)
    return table.expand(a.layers, -1, -1).contiguous()  # one row per layer (async A2F indexes the real layer)


def active_tokens(a, step, mb):
    sizes = [int(v) for v in a.active.split(",")]
    return min(a.bs, sizes[(step * a.micro_batches + mb) % len(sizes)])


def weights(a):
    g = torch.Generator().manual_seed(a.seed)
    attn = [(torch.rand(a.hidden, generator=g) + 0.5).to(torch.bfloat16) for _ in range(a.layers)]
    router = [torch.randn(a.hidden, a.experts, generator=g) / a.hidden ** 0.5 for _ in range(a.layers)]
    return attn, router


def inputs(a, session, step, mb):
    g = torch.Generator().manual_seed(a.seed * 1000 + (session * a.steps + step) * a.micro_batches + mb)
    return (torch.randn(active_tokens(a, step, mb), a.hidden, generator=g) * 0.5).to(torch.bfloat16)


def attention(w, h):
    return (h.float() * w.float()).to(torch.bfloat16)


def gate(a, router, x):
    """Top-k routed experts by logits (an idle rank's experts never chosen) and their softmax weights."""
    logits = x.float() @ router
    if a.idle_rank is not None:
        for e in range(a.experts):
            if expert_home(a, e)[0] == a.idle_rank:
                logits[:, e] = float("-inf")
    values, ids = torch.topk(logits, a.topk, dim=-1)
    return ids.to(torch.int32), torch.softmax(values, dim=-1)


def factor(layer, expert):
    return (expert + 1 + layer) / 8


def expert_rows(hidden, scale, factors):
    """The experts' stand-in: rows times their expert's factor (int8 rows dequantised by their scale first)."""
    f = hidden.float()
    if scale is not None:
        f = f * scale[:, None]
    return (f * factors[:, None]).to(torch.bfloat16)


# -- the ranks --------------------------------------------------------------------------------------------------------
def window_sizes(a):
    k1, slots = a.topk + 1, a.micro_batches * a.bs * (a.topk + 1)
    a2f_token = align_up(a.hidden + 4) if a.quant_mode == 2 else 2 * a.hidden
    attn = align_up(align_up(4 * slots) + 2 * a.hidden * slots, 2 << 20)
    ffn = align_up(align_up(4 * (k1 * a.bs + 2) * a.micro_batches * a.attention)
                   + a2f_token * slots * a.attention, 2 << 20)
    return a2f_token, attn, ffn


def attention_rank(a, session, buffer, context, device):
    M, k1 = a.micro_batches, a.topk + 1
    attn_w, router = weights(a)
    attn_w, router = [w.to(device) for w in attn_w], [r.to(device) for r in router]
    table = expert_rank_table(a).to(device)
    session_id = torch.tensor([session], dtype=torch.int32, device=device)
    mb_ids = torch.arange(M, dtype=torch.int32, device=device)
    layer_ids = torch.arange(a.layers, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int32, device=device)  # sync mode: A2F is given layer 0
    overlap = a.mode == "async" and M > 1
    send, recv = (torch.npu.Stream(), torch.npu.Stream()) if overlap else (None, None)
    outputs = []
    for step in range(a.steps):
        h = [inputs(a, session, step, mb).to(device) for mb in range(M)]
        combined = [None] * M
        for layer in range(a.layers):
            sent, scales = [], []
            for mb in range(M):
                b = h[mb].shape[0]
                with torch.npu.stream(send) if overlap else _nothing():
                    if overlap and combined[mb] is not None:
                        send.wait_event(combined[mb])  # this micro-batch's previous layer is combined
                    x = attention(attn_w[layer], h[mb])
                    ids, w = gate(a, router[layer], x)
                    x_pad = x.new_zeros((1, a.bs, a.hidden))
                    x_pad[0, :b] = x
                    ids_pad = torch.zeros((1, a.bs, a.topk), dtype=torch.int32, device=device)
                    ids_pad[0, :b] = ids
                    mask = torch.zeros((1, a.bs), dtype=torch.bool, device=device)
                    mask[0, :b] = True
                    w_pad = torch.zeros((a.bs, a.topk), dtype=torch.float32, device=device)
                    w_pad[:b] = w
                    cot.attention_to_ffn(buffer, x_pad, session_id, mb_ids[mb:mb + 1],
                                         layer_ids[layer:layer + 1] if a.mode == "async" else zero, ids_pad, table,
                                         [M, a.bs, k1], a.experts, sync_flag=1 if a.mode == "async" else 0,
                                         ffn_start_rank_id=0, active_mask=mask)
                    if overlap:
                        event = torch.npu.Event()
                        event.record(send)
                        sent.append(event)
                    scales.append(w_pad)
            for mb in range(M):  # the combine takes the micro-batches round robin
                with torch.npu.stream(recv) if overlap else _nothing():
                    if overlap:
                        recv.wait_event(sent[mb])
                        scales[mb].record_stream(recv)
                    y, _ = torch_npu.npu_attention_worker_combine(context, scales[mb], layer_ids[layer:layer + 1],
                                                                  a.hidden, token_dtype=1, need_schedule=1)
                    scales[mb] = None  # as the connector: only the queued combine holds them now
                    b = h[mb].shape[0]
                    h[mb] = (h[mb].float() + y[:b].float()).to(torch.bfloat16)
                    if overlap:
                        combined[mb] = torch.npu.Event()
                        combined[mb].record(recv)
        torch.npu.synchronize()
        outputs.append([t.cpu() for t in h])
    return outputs


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ffn_rank(a, rank, buffer, context, done, device):
    k1, local = a.topk + 1, local_experts(a, rank)
    attn_rank_table = torch.arange(a.attention, dtype=torch.int32, device=device) + a.ffn
    token_dtype = 2 if a.quant_mode == 2 else 1
    shape = [a.attention, a.bs, k1, a.hidden]
    calls = 0
    while True:
        if a.mode == "async":
            outs = cot.ffn_worker_batching(context, len(local) * a.layers, shape, token_dtype=token_dtype,
                                           need_schedule=1, layer_num=a.layers, sync_flag=1)
        elif calls == a.steps * a.layers * a.micro_batches:
            break
        else:
            outs = torch_npu.npu_ffn_worker_batching(context, len(local), shape, token_dtype=token_dtype,
                                                     need_schedule=1, layer_num=0)
        hidden, group_list, session_ids, micro_batch_ids, token_ids, expert_offsets, scale, actual = outs
        n = int(actual.item())
        if n == 0 and done.is_set():
            break  # the attention ranks are done: run_flag was set to 0 under the waiting batching
        sync_layer = (calls // a.micro_batches) % a.layers
        calls += 1
        factors = torch.empty(n, dtype=torch.float32)
        start = 0
        for expert, count in group_list.cpu().tolist():
            if count == 0:
                continue
            layer, index = (expert // len(local), expert % len(local)) if a.mode == "async" else (sync_layer, expert)
            factors[start:start + count] = factor(layer, local[index])
            start += count
        out = torch.zeros((hidden.shape[0], a.hidden), dtype=torch.bfloat16, device=device)
        out[:n] = expert_rows(hidden[:n], scale[:n] if token_dtype == 2 else None, factors.to(device))
        cot.ffn_to_attention(buffer, out, session_ids, micro_batch_ids, token_ids, expert_offsets,
                             actual.reshape(-1), attn_rank_table=attn_rank_table)
    torch.npu.synchronize()
    return calls


def init_afd_process_group(init_method, world_size, rank, group_name, timeout):
    """As afd-plugin's afd_process_group.py builds the window group."""
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend("hccl"), PrefixStore(group_name, store),
                                      group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg, store


def main(argv=None):
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*ended by run_flag = 0.*")
    rank, world = int(os.environ["RANK"]), a.attention + a.ffn
    if int(os.environ.get("WORLD_SIZE", world)) != world:  # (else every rank waits 60 s for the missing ones)
        raise SystemExit(f"--attention {a.attention} + --ffn {a.ffn} = {world} ranks, but torchrun started "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']}: give --nproc-per-node {world}")
    torch.npu.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="gloo")  # the serving stack's world group (dist.get_rank(group) needs one)
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # a vLLM worker is not a torchelastic worker
    device = torch.device("npu", torch.npu.current_device())
    port = a.port or int(os.environ["MASTER_PORT"]) + 1
    pg, store = init_afd_process_group(f"tcp://{os.environ['MASTER_ADDR']}:{port}", world, rank, "afd_window",
                                       timedelta(seconds=60))
    attention = rank >= a.ffn
    a2f_token, attn_size, ffn_size = window_sizes(a)
    size = attn_size if attention else ffn_size
    window = torch.zeros(size, dtype=torch.uint8, device=torch.device("npu"))
    k1 = a.topk + 1
    M, A = a.micro_batches, a.attention
    if attention:
        buffer = cot.get_buffer_for_attention_to_ffn(pg, world, [A, M, 2 + a.bs * k1], [A, M, a.bs, k1, a2f_token if
                                                     a.quant_mode == 2 else a.hidden], quant_mode=a.quant_mode,
                                                     window_addr=window.data_ptr(), window_size=size)
    else:
        buffer = cot.get_buffer_for_ffn_to_attention(pg, world, [M, a.bs, k1], [M, a.bs, k1, a.hidden],
                                                     window_addr=window.data_ptr(), window_size=size)
    side = "attention" if attention else "ffn"
    holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=1 if attention else 0, session_num=A, micro_batch_num=M, micro_batch_size=a.bs,
        selected_expert_num=k1, expert_num=a.experts + 1, attn_to_ffn_token_size=a2f_token,
        ffn_to_attn_token_size=2 * a.hidden, **{f"{side}_window": window.data_ptr(), f"{side}_window_size": size})
    context = holder.get_schedule_context_tensor()
    store.set(f"ready{rank}", "1")  # every FFN holder has set up its records before any A2F lands
    store.wait([f"ready{r}" for r in range(world)])
    if attention:
        outputs = attention_rank(a, rank - a.ffn, buffer, context, device)
        store.add("attention_done", 1)
        print(f"attention session {rank - a.ffn} done: {a.steps} steps x {a.layers} layers x {M} micro-batches")
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            torch.save(outputs, os.path.join(a.out, f"session{rank - a.ffn}.pt"))
    else:
        done = threading.Event()

        def stop_when_done():  # every attention rank has combined everything: end the batching's wait
            while store.add("attention_done", 0) < A:
                store.wait(["attention_done"])
                if store.add("attention_done", 0) < A:
                    threading.Event().wait(0.01)
            done.set()
            holder.stop_schedule()

        watcher = threading.Thread(target=stop_when_done, daemon=True)
        watcher.start()
        calls = ffn_rank(a, rank, buffer, context, done, device)
        watcher.join(timeout=60)
        print(f"ffn rank {rank} done: {calls} batches of experts {local_experts(a, rank)}")
    store.set(f"finished{rank}", "1")
    store.wait([f"finished{r}" for r in range(world)])
    holder.stop_schedule()
    buffer.destroy()
    dist.destroy_process_group(pg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
