"""What the attention-side roles of one session attach to: its context (run_flag watched) and its stream area."""
from __future__ import annotations


def attach_session(rt, prefix: str):
    """(session index, ScheduleContext, SessionStream) for role `<prefix><s>`; stops follow the context's run_flag."""
    s = int(rt.role[len(prefix):])
    ctx = rt.mem.attention_context(s)
    rt.watched_run_flags = [ctx.i32[32:33]]
    return s, ctx, rt.mem.stream(s)
