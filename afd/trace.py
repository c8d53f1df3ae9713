"""Timeline traces: role events aligned on one clock, written as Chrome trace JSON (Perfetto, chrome://tracing)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from .metrics import INSTANT, _role_order, role_kind, session_of, unit_keys


class Event(NamedTuple):
    """One recorded event on the controller's clock: an op span, a wait, or an instant (t0 == t1)."""

    role: str
    name: str
    t0: int
    t1: int
    step: int
    layer: int
    micro_batch: int
    args: dict | None


def collect(reports: dict) -> list[Event]:
    """Events of every role report, shifted by each role's clock offset, in role order then recording order."""
    out = []
    for role in sorted(reports, key=_role_order):
        rep = reports[role] or {}
        off = int(rep.get("clock_offset_ns") or 0)
        for raw in rep.get("events") or []:
            name, t0, t1, step, layer, mb = raw[:6]
            out.append(Event(role, name, int(t0) + off, int(t1) + off, int(step), int(layer), int(mb),
                             raw[6] if len(raw) > 6 else None))
    return out


def chrome_trace(events: list[Event], cfg=None, metadata: dict | None = None) -> dict:
    """The Chrome trace event format: a process per role, ops as slices, flows per micro-batch, in-flight counters."""
    layers = cfg.layers if cfg is not None else 1
    roles = sorted({e.role for e in events}, key=_role_order)
    if cfg is not None:
        roles = [r for r in cfg.role_ids() if r != "controller"] + [r for r in roles if r not in cfg.role_ids()]
    pid = {r: i + 1 for i, r in enumerate(roles)}
    t_base = min((e.t0 for e in events), default=0)

    def us(t: int) -> float:
        return (t - t_base) / 1000.0

    out = []
    for r in roles:
        out.append({"ph": "M", "name": "process_name", "pid": pid[r], "tid": 0, "args": {"name": r}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid[r], "tid": 0, "args": {"sort_index": pid[r]}})
        out.append({"ph": "M", "name": "thread_name", "pid": pid[r], "tid": 0, "args": {"name": "ops"}})
        out.append({"ph": "M", "name": "thread_name", "pid": pid[r], "tid": 1, "args": {"name": "waits"}})
    chain: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # unit -> stage -> [(ts, pid)]
    in_flight: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        args = {"step": e.step, "layer": e.layer, "micro_batch": e.micro_batch}
        if role_kind(e.role) != "ffn":
            args["session"] = session_of(e.role)
        if e.args:
            args.update(e.args)
        if e.name in INSTANT:
            out.append({"ph": "i", "s": "t", "name": e.name, "cat": "flag", "pid": pid[e.role], "tid": 0,
                        "ts": us(e.t0), "args": args})
        else:
            wait = e.name == "wait"
            name = f"wait: {e.args.get('for', '?')}" if wait and e.args else e.name
            out.append({"ph": "X", "name": name, "cat": "wait" if wait else "op", "pid": pid[e.role],
                        "tid": 1 if wait else 0, "ts": us(e.t0), "dur": max(0.0, (e.t1 - e.t0) / 1000.0),
                        "args": args})
        if e.name in ("attention_to_ffn", "experts", "ffn_to_attention", "attention_worker_combine"):
            for key in unit_keys(e, layers):
                chain[key][e.name].append((e.t0, pid[e.role]))
        if e.name == "attention_to_ffn":
            in_flight[session_of(e.role)].append((e.t0, +1))
        elif e.name == "attention_worker_combine":
            in_flight[session_of(e.role)].append((e.t1, -1))
    # Flow arrows: one chain per (micro-batch pass, FFN rank): A2F -> experts -> F2A -> combine.
    flow_id = 0
    for (s, mb, p), stages in chain.items():
        a2f, combine = stages.get("attention_to_ffn"), stages.get("attention_worker_combine")
        ffn_pids = sorted({q for _, q in stages.get("experts", [])})
        for q in ffn_pids or [None]:
            hops = [a2f[-1]] if a2f else []
            for stage in ("experts", "ffn_to_attention"):
                mine = [h for h in stages.get(stage, []) if h[1] == q]
                if mine:
                    hops.append(mine[-1])
            if combine:
                hops.append(combine[-1])
            if len(hops) < 2:
                continue
            flow_id += 1
            for j, (t, q2) in enumerate(hops):
                ph = "s" if j == 0 else ("f" if j == len(hops) - 1 else "t")
                ev = {"ph": ph, "id": flow_id, "name": f"s{s} mb{mb} pass{p}", "cat": "micro_batch",
                      "pid": q2, "tid": 0, "ts": us(t)}
                if ph != "s":
                    ev["bp"] = "e"
                out.append(ev)
    for s, deltas in in_flight.items():
        n = 0
        target = pid.get(f"attn{s}", 1)
        for t, d in sorted(deltas):
            n += d
            out.append({"ph": "C", "name": "in-flight micro-batches", "pid": target, "tid": 0, "ts": us(t),
                        "args": {"in_flight": n}})
    meta = {"clock": "CLOCK_MONOTONIC", "t_base_ns": t_base}
    if metadata:
        meta.update(metadata)
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta}


def write(path: str | os.PathLike, events: list[Event], cfg=None, metadata: dict | None = None) -> Path:
    """Write the Chrome trace JSON of these events (whatever the outcome: a fault's trace ends at the fault)."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(events, cfg, metadata), separators=(",", ":")))
    return path


def write_result(path: str | os.PathLike, result) -> Path:
    """The trace of a Result (its events, outcome and reason as metadata)."""
    return write(path, result.events, result.config, {"name": result.config.name, "outcome": result.outcome,
                                                     "reason": result.reason})

