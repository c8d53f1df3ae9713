"""The pipeline's figures: its rate, the flag hop, the multiprocess.Queue baseline and the numpy copy bound."""
# All on the DeepSeek-shaped micro-batch (SHAPE: BS=48, K=8+1, H=7168, bf16, scale experts, one session, one FFN
# rank), measured in one `afd bench` invocation (afd.bench.suite), so ratios compare figures taken on the same machine
# at the same time:
# - pipeline: `afd.launcher.pipeline.run` (the real roles over shared windows), micro-batch-layers per second;
# - hop: the last F2A flag store -> attention_worker_scheduler_ returning, measured in a dedicated two-process setup
#   (the real op, the real RoleRuntime wait policy, a FIFO doorbell as roles on one host use) in the default and in
#   the spin waiting mode, and, for reference, the pipeline's own `flag_hop_ns` samples (which also hold queueing
#   behind the combine);
# - queue: the same roles (attention -> FFN -> combine, the combine output fed back to the next layer) doing the same
#   numpy compute on the same shapes, with the arrays pickled through `multiprocess.Queue`s;
# - copy bound: numpy copying the A2F + F2A payload bytes of one micro-batch-layer (2 * BS*(K+1)*H*2).
from __future__ import annotations

import os
import random
import tempfile
import time

import numpy as np

SHAPE = {"micro_batch_size": 48, "top_k": 8, "routed_experts": 16, "hidden_size": 7168, "token_dtype": "bf16",
         "expert_kind": "scale", "sessions": 1, "ffn_ranks": 1, "micro_batch_num": 2, "layers": 4}


# Two hosts on this machine: the attention session on one, the FFN rank on the other, each with its own shared-memory
# namespace; every A2F and F2A write crosses the remote window transport (ZeroMQ TCP + CURVE, applied by the agent).
TWO_HOSTS = {"control": {"transport": "tcp"},
             "hosts": {"attn": {"roles": ["attn0", "sched0", "combine0"]}, "ffn": {"roles": ["ffn0"]}}}


def bench_config(steps: int, **values) -> dict:
    """The benchmark's pipeline config (a plain dict for afd.launcher.pipeline.run)."""
    return {"name": "bench", **SHAPE, "steps": steps, **values}


def _percentiles_us(samples_ns) -> dict:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": int(us.size), "p50": float(np.percentile(us, 50)), "p99": float(np.percentile(us, 99)),
            "max": float(us.max())}


# -- the real pipeline ----------------------------------------------------------------------------------------------
def measure_pipeline(steps: int, wait: str = "default", check_reference: bool = True, attempts: int = 2,
                     two_hosts: bool = False, fuse_scheduler: bool = False) -> dict:
    """One pipeline run (on one host, or across two hosts through the remote window transport; fuse_scheduler: the
    combine role polls the flags itself, one process and one hand-off fewer a session); a run that does not
    complete (e.g. another process swept its segments) is retried once."""
    from ..launcher.pipeline import run

    extra = {**(TWO_HOSTS if two_hosts else {}), **({"fuse_scheduler": True} if fuse_scheduler else {})}
    for attempt in range(attempts):
        t0 = time.monotonic()
        result = run(bench_config(steps, wait=wait, check_reference=check_reference, **extra))
        if result.outcome == "completed":
            break
    hop = result.hops_us.get("flag_hop_ns") or {}
    return {"wait": wait, "hosts": 2 if two_hosts else 1, "outcome": result.outcome, "reason": result.reason,
            "attempts": attempt + 1,
            "compared": result.compared,
            "micro_batch_layers": result.micro_batch_layers, "run_s": result.run_s,
            "wall_s": time.monotonic() - t0, "micro_batch_layers_per_s": result.micro_batch_layers_per_s,
            "outputs_match_reference": result.outputs_match_reference if result.compared else None,
            "hop_us_p50": hop.get("p50"), "hop_us_p99": hop.get("p99"), "hop_n": hop.get("n", 0),
            "ffn_round_us_p50": (result.hops_us.get("ffn_ns") or {}).get("p50"),
            "breakdown_ms_per_micro_batch_layer": breakdown(result)}


def breakdown(result) -> dict:
    """Where one host's period goes, in ms per micro-batch layer, from the roles' own trace of the run: each role's
    busy (its ops, the waits inside them excluded), waiting (for its input: inside an op or on the stream) and idle
    (neither: wake-ups after a block, the role's bookkeeping between ops, preempted by another process); each op's
    mean; the hand-offs' p50 (us: A2F end -> the FFN took the work, F2A start -> the flags seen, flags seen -> the
    combine ended). The pipeline's period is the slowest chain's: a role busy most of it is the limit, one waiting
    most of it waits on the other side's chain (its busy time plus the hand-offs)."""
    from ..metrics import op_durations

    m, units = result.metrics, result.micro_batch_layers
    if not m or not units:
        return {}
    span_ms = m["window_s"] * 1e3
    roles = {role: {k: round(v * span_ms / units, 4) for k, v in f.items()} for role, f in m["roles"].items()}
    ops = {f"{kind}.{op}": round(s * 1e3, 4) for (kind, op), s in sorted(op_durations(result.events).items())}
    hops = {name: (h or {}).get("p50") for name, h in m["hops_us"].items()}
    return {"period": round(span_ms / units, 4), "roles": roles, "ops": ops, "hand_offs_us_p50": hops}


# -- dedicated hop measurement: one writer process, one scheduler process --------------------------------------------
_HOP_M = 2
_CTL_DONE, _CTL_STAMP, _CTL_READY, _CTL_HOPS = 0, 1, 2, 8


def _hop_wait_policy(wait: str, zctx, doorbell_endpoint: str, run_flag: np.ndarray):
    """The roles' wait policy (spin, then block on the doorbell; same spin and stall settings), no controller."""
    from ..config import load
    from ..runtime import doorbell
    from ..waiting import WaitPolicy

    cfg = load(bench_config(1, wait=wait))
    bell = doorbell.bind(zctx, doorbell_endpoint)
    return WaitPolicy("sched0", spin_us=cfg.spin_us, stall_timeout_s=cfg.stall_timeout_s,
                      service_interval_s=min(cfg.heartbeat_interval_s, 0.05), spin_only=wait == "spin",
                      block=lambda timeout_ms: doorbell.wait_ring(bell, timeout_ms),
                      stop_reason=lambda: "run_flag=0" if run_flag[0] == 0 else None)


def _hop_scheduler_main(namespace: str, ctx_address: int, ctl_address: int, n: int, wait: str,
                        doorbell_endpoint: str) -> None:
    """Scheduler side: attention_worker_scheduler_ with the RoleRuntime wait policy, n times; hop = return - stamp."""
    import zmq

    from ..device import Device
    from ..layout import ScheduleContext
    from ..ops.attention_worker_scheduler import attention_worker_scheduler_

    dev = Device(namespace)
    ctx = ScheduleContext.on_device(dev, ctx_address)
    ctl = dev.view(ctl_address, 8 * (_CTL_HOPS + n), np.int64)
    zctx = zmq.Context()
    idle = _hop_wait_policy(wait, zctx, doorbell_endpoint, ctx.i32[32:33])
    try:
        ctl[_CTL_READY] = 1
        for i in range(n):
            attention_worker_scheduler_(ctx, idle=idle)
            done = time.monotonic_ns()
            if ctx.run_flag == 0:
                break
            ctl[_CTL_HOPS + i] = done - int(ctl[_CTL_STAMP])
            ctl[_CTL_DONE] = i + 1
    finally:
        zctx.destroy(linger=0)
        del ctx, ctl
        dev.close()


def _hop_writer(ctx, flags: np.ndarray, ctl: np.ndarray, n: int, doorbell_endpoint: str, gap_us: tuple,
                deadline: float) -> None:
    """FFN side, in the launching process: after a gap, set a micro-batch's flags, stamping just before the last
    store, then ring the scheduler's doorbell (what ffn_to_attention + the role's ring do)."""
    import zmq

    from ..runtime import doorbell

    zctx = zmq.Context()
    bell = doorbell.ringer(zctx, doorbell_endpoint)
    rng = random.Random(0)
    try:
        while not ctl[_CTL_READY]:
            if time.monotonic() > deadline:
                raise RuntimeError("hop benchmark: the scheduler process did not start")
            time.sleep(0.001)
        time.sleep(0.05)  # let the PUSH connection land: a ring before it would be dropped
        for i in range(n):
            while ctl[_CTL_DONE] < i:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hop benchmark: stuck at iteration {i} of {n}")
                time.sleep(0)
            t_end = time.perf_counter() + rng.uniform(*gap_us) / 1e6  # the scheduler settles into its wait
            while time.perf_counter() < t_end:
                time.sleep(0)
            row = flags[i % _HOP_M]
            row[:-1] = 1
            ctl[_CTL_STAMP] = time.monotonic_ns()
            row[-1] = 1
            bell.ring()
        while ctl[_CTL_DONE] < n and time.monotonic() < deadline:
            time.sleep(0)
    finally:
        if hasattr(bell, "close"):
            bell.close()
        zctx.destroy(linger=0)


def measure_hop(n: int, wait: str, gap_us: tuple = (200.0, 1500.0), warmup: int = 20, timeout_s: float = 60.0) -> dict:
    """Flag hop latency (last flag store -> scheduler op returns) over n iterations in one waiting mode."""
    import multiprocess

    from .. import device as _device
    from .ops import _attention_context

    total = n + warmup
    dev = _device.Device()
    tmp = tempfile.mkdtemp(prefix="afd-bench-")
    endpoint = f"fifo://{tmp}/doorbell.fifo"  # what roles on one host use
    proc = None
    try:
        ctx, flags, _ = _attention_context(dev, _HOP_M, SHAPE["micro_batch_size"], SHAPE["top_k"] + 1, 512)
        ctl_buf = dev.malloc(8 * (_CTL_HOPS + total))
        ctl = ctl_buf.view(np.int64)
        ctl[:] = 0
        spawn = multiprocess.get_context("spawn")
        proc = spawn.Process(target=_hop_scheduler_main, args=(dev.namespace, ctx.address, ctl_buf.address, total,
                                                                 wait, endpoint), daemon=True)
        proc.start()
        _hop_writer(ctx, flags, ctl, total, endpoint, gap_us, time.monotonic() + timeout_s)
        ctx.control.run_flag = 0
        proc.join(5.0)
        done = int(ctl[_CTL_DONE])
        hops = ctl[_CTL_HOPS + warmup:_CTL_HOPS + done].copy()
        del ctx, flags, ctl
    finally:
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(1.0)
        dev.close()
        try:
            os.unlink(f"{tmp}/doorbell.fifo")
        except FileNotFoundError:
            pass
        os.rmdir(tmp)
    if hops.size == 0:
        raise RuntimeError(f"hop benchmark ({wait}): no samples")
    return {"wait": wait, "gap_us": list(gap_us), **_percentiles_us(hops)}


# -- the multiprocess.Queue baseline ----------------------------------------------------------------------------------
def _queue_attention(cfg_json: str, q_a2f, q_scales, q_y, q_ready, t_start) -> None:
    from ..config import Config
    from ..model import Model
    from ..roles._schedule import total_units, unit

    cfg = Config.model_validate_json(cfg_json)
    model = Model(cfg)
    M, K = cfg.micro_batch_num, cfg.top_k
    q_ready.put("attention")
    while t_start.value == 0:
        time.sleep(0.001)
    layer_input, ys = {}, {}
    for i in range(total_units(cfg)):
        t, layer, m = unit(cfg, i)
        if i >= M:
            while i - M not in ys:  # this micro-batch's previous layer pass must have been combined
                j, y = q_y.get()
                ys[j] = y
            y = ys.pop(i - M)
        h = model.input(t, 0, m) if layer == 0 else model.residual(layer_input[m], y)
        layer_input[m] = h
        a = model.attention(layer, h)
        ids, scales = model.gate(layer, a)
        # A2F: every token once per slot (K routed + 1 shared), as attention_to_ffn writes the FFN window.
        tokens = np.broadcast_to(a[:, None, :], (a.shape[0], K + 1, a.shape[1])).copy()
        q_scales.put((i, scales))
        q_a2f.put((i, layer, tokens, ids))


def _queue_ffn(cfg_json: str, q_a2f, q_f2a, q_ready) -> None:
    from ..config import Config
    from ..model import Model
    from ..roles._schedule import total_units

    cfg = Config.model_validate_json(cfg_json)
    model = Model(cfg)
    K = cfg.top_k
    q_ready.put("ffn")
    for _ in range(total_units(cfg)):
        i, layer, tokens, ids = q_a2f.get()
        bs, k1, h = tokens.shape
        experts = np.empty((bs, k1), np.int64)
        experts[:, :K] = ids
        experts[:, K] = cfg.routed_experts  # the shared expert
        flat_e = experts.reshape(-1)
        order = np.argsort(flat_e, kind="stable")  # batching: group the rows by expert
        rows = tokens.reshape(-1, h)[order]
        out_sorted = np.empty_like(rows)
        bounds = np.flatnonzero(np.diff(flat_e[order])) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, rows.shape[0]]):
            out_sorted[lo:hi] = model.expert(layer, int(flat_e[order[lo]]), rows[lo:hi])
        out = np.empty_like(rows)
        out[order] = out_sorted  # back to (token, slot) order, as ffn_to_attention writes the slots
        q_f2a.put((i, out.reshape(bs, k1, h)))


def _queue_combine(cfg_json: str, q_f2a, q_scales, q_y, q_ready, q_done) -> None:
    from ..config import TOKEN_DTYPE_CODE, Config
    from ..model import digest
    from ..ops.attention_worker_combine import combine_tokens, warm_up
    from ..roles._schedule import total_units, unit
    from ..tokens import X_DTYPE_BY_NAME

    cfg = Config.model_validate_json(cfg_json)
    dtype = X_DTYPE_BY_NAME[cfg.token_dtype]
    warm_up(TOKEN_DTYPE_CODE[cfg.token_dtype])  # as the pipeline's combine role does before it registers
    q_ready.put("combine")
    scales, digests = {}, {}
    for _ in range(total_units(cfg)):
        i, data = q_f2a.get()
        while i not in scales:
            j, s = q_scales.get()
            scales[j] = s
        y = combine_tokens(data, scales.pop(i), dtype)
        t, layer, m = unit(cfg, i)
        if layer == cfg.layers - 1:
            digests[(t, m)] = digest(y[:cfg.valid_tokens])
        q_y.put((i, y))
    q_done.put((time.monotonic(), digests))


def measure_queue(steps: int, check_reference: bool = True, timeout_s: float = 120.0) -> dict:
    """The same roles and compute with the arrays pickled through multiprocess.Queue; micro-batch-layers per second."""
    import multiprocess

    from ..config import load
    from ..model import reference
    from ..roles._schedule import total_units

    cfg = load(bench_config(steps))
    cfg_json = cfg.model_dump_json()
    spawn = multiprocess.get_context("spawn")
    q_a2f, q_f2a, q_scales, q_y, q_ready, q_done = (spawn.Queue() for _ in range(6))
    t_start = spawn.Value("d", 0.0)
    procs = [spawn.Process(target=_queue_attention, args=(cfg_json, q_a2f, q_scales, q_y, q_ready, t_start)),
             spawn.Process(target=_queue_ffn, args=(cfg_json, q_a2f, q_f2a, q_ready)),
             spawn.Process(target=_queue_combine, args=(cfg_json, q_f2a, q_scales, q_y, q_ready, q_done))]
    t0 = time.monotonic()
    for p in procs:
        p.daemon = True
        p.start()
    try:
        for _ in procs:
            q_ready.get(timeout=timeout_s)
        start = time.monotonic()
        t_start.value = start
        end, digests = q_done.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
    units = total_units(cfg)
    match = None
    if check_reference:
        ref, _ = reference(cfg)
        match = all(int(ref[t, 0, m]) == d for (t, m), d in digests.items())
    return {"micro_batch_layers": units, "run_s": end - start, "wall_s": time.monotonic() - t0,
            "micro_batch_layers_per_s": units / (end - start), "outputs_match_reference": match}


# -- the memory-copy bound --------------------------------------------------------------------------------------------
def measure_copy_bound(repeats: int = 20, bs: int | None = None, h: int | None = None) -> dict:
    """numpy copying the bytes one micro-batch-layer moves (A2F + F2A payloads), median of `repeats`; at SHAPE, or
    with another micro-batch size `bs` / hidden size `h` (K and the bf16 tokens stay SHAPE's)."""
    bs, k1, h = bs or SHAPE["micro_batch_size"], SHAPE["top_k"] + 1, h or SHAPE["hidden_size"]
    nbytes = 2 * bs * k1 * h * 2
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times[2:]))
    return {"bytes": nbytes, "copy_ms": t * 1e3, "gb_per_s": nbytes / t / 1e9, "micro_batch_layers_per_s": 1.0 / t}
