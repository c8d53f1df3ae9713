"""Attention combine combine<s>: attention_worker_combine (arch35 on 950) for each micro-batch the scheduler released
(or polls itself, fused)."""
from __future__ import annotations

import time

import numpy as np

from ..config import TOKEN_DTYPE_CODE
from ..errors import KernelError
from ..model import digest
from ..ops.attention_worker_combine import attention_worker_combine, warm_up
from ..runtime.memory import COMBINE_DONE, SCHED_DONE
from ..runtime.role import Stall
from ._schedule import total_units, unit
from ._session import attach_session
from .attention_scheduler import diagnose


def prepare(rt) -> None:
    """Before registering: the compiled combine loads (or compiles) outside the run's watchdogs."""
    codes = [TOKEN_DTYPE_CODE[rt.cfg.token_dtype]] if rt.cfg else TOKEN_DTYPE_CODE.values()  # afd role: both
    for code in codes:
        warm_up(code)


def body(rt) -> None:
    cfg, mem = rt.cfg, rt.mem
    s, ctx, stream = attach_session(rt, "combine")
    counters = stream.counters
    digests, outputs = mem.digests(), mem.outputs()
    fused = cfg.fuse_scheduler
    valid = cfg.valid_tokens
    hop_ns = rt.samples("flag_hop_ns")
    for i in range(total_units(cfg)):
        t, layer, m = unit(cfg, i)
        rt.at(t, layer, m)
        if not fused:
            rt.wait_until(lambda: counters[SCHED_DONE] > i, "attention_worker_scheduler_", m)
        rt.check_faults(t, layer, m)  # right before the op, so a corrupt field meets the op's own check
        if not fused and ctx.attention.micro_batch_id < cfg.micro_batch_num:  # out of range: the op's check says so
            if ctx.attention.micro_batch_id != m:  # the protocol needs strict round-robin order
                raise KernelError("attention.micro_batch_id",
                                  f"is {ctx.attention.micro_batch_id}, expected {m} (round-robin order broken)")
        try:
            # y straight into the stream's y[m] (not a copy of 0.7 MB after it): attn<s> read the last one for
            # this unit's residual before its A2F, and reads this one only once COMBINE_DONE says so
            with rt.op("attention_worker_combine"):
                y, _ = attention_worker_combine(ctx, stream.scales[m], np.array([layer], np.int32), cfg.hidden_size,
                                                token_dtype=mem.token_dtype_code, need_schedule=int(fused),
                                                idle=rt.idle, generation=cfg.generation, out=stream.y[m])
        except Stall as exc:
            raise diagnose(rt, stream, s, m)(exc)
        if fused:
            last_flag = int(stream.f2a_last_flag_ns[:, m].max())
            if last_flag:
                hop_ns.append(time.monotonic_ns() - last_flag)
            rt.event("flags_ready", time.monotonic_ns(), {"last_flag_ns": last_flag})
        if layer == cfg.layers - 1:
            outputs[s, m] = y
            digests[t % len(digests), s, m] = ((t + 1) << 32) | digest(y[:valid])
        counters[COMBINE_DONE] = i + 1
        rt.ring(f"attn{s}")
        if not fused:
            rt.ring(f"sched{s}")
        rt.progressed()
    rt.send("done", {"role": rt.role})
