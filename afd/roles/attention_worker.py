"""Attention worker attn<s>: attention + gate for each micro-batch in round-robin order, then attention_to_ffn (V2 on 950)."""
from __future__ import annotations

import numpy as np

from ..model import Model
from ..ops.attention_to_ffn import attention_to_ffn
from ..runtime.memory import A2F_DONE, COMBINE_DONE
from ..timing import DeviceTime, a2f_bytes
from ._schedule import total_units, unit
from ._session import attach_session


def prepare(rt) -> None:
    """Before registering: A2F's compiled row copy and the attention stand-in load (once per machine: compile)
    outside the run's watchdogs (a first compile inside the run stalled heartbeats past the 1 s hang bound)."""
    from ..ops._kernels import warm_up_attention, warm_up_attention_to_ffn, warm_up_copy_rows
    warm_up_copy_rows()
    warm_up_attention_to_ffn()
    for dtype in (rt.cfg.token_dtype,) if rt.cfg else ("fp16", "bf16"):  # no config yet (afd role): both
        warm_up_attention(dtype == "fp16")


def body(rt) -> None:
    cfg, mem = rt.cfg, rt.mem
    s, ctx, stream = attach_session(rt, "attn")
    model = Model(cfg)
    counters = stream.counters
    group = mem.group(notify=lambda rank: rt.ring(f"ffn{rank}"))
    table = mem.expert_rank_table()
    M, BS, K1 = cfg.micro_batch_num, cfg.micro_batch_size, cfg.selected
    ffn_shapes = dict(ffn_token_info_table_shape=[cfg.sessions, M, 2 + BS * K1],
                      ffn_token_data_shape=[cfg.sessions, M, BS, K1, cfg.token_bytes // cfg.itemsize],
                      attn_token_info_table_shape=[M, BS, K1])
    mask = None if cfg.valid_tokens == BS else (np.arange(BS) < cfg.valid_tokens)[None, :]
    sync_flag = 0 if cfg.mode == "sync" else 1
    layer_input: dict[int, np.ndarray] = {}
    a_buf = None
    device = DeviceTime(cfg)
    attention_ns, a2f_args = device.attention_ns(cfg.valid_tokens), {"bytes": a2f_bytes(cfg)}
    a2f_ns = device.link_ns(a2f_args["bytes"])
    for i in range(total_units(cfg)):
        t, layer, m = unit(cfg, i)
        rt.at(t, layer, m)
        rt.check_faults(t, layer, m)
        if i >= M:  # this micro-batch's previous layer pass must have been combined
            rt.wait_until(lambda: counters[COMBINE_DONE] >= i - M + 1, "attention_worker_combine output", m)
        # (the residual in place: the previous layer's h is not needed after it)
        h = model.input(t, s, m) if layer == 0 else model.residual(layer_input[m], stream.y[m], out=layer_input[m])
        layer_input[m] = h
        with rt.op("attention", None, attention_ns):
            a = a_buf = model.attention(layer, h, out=a_buf)  # (one buffer: A2F copies a out of it)
            ids, scales = model.gate(layer, a)
        stream.scales[m] = scales  # read by combine<s> for this micro-batch
        stream.expert_ids[m] = ids  # read by watchdogs to name a missing expert
        with rt.op("attention_to_ffn", a2f_args, a2f_ns):
            attention_to_ffn(a[None], np.array([s], np.int32), np.array([m], np.int32),
                             np.array([layer], np.int32), ids[None], table, active_mask=mask, group=group,
                             world_size=cfg.world_size, moe_expert_num=cfg.routed_experts, sync_flag=sync_flag,
                             ffn_start_rank_id=0, rank=cfg.attention_rank(s), idle=rt.idle,
                             generation=cfg.generation, **ffn_shapes)
        counters[A2F_DONE] = i + 1
        rt.progressed()
        rt.service()
