"""Attention scheduler sched<s>: attention_worker_scheduler_ in a loop, one micro-batch after the combine took the last."""
from __future__ import annotations

import time

from ..ops.attention_worker_scheduler import attention_worker_scheduler_
from ..ops._polling import Stopped
from ..runtime.memory import COMBINE_DONE, SCHED_DONE
from ._schedule import total_units, unit


def body(rt) -> None:
    cfg, mem = rt.cfg, rt.mem
    s = int(rt.role[len("sched"):])
    ctx = mem.attention_context(s)
    rt.watched_run_flags = [ctx.i32[32:33]]
    stream = mem.stream(s)
    counters = stream.counters
    hop_ns = rt.metrics.setdefault("flag_hop_ns", [])
    for i in range(total_units(cfg)):
        t, layer, m = unit(cfg, i)
        rt.at(t, layer, m)
        # Same stream as the combine on hardware: never advance micro_batch_id before the combine read it.
        rt.wait_until(lambda: counters[COMBINE_DONE] >= i, "attention_worker_combine of the previous micro-batch", m)
        with rt.op("attention_worker_scheduler_"):
            attention_worker_scheduler_(ctx, idle=rt.idle)
        done = time.monotonic_ns()
        if ctx.run_flag == 0:
            raise Stopped("run_flag=0")
        last_flag = int(stream.f2a_last_flag_ns[:, m].max())
        if last_flag:
            hop_ns.append(done - last_flag)
        counters[SCHED_DONE] = i + 1
        rt.ring(f"combine{s}")
        rt.progressed()
