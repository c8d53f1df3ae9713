"""The stage table: each operator of one micro-batch layer, in one process: ms, bytes moved, GB/s, vs numpy's copy."""
# One session, one FFN rank, the pipeline's own memory (RunMemory: the windows, contexts and out buffers the roles
# use), and the roles' calls in the roles' order, one micro-batch layer after another in strict round-robin order, so
# every op finds its input where the previous op left it and every scheduler op returns on its first scan. Each op
# is timed on its own (perf_counter_ns around the call); a stage's figure is the median over the timed micro-batch
# layers, after warm-up ones (the numba kernels load there). What is not in any stage: the residual add feeding the
# next layer, and the roles' waits, doorbells, trace events and fault hooks (the F2A windows here are plain
# LocalWindows, not the FFN role's StampedWindows).
#
# Bytes are what a stage must read plus write (see stage_bytes), so GB/s counts both directions. The copy rate beside
# each stage is np.copyto of a buffer of half the stage's bytes (so the copy too reads and writes the stage's bytes),
# timed in the same loop under the same conditions: every micro-batch layer, after the stages, each stage's own pair
# of copy buffers is copied once, so like the stage's inputs and outputs it was last touched a whole micro-batch layer
# (~60 MB of other traffic, more than the last-level cache) earlier. fraction_of_copy = that copy's median time / the
# stage's (1.0: the stage moves its bytes as fast as numpy copies them from where they are). A warm copy of the same
# bytes (the buffers copied back to back, so in cache when they fit) is shown beside it: measured here, a 6 MB
# copy_rows in the stage loop took 0.9-1.3 ms against 0.3 ms back to back, the same code and bytes, so a warm
# reference would compare a stage's memory traffic with a cache's.
#
# The outputs are checked: every micro-batch layer, each scheduler found its work on the first scan and the batch holds
# every slot; on the first and last timed ones, the combine's y equals the single-process reference layer
# (Model.layer: attention, gate, experts, combine) bit for bit, which only holds when A2F routed, batching gathered,
# the experts scaled and F2A scattered every row to the right slot.
from __future__ import annotations

import time

import numpy as np

from ..model import GATE_FEATURES
from ..ops.attention_to_ffn import attention_to_ffn
from ..ops.attention_worker_combine import attention_worker_combine
from ..ops.attention_worker_scheduler import attention_worker_scheduler_
from ..ops.ffn_to_attention import ffn_to_attention
from ..ops.ffn_worker_batching import ffn_worker_batching
from ..ops.ffn_worker_scheduler import ffn_worker_scheduler_
from .pipeline import bench_config

STAGES = ("attention", "gate", "attention_to_ffn", "ffn_worker_scheduler_", "ffn_worker_batching", "experts",
          "ffn_to_attention", "attention_worker_scheduler_", "attention_worker_combine")
WARMUP = 2
ROUND_TRIP = STAGES[2:]  # the window round trip: attention_to_ffn ... attention_worker_combine


def stage_bytes(cfg) -> dict[str, int]:
    """Bytes each stage must read plus write for one micro-batch layer of one session on one FFN rank, every token
    valid: token rows (H * itemsize bytes), the gate's features, and the 4-byte entries per slot or per (token, k)
    (expert ids, flags, scales). Left out: weights, the expert-rank table, the 8-byte record headers, scratch and the
    op's own temporaries (a fancy-index gather that copies twice still counts once)."""
    bs, k, h, b = cfg.micro_batch_size, cfg.top_k, cfg.hidden_size, cfg.itemsize
    slots = bs * (k + 1)  # (token, k) slots of one micro-batch: K routed + 1 shared
    row = h * b
    return {
        # h read, a = softsign(h * w) written
        "attention": 2 * bs * row,
        # a's first min(64, H) features read; top-K ids and scales written (BS x K, 4 bytes each)
        "gate": bs * min(GATE_FEATURES, h) * b + 2 * bs * k * 4,
        # each token row read once and written into its K+1 FFN-window slots; routed ids read, one local id per slot
        # written into the record
        "attention_to_ffn": bs * row + slots * row + bs * k * 4 + slots * 4,
        # the record's expert ids read, written to the out buffer, reset to the sentinel
        "ffn_worker_scheduler_": 3 * slots * 4,
        # the emitted ids read; every slot row gathered (read, written into y); session, micro-batch, token and k ids
        # written per row
        "ffn_worker_batching": slots * 4 + 2 * slots * row + 4 * slots * 4,
        # every row read, scaled and rounded to bf16, written
        "experts": 2 * slots * row,
        # every row read and written into its attention-window slot; its four ids read; one flag per slot written
        "ffn_to_attention": 2 * slots * row + 4 * slots * 4 + slots * 4,
        # the micro-batch's flags read, then zeroed
        "attention_worker_scheduler_": 2 * slots * 4,
        # every slot row and the K scales of each token read; y (BS rows) written
        "attention_worker_combine": slots * row + bs * k * 4 + bs * row,
    }


def _not_ready(waiting) -> None:
    """The idle hook of every op here: in this sequential run an op that has to wait is a protocol error, not a wait."""
    raise RuntimeError(f"stage benchmark: {waiting.op} had to wait for {waiting.what}")


def _micro_batch_layers(cfg, mem, timed: int, copies: dict) -> tuple[dict[str, list[int]], dict[str, list[int]], int]:
    """Run WARMUP + timed micro-batch layers through the operators; ns per stage per timed layer, ns of each stage's
    copy (copies: name -> (src, dst), one copy per layer after the stages), layers checked."""
    from ..model import Model
    from ..roles._schedule import unit
    from ..roles.ffn_worker import run_experts

    model = Model(cfg)
    attn_ctx, ffn_ctx = mem.attention_context(0), mem.ffn_context(0)
    group, table = mem.group(), mem.expert_rank_table()
    code = mem.token_dtype_code
    a_, m_, bs, k1, h = cfg.sessions, cfg.micro_batch_num, cfg.micro_batch_size, cfg.selected, cfg.hidden_size
    slots = bs * k1
    v2, snapshot = cfg.generation == "950", cfg.snapshot_receive
    local = cfg.experts_on(0)
    expert_num = max(1, len(local)) * cfg.layers
    attn_rank_table = np.array([cfg.attention_rank(0)], np.int32)
    ffn_shapes = {"ffn_token_info_table_shape": [a_, m_, 2 + slots],
                  "ffn_token_data_shape": [a_, m_, bs, k1, cfg.token_bytes // cfg.itemsize],
                  "attn_token_info_table_shape": [m_, bs, k1]}
    session = np.array([0], np.int32)
    times: dict[str, list[int]] = {name: [] for name in STAGES}
    copy_times: dict[str, list[int]] = {name: [] for name in STAGES}
    layer_input, ys = {}, {}
    a_buf = None
    clock = time.perf_counter_ns
    checked = 0
    for i in range(WARMUP + timed):
        t, layer, m = unit(cfg, i)
        h_in = model.input(t, 0, m) if layer == 0 else model.residual(layer_input[m], ys[m])
        layer_input[m] = h_in
        lid = np.array([layer], np.int32)
        stamps = [clock()]
        a = a_buf = model.attention(layer, h_in, out=a_buf)  # (one buffer, as the attention role)
        stamps.append(clock())
        ids, scales = model.gate(layer, a)
        stamps.append(clock())
        attention_to_ffn(a[None], session, np.array([m], np.int32), lid, ids[None], table, group=group,
                         world_size=cfg.world_size, moe_expert_num=cfg.routed_experts, sync_flag=int(snapshot),
                         ffn_start_rank_id=0, rank=cfg.attention_rank(0), idle=_not_ready,
                         generation=cfg.generation, **ffn_shapes)
        stamps.append(clock())
        if not v2:  # (950 has no FFN scheduler: V2 batching receives itself, a stage of 0 here)
            ffn_worker_scheduler_(ffn_ctx, a_, idle=_not_ready)
        stamps.append(clock())
        if v2:
            batch = ffn_worker_batching(ffn_ctx, expert_num, [a_, bs, k1, h], token_dtype=code, need_schedule=1,
                                        layer_num=cfg.layers if snapshot else 0, sync_flag=snapshot,
                                        generation="950", idle=_not_ready)
        else:
            batch = ffn_worker_batching(ffn_ctx, expert_num, [a_, bs, k1, h], token_dtype=code, need_schedule=0)
        stamps.append(clock())
        n = int(batch.actual_token_num[0])
        out = run_experts(model, local, batch, batch.y[:n])  # (in place, as the FFN role)
        stamps.append(clock())
        ffn_to_attention(out, batch.session_ids[:n], batch.micro_batch_ids[:n], batch.token_ids[:n],
                         batch.expert_offsets[:n], batch.actual_token_num, group, cfg.world_size, [m_, bs, k1],
                         [m_, bs, k1, h], attn_rank_table=attn_rank_table, generation=cfg.generation)
        stamps.append(clock())
        attention_worker_scheduler_(attn_ctx, idle=_not_ready)
        stamps.append(clock())
        y, next_layer = attention_worker_combine(attn_ctx, scales, lid, h, token_dtype=code, need_schedule=0,
                                                 generation=cfg.generation)
        stamps.append(clock())
        if (not v2 and ffn_ctx.ffn.out_num != a_) or n != slots or attn_ctx.attention.micro_batch_id != m \
                or int(next_layer[0]) != layer + 1:
            raise RuntimeError(f"stage benchmark, micro-batch layer {i}: out_num {ffn_ctx.ffn.out_num}, "
                               f"{n} of {slots} slots batched, micro_batch_id {attn_ctx.attention.micro_batch_id} "
                               f"(expected {m}), next layer {int(next_layer[0])}")
        if i in (WARMUP, WARMUP + timed - 1):
            ref = model.layer(layer, h_in)
            if not np.array_equal(y.view(np.uint16), ref.view(np.uint16)):
                raise RuntimeError(f"stage benchmark, micro-batch layer {i}: the combine output differs from the "
                                   f"reference layer in {int(np.count_nonzero(y != ref))} of {y.size} values")
            checked += 1
        ys[m] = y
        copy_ns = {}
        for name, (src, dst) in copies.items():
            t0 = clock()
            np.copyto(dst, src)
            copy_ns[name] = clock() - t0
        if i >= WARMUP:
            for name, t0, t1 in zip(STAGES, stamps, stamps[1:]):
                times[name].append(t1 - t0)
                copy_times[name].append(copy_ns[name])
    return times, copy_times, checked


def _copy_buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """A source of nbytes // 2 random bytes and a destination of the same size (a copy reads + writes nbytes)."""
    src = np.random.default_rng(0).integers(0, 255, max(1, nbytes // 2), dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return src, dst


def _warm_copy_ns(nbytes: int, repeats: int) -> float:
    """Median ns of np.copyto of nbytes // 2 bytes back to back (in cache when they fit)."""
    src, dst = _copy_buffers(nbytes)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        samples.append(time.perf_counter_ns() - t0)
    return float(np.median(samples))


def _row(name: str, nbytes: int, samples_ns: list[int], copy_samples_ns: list[int], warm_copy_ns: float) -> dict:
    ns, copy_ns = float(np.median(samples_ns)), float(np.median(copy_samples_ns))
    return {"name": name, "ms": ns / 1e6, "best_ms": min(samples_ns) / 1e6, "bytes": nbytes,
            "gb_per_s": nbytes / ns, "copy_ms": copy_ns / 1e6, "copy_gb_per_s": nbytes / copy_ns,
            "fraction_of_copy": copy_ns / ns, "warm_copy_gb_per_s": nbytes / warm_copy_ns,
            "fraction_of_warm_copy": warm_copy_ns / ns}


def measure_stages(quick: bool = False, repeats: int | None = None, **shape) -> dict:
    """The stage table on the bench shape (SHAPE; keyword arguments override its fields, e.g. hidden_size=512;
    generation="950" runs the V2 operators, mode="async" with the snapshot receive):
    {"rows": [{name, ms, best_ms, bytes, gb_per_s, copy_ms, copy_gb_per_s, fraction_of_copy, warm_copy_gb_per_s,
    fraction_of_warm_copy}] in data-path order,
    "total": the same over all stages, "round_trip_ms": the median of the window round trip's stages (ROUND_TRIP) per
    micro-batch layer, "timed", "checked", "timing", "copy"}; ms is the median per micro-batch layer
    over `repeats` micro-batch layers (quick: 40, else 300)."""
    from ..config import load
    from ..device import Device
    from ..runtime.memory import RunMemory

    cfg = load(bench_config(1, **shape))
    if cfg.sessions != 1 or cfg.ffn_ranks != 1 or cfg.valid_tokens != cfg.micro_batch_size:
        raise ValueError("the stage table runs one session on one FFN rank with every token valid")
    timed = repeats or (40 if quick else 300)
    nbytes = stage_bytes(cfg)
    copies = {name: _copy_buffers(nbytes[name]) for name in STAGES}
    mem = RunMemory.create(cfg, Device())
    try:
        times, copy_times, checked = _micro_batch_layers(cfg, mem, timed, copies)
    finally:
        mem.close()
    del copies
    rows = [_row(name, nbytes[name], times[name], copy_times[name], _warm_copy_ns(nbytes[name], timed))
            for name in STAGES]
    per_layer = [sum(layer) for layer in zip(*(times[name] for name in STAGES))]
    round_trip = [sum(layer) for layer in zip(*(times[name] for name in ROUND_TRIP))]
    copy_per_layer = [sum(layer) for layer in zip(*(copy_times[name] for name in STAGES))]
    total_bytes = sum(nbytes.values())
    total = _row("all stages", total_bytes, per_layer, copy_per_layer, _warm_copy_ns(total_bytes, timed))
    return {"rows": rows, "total": total, "timed": timed, "warmup": WARMUP, "checked": checked,
            "round_trip_ms": float(np.median(round_trip)) / 1e6, "generation": cfg.generation,
            "timing": f"median of {timed} micro-batch layers (after {WARMUP} warm-up ones), one process",
            "copy": "np.copyto of half the stage's bytes (reads + writes = the stage's bytes) in the same loop, once "
                    "per micro-batch layer (as cold as the stage's data), median; warm: back to back",
            "shape": {k: getattr(cfg, k) for k in ("micro_batch_size", "top_k", "hidden_size", "token_dtype",
                                                   "expert_kind", "routed_experts", "micro_batch_num", "layers")}}
