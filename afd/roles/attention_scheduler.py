"""Attention scheduler sched<s>: attention_worker_scheduler_ in a loop, one micro-batch after the combine took the last."""
from __future__ import annotations

import time

from ..ops._polling import Stopped
from ..ops.attention_worker_scheduler import attention_worker_scheduler_
from ..runtime.memory import COMBINE_DONE, SCHED_DONE
from ..runtime.role import Stall
from ._schedule import total_units, unit
from ._session import attach_session


def explain_missing(cfg, stream, session: int, micro_batch: int, flags) -> list[dict]:
    """For each flag not yet 1: token index, expert slot, expert id and the FFN rank that owed it."""
    out = []
    for token, k in zip(*(flags != 1).nonzero()):
        token, k = int(token), int(k)
        expert = int(stream.expert_ids[micro_batch, token, k]) if k < cfg.top_k else cfg.routed_experts
        ranks = cfg.placement_of(expert)
        out.append({"micro_batch": micro_batch, "token": token, "expert_slot": k, "expert_id": expert,
                    "ffn_rank": ranks[session % len(ranks)]})
    return out


def diagnose(rt, stream, session: int, micro_batch: int):
    """A context manager-free helper: attach what is missing to a Stall before it propagates."""
    def attach(exc: Stall) -> Stall:
        if exc.waiting.flags is not None:
            exc.details = explain_missing(rt.cfg, stream, session, micro_batch, exc.waiting.flags)
        return exc
    return attach


def body(rt) -> None:
    cfg = rt.cfg
    s, ctx, stream = attach_session(rt, "sched")
    counters = stream.counters
    hop_ns = rt.samples("flag_hop_ns")
    for i in range(total_units(cfg)):
        t, layer, m = unit(cfg, i)
        rt.at(t, layer, m)
        # Same stream as the combine on hardware: never advance micro_batch_id before the combine read it.
        rt.wait_until(lambda: counters[COMBINE_DONE] >= i, "attention_worker_combine of the previous micro-batch", m)
        rt.check_faults(t, layer, m)  # right before the op, so a corrupt field meets the op's own check
        try:
            with rt.op("attention_worker_scheduler_"):
                attention_worker_scheduler_(ctx, idle=rt.idle)
        except Stall as exc:
            raise diagnose(rt, stream, s, m)(exc)
        done = time.monotonic_ns()
        if ctx.run_flag == 0:
            raise Stopped(reason="run_flag=0")
        last_flag = int(stream.f2a_last_flag_ns[:, m].max())
        if last_flag:
            hop_ns.append(done - last_flag)
        rt.event("flags_ready", done, {"last_flag_ns": last_flag})
        counters[SCHED_DONE] = i + 1
        rt.ring(f"combine{s}")
        rt.progressed()
