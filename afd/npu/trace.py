"""AFD_NPU_TRACE=FILE: one Chrome trace of a torch job on the fake NPU.

A process track per rank, a thread track per stream, a slice per operator call (with its micro-batch, layer and
call index) and flow arrows from each window write (npu_attention_to_ffn, npu_ffn_to_attention) to the operator on
the peer rank that consumed it. Each rank records its own events on CLOCK_MONOTONIC (one clock on one machine);
under `afd npu` every rank writes a part and `afd npu` merges them into FILE when the command ends; a process
that installed the fake itself writes FILE at exit.
"""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict, deque
from pathlib import Path

from . import watchdog

ENV = "AFD_NPU_TRACE"
PARTS_ENV = "AFD_NPU_TRACE_PARTS"  # set by `afd npu`: a directory each rank writes its part into
EVENT_CAP = 200_000
CONSUMERS = {"npu_attention_worker_combine", "attention_worker_scheduler_", "attention_worker_scheduler",
             "npu_ffn_worker_batching", "ffn_worker_scheduler_", "ffn_worker_scheduler"}

_events: deque = deque(maxlen=EVENT_CAP)
_lock = threading.Lock()
_written = False


_enabled: bool | None = None


def enabled() -> bool:
    """Set for the whole process by its environment (read once: every operator call asks)."""
    global _enabled
    if _enabled is None:
        _enabled = bool(os.environ.get(ENV) or os.environ.get(PARTS_ENV))
    return _enabled


def span(op: str, stream, t0: int, t1: int, call: tuple[int, int], args: dict | None, extra: dict | None = None):
    """One operator call on a stream."""
    if not enabled():
        return
    args = {**(args or {}), **(extra or {})}
    with _lock:
        _events.append({"name": op, "stream": int(stream.stream_id), "t0": t0, "t1": t1, "call": call[0],
                        "args": _plain(args)})


def instant(name: str, args: dict) -> None:
    if not enabled():
        return
    import time
    t = time.monotonic_ns()
    with _lock:
        _events.append({"name": name, "stream": -1, "t0": t, "t1": t, "call": -1, "args": _plain(args)})


def _plain(value):
    """JSON-safe copy (numpy scalars, tuples, int keys)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def part() -> dict:
    with _lock:
        return {"rank": watchdog.rank(), "pid": os.getpid(), "events": list(_events)}


def write() -> None:
    """At exit: this rank's part (under `afd npu`) or the whole trace (a process on its own); once."""
    global _written
    if not _events or _written:
        return
    _written = True
    parts_dir = os.environ.get(PARTS_ENV)
    try:
        if parts_dir:
            path = Path(parts_dir) / f"rank{watchdog.rank()}-{os.getpid()}.json"
            path.write_text(json.dumps(part()))
        elif os.environ.get(ENV):
            Path(os.environ[ENV]).write_text(json.dumps(chrome_trace([part()])))
    except OSError as exc:
        watchdog.announce(f"{ENV}: cannot write the trace: {exc}")


def merge(parts_dir: str, out: str) -> Path:
    """Merge the parts of every rank into one Chrome trace at `out`; the parts are removed."""
    parts = []
    for path in sorted(Path(parts_dir).glob("rank*.json")):
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        path.unlink(missing_ok=True)
    result = Path(out)
    result.write_text(json.dumps(chrome_trace(parts)))
    return result


def chrome_trace(parts: list[dict]) -> dict:
    """Chrome trace JSON of every rank's events, with flows from window writes to their consumers."""
    events = [(p["rank"], e) for p in parts for e in p["events"]]
    t_base = min((e["t0"] for _, e in events), default=0)
    out = []
    for p in sorted(parts, key=lambda p: p["rank"]):
        r = p["rank"]
        out.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank{r}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for sid in sorted({e["stream"] for e in p["events"] if e["stream"] >= 0}):
            name = "default stream" if sid == 0 else f"stream {sid}"
            out.append({"ph": "M", "name": "thread_name", "pid": r, "tid": sid, "args": {"name": name}})

    def us(t):
        return (t - t_base) / 1000.0

    for r, e in events:
        args = {"call": e["call"], **e["args"]}
        if e["t1"] == e["t0"] and e["stream"] < 0:
            out.append({"ph": "i", "s": "p", "name": e["name"], "pid": r, "tid": 0, "ts": us(e["t0"]), "args": args})
        else:
            out.append({"ph": "X", "name": e["name"], "cat": "op", "pid": r, "tid": e["stream"], "ts": us(e["t0"]),
                        "dur": max(0.0, (e["t1"] - e["t0"]) / 1000.0), "args": args})
    out.extend(_flows(events, us))
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"clock": "CLOCK_MONOTONIC",
                                                                        "t_base_ns": t_base}}


def _flows(events, us) -> list[dict]:
    """Match the k-th write of (writer, reader, unit) with the reader's k-th consumption of that unit."""
    writes = defaultdict(list)  # (reader rank, kind, unit) -> [(writer rank, t) ...] in time order
    reads = defaultdict(list)  # (reader rank, kind, unit) -> [t ...]
    for r, e in sorted(events, key=lambda x: x[1]["t0"]):
        a, name = e["args"], e["name"]
        # a flow binds to the slice around its timestamp: a write's arrow leaves near its start (its flags may be
        # consumed before the call returns), a consumer's arrives near its end (it has seen them by then)
        inside = min(1000, (e["t1"] - e["t0"]) // 2)
        start, end = (e["stream"], e["t0"] + inside), (e["stream"], e["t1"] - inside)
        if name == "npu_ffn_to_attention":
            for dst, mbs in (a.get("to") or {}).items():
                for mb in mbs:
                    writes[(int(dst), "f2a", (mb,))].append((r, start))
        elif name == "npu_attention_to_ffn" and "micro_batch" in a:
            for dst in a.get("to") or []:
                writes[(int(dst), "a2f", (a["session"], a["micro_batch"]))].append((r, start))
        elif name in CONSUMERS and not a.get("stopped"):
            if name.startswith(("npu_attention", "attention")) and "micro_batch" in a:
                reads[(r, "f2a", (a["micro_batch"],))].append(end)
            for unit in a.get("units") or []:
                reads[(r, "a2f", tuple(unit))].append(end)
    out, flow_id = [], 0
    for key, consumed in reads.items():
        by_writer = defaultdict(list)
        for writer, t in writes.get(key, []):
            by_writer[writer].append(t)
        reader = key[0]
        for writer, times in by_writer.items():
            for k, (w_stream, t_write) in enumerate(times):
                if k >= len(consumed):
                    break
                r_stream, t_read = consumed[k]
                flow_id += 1
                name = f"{key[1]} {' '.join(map(str, key[2]))}"
                out.append({"ph": "s", "id": flow_id, "name": name, "cat": key[1], "pid": writer, "tid": w_stream,
                            "ts": us(t_write)})
                out.append({"ph": "f", "bp": "e", "id": flow_id, "name": name, "cat": key[1], "pid": reader,
                            "tid": r_stream, "ts": us(t_read)})
    return out
