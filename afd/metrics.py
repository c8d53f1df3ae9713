"""Pipeline metrics from the role events: busy / waiting / idle per role, bubble fraction, hop latencies, rates."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

# Ops that are the modelled device compute of a role kind (what the bubble fraction is about).
COMPUTE_OPS = {"attn": ("attention",), "ffn": ("experts",)}
INSTANT = ("flags_ready",)


def role_kind(role: str) -> str:
    return role.rstrip("0123456789")


def session_of(role: str) -> int:
    digits = role[len(role_kind(role)):]
    return int(digits) if digits else 0


def unit_keys(ev, layers: int) -> list[tuple[int, int, int]]:
    """(session, micro_batch, pass) of what an event worked on; pass p = step * layers + layer."""
    if ev.args and "units" in ev.args:
        return [(u[0], u[1], u[3] * layers + u[2]) for u in ev.args["units"]]
    if ev.step < 0 or ev.micro_batch < 0:
        return []
    return [(session_of(ev.role), ev.micro_batch, ev.step * layers + ev.layer)]


def window(events) -> tuple[int, int]:
    """The run's span on the shared clock: first event start to last event end (ns)."""
    if not events:
        return 0, 0
    return min(e.t0 for e in events), max(e.t1 for e in events)


def op_durations(events) -> dict[tuple[str, str], float]:
    """Mean duration (s) of each (role kind, op), waits inside the op excluded."""
    inner = _inner_waits(events)
    sums: dict = defaultdict(lambda: [0, 0])
    for i, e in enumerate(events):
        if e.name == "wait" or e.name in INSTANT:
            continue
        acc = sums[(role_kind(e.role), e.name)]
        acc[0] += e.t1 - e.t0 - inner.get(i, 0)
        acc[1] += 1
    return {k: v[0] / v[1] / 1e9 for k, v in sums.items() if v[1]}


def _inner_waits(events) -> dict[int, int]:
    """Index of an op event -> ns of the wait recorded inside it (the wait follows its op in the role's list)."""
    out = {}
    last_op: dict[str, int] = {}
    for i, e in enumerate(events):
        if e.name == "wait" and e.args and "in" in e.args:
            j = last_op.get(e.role)
            if j is not None and events[j].name == e.args["in"] and events[j].t0 <= e.t0:
                out[j] = out.get(j, 0) + (e.t1 - e.t0)
        elif e.name not in INSTANT and e.name != "wait":
            last_op[e.role] = i
    return out


def _pct(samples_ns: list[int]) -> dict | None:
    if not samples_ns:
        return None
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": int(us.size), "p50": round(float(np.percentile(us, 50)), 2),
            "p90": round(float(np.percentile(us, 90)), 2), "p99": round(float(np.percentile(us, 99)), 2),
            "max": round(float(us.max()), 2)}


def compute(events, cfg) -> dict:
    """Every metric of one run's events (list of afd.trace.Event, in role order, as the roles recorded them)."""
    if not events:
        return {}
    layers = cfg.layers
    t_start, t_end = window(events)
    span = max(1, t_end - t_start)
    inner = _inner_waits(events)
    busy: dict = defaultdict(int)
    waiting: dict = defaultdict(int)
    compute_ns: dict = defaultdict(int)
    a2f_t0, ffn_in, ffn_out, f2a_t0, flags, combine_t1 = {}, {}, {}, defaultdict(int), {}, {}
    ffn_hops = []
    for i, e in enumerate(events):
        kind = role_kind(e.role)
        if e.name == "wait":
            waiting[e.role] += e.t1 - e.t0
            continue
        if e.name in INSTANT:
            if e.name == "flags_ready":
                for key in unit_keys(e, layers):
                    flags[key] = e.t0
            continue
        busy[e.role] += e.t1 - e.t0 - inner.get(i, 0)
        if e.name in COMPUTE_OPS.get(kind, ()):
            compute_ns[e.role] += e.t1 - e.t0
        keys = unit_keys(e, layers)
        if e.name == "attention_to_ffn":
            for k in keys:
                a2f_t0[k] = e.t0
        elif e.name == "ffn_worker_batching":
            for k in keys:  # (on 950 the op receives, so it waits inside: the work arrived when the wait ended)
                ffn_in[(e.role, k)] = e.t0 + inner.get(i, 0)
        elif e.name == "ffn_to_attention":
            for k in keys:
                f2a_t0[k] = max(f2a_t0[k], e.t0)
                start = ffn_in.get((e.role, k))
                if start is not None:
                    ffn_out[(e.role, k)] = e.t1
            if keys and (e.role, keys[0]) in ffn_in:
                ffn_hops.append(e.t1 - ffn_in[(e.role, keys[0])])
        elif e.name == "attention_worker_combine":
            for k in keys:
                combine_t1[k] = e.t1
    roles = {}
    for role in sorted({e.role for e in events}, key=_role_order):
        b, w = busy.get(role, 0), waiting.get(role, 0)
        roles[role] = {"busy": round(b / span, 4), "waiting": round(w / span, 4),
                       "idle": round(max(0.0, 1 - (b + w) / span), 4)}
    compute_roles = [r for r in roles if role_kind(r) in COMPUTE_OPS]
    bubble = 1 - float(np.mean([compute_ns.get(r, 0) / span for r in compute_roles])) if compute_roles else None
    a2f = [t - a2f_t0[k] for (r, k), t in ffn_in.items() if k in a2f_t0 and t >= a2f_t0[k]]
    f2a = [flags[k] - t for k, t in f2a_t0.items() if k in flags and flags[k] >= t]
    fused = cfg.fuse_scheduler
    to_combine = [] if fused else [combine_t1[k] - t for k, t in flags.items() if k in combine_t1]
    done = sum(1 for k in combine_t1 if k[2] % layers == layers - 1)
    return {
        "window_s": round(span / 1e9, 6),
        "roles": roles,
        "bubble_fraction": None if bubble is None else round(bubble, 4),
        "hops_us": {"a2f": _pct(a2f), "ffn": _pct(ffn_hops), "f2a": _pct(f2a), "flag_to_combine": _pct(to_combine)},
        "micro_batches_per_s": round(done / (span / 1e9), 2),
        "micro_batch_layers_per_s": round(len(combine_t1) / (span / 1e9), 2),
    }


def _role_order(role: str) -> tuple:
    order = {"attn": 0, "sched": 1, "combine": 2, "ffn": 3, "controller": 4}
    kind = role_kind(role)
    return (order.get(kind, 5) if kind != "ffn" else 10, session_of(role), order.get(kind, 5))
