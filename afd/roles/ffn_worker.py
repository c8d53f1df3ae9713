"""FFN worker ffn<f>: ffn_worker_scheduler_ + ffn_worker_batching (950: V2 batching, which receives itself) + experts +
ffn_to_attention, until run_flag is 0."""
from __future__ import annotations

import time

import numpy as np

from ..errors import KernelError
from ..faults import FaultyWindow
from ..model import Model, is_pair_rows, scale_grouped
from ..ops._polling import Stopped
from ..ops.ffn_to_attention import ffn_to_attention
from ..ops.ffn_worker_batching import ffn_worker_batching
from ..ops.ffn_worker_scheduler import ffn_records, ffn_worker_scheduler_
from ..runtime.memory import A2F_DONE, COMBINE_DONE, STATUS
from ..timing import DeviceTime
from ._schedule import unit


def _step_of(cfg, in_flight: int, layer: int, mb: int) -> int:
    """The step of the unit (layer, mb) a session has in flight: the latest matching unit index <= in_flight."""
    for i in range(in_flight, max(-1, in_flight - cfg.layers * cfg.micro_batch_num) - 1, -1):
        t, l, m = unit(cfg, i)
        if l == layer and m == mb:
            return t
    return 0


class StampedWindow(FaultyWindow):
    """An attention window as F2A writes it: stamps flag stores (hop latency); drop-flag / reorder faults apply."""

    def __init__(self, rt, window, stamp, flags_per_micro_batch: int, combined=None):
        super().__init__(window, rt.hooks)
        self.rt, self.stamp, self.per_mb = rt, stamp, flags_per_micro_batch
        self.combined = combined  # () -> units the session's combine finished (same host only), for reorder

    def before_flags(self, offset, index) -> None:
        if offset == 0:  # the flags region: stamp before the stores so a reader never sees flags without it
            self.stamp(np.unique(np.asarray(index) // self.per_mb), time.monotonic_ns())

    def late_data(self, fault) -> None:
        """Hold the data back until the attention side has consumed the flags without it (bounded), so the
        reorder deterministically shows; on another host, just hold it `ms`."""
        if self.combined is None:
            return super().late_data(fault)
        s = self.rt.status
        c = self.rt.cfg
        unit = (int(s[STATUS["step"]]) * c.layers + int(s[STATUS["layer"]])) * c.micro_batch_num \
            + int(s[STATUS["micro_batch"]])
        deadline = time.monotonic() + max(2.0, fault.params["ms"] / 1000.0)
        while self.combined() <= unit and time.monotonic() < deadline and not self.rt.stopping:
            time.sleep(0.0005)
            self.rt.service()  # holding the data is the fault's doing, not a hang: heartbeats go on (up to 2 s)


def run_experts(model: Model, local: list[int], batch, out: np.ndarray) -> np.ndarray:
    """The experts of one FFN round: each group of batch.group_list through its expert (local id = layer * n_local +
    index in `local`, the rank's global expert ids), rows [0, actual_token_num) of batch.y into out (which may be
    batch.y[:n] itself: every expert here maps a row to a row of the same shape)."""
    n_local = max(1, len(local))
    y = batch.y
    n = int(batch.actual_token_num[0])
    if out.ctypes.data != y.ctypes.data and np.shares_memory(out, y):
        raise KernelError("out", "overlaps batch.y other than as y[:n] (each row would be read after it was written)")
    if (model.cfg.expert_kind == "scale" and is_pair_rows(y) and is_pair_rows(out)
            and y.dtype == out.dtype == model.dtype and out.shape[1] == y.shape[1] and n <= out.shape[0]):
        # every group in one compiled pass, each row read once and written once into out
        params = model.scale_params(local)
        done = scale_grouped(y, batch.group_list, params, out)
        if done < 0:
            raise KernelError("group_list", f"group {-1 - done} {batch.group_list[-1 - done].tolist()} names no "
                                            f"local expert of {params.size} or runs past the {min(y.shape[0], out.shape[0])} rows")
        return out
    start = 0
    for local_id, count in batch.group_list.tolist():
        if count == 0:
            break
        layer, j = divmod(int(local_id), n_local)
        model.expert(layer, local[j], y[start:start + count], out=out[start:start + count])
        start += count
    return out


def prepare(rt) -> None:
    """Before registering: the compiled kernels this role runs (batching's sort, the row copies, the `scale` expert) load
    (once per machine: compile) outside the run's heartbeat watchdog (loading one at its first call stalled
    heartbeats past 1 s under load)."""
    from ..ops._kernels import warm_up_batching, warm_up_copy_rows, warm_up_ffn_to_attention, warm_up_scale
    warm_up_copy_rows()
    warm_up_batching()
    warm_up_ffn_to_attention()
    for dtype in (rt.cfg.token_dtype,) if rt.cfg else ("fp16", "bf16"):  # no config yet (afd role): both
        if rt.cfg is None or rt.cfg.expert_kind == "scale":
            warm_up_scale(dtype == "fp16")


def body(rt) -> None:
    cfg, mem = rt.cfg, rt.mem
    f = int(rt.role[len("ffn"):])
    model = Model(cfg)
    ctx = mem.ffn_context(f)
    rt.watched_run_flags = [ctx.i32[32:33]]
    A, F, M, BS, K1, H = (cfg.sessions, cfg.ffn_ranks, cfg.micro_batch_num, cfg.micro_batch_size, cfg.selected,
                          cfg.hidden_size)

    def notify(rank: int) -> None:
        s = rank - F
        rt.ring(f"combine{s}" if cfg.fuse_scheduler else f"sched{s}")

    group = mem.group(notify=notify)
    for s in range(A):
        rank = cfg.attention_rank(s)
        combined = None
        if s in mem.local_sessions:
            counters = mem.stream(s).counters
            combined = (lambda c=counters: int(c[COMBINE_DONE]))
        group.windows[rank] = StampedWindow(rt, group.windows[rank], mem.f2a_stamps(s, f), BS * K1, combined)
    a2f_done = {s: mem.stream(s).counters for s in mem.local_sessions}  # sessions on another host: see units
    local = cfg.experts_on(f)
    expert_num = max(1, len(local)) * cfg.layers
    attn_rank_table = np.arange(F, F + A, dtype=np.int32)
    ffn_hop = rt.samples("ffn_ns")
    device = DeviceTime(cfg)
    passes: dict[tuple[int, int], int] = {}  # (session, mb) -> last layer pass p = step * layers + layer seen

    def place(keys) -> tuple[list[list[int]], tuple[int, int, int]]:
        """[session, micro_batch, layer, step] of this round's (session, mb, layer) keys (for the trace), and the
        (step, layer, micro_batch) of its first unit, which the role's status now shows."""
        units = []
        for key in keys:
            last = passes.get(key[:2], -1)
            p = last + 1 + (key[2] - last - 1) % cfg.layers  # next pass of this (session, mb) at that layer
            passes[key[:2]] = p
            units.append([*key, p // cfg.layers])
        # the round's point is its earliest unit: a 950 snapshot may take sessions a step apart, and a fault at a
        # step must not touch an earlier step's data. A unit's step: from the session's A2F counter on this host,
        # else from the passes seen (the same number)
        step0, layer0, m0 = min((_step_of(cfg, int(a2f_done[s][A2F_DONE]), layer, mb) if s in a2f_done else step,
                                 layer, mb) for s, mb, layer, step in units)
        rt.at(step0, layer0, m0)
        return units, (step0, layer0, m0)

    receive = _receive_v2 if cfg.generation == "950" else _receive_v1
    records = ffn_records(ctx, A, M, BS, K1) if cfg.generation == "950" else None  # V2: the units' layer words
    batch = None  # one set of batching outputs, reused: F2A has sent every row before the next round gathers
    while True:
        got = receive(rt, ctx, records, expert_num, place, batch)
        if got is None:
            if ctx.run_flag == 0:
                return  # stopped: the receive returned (or, V2, stopped) without work
            continue
        t0, units, batch = got
        round_args = {"units": units}
        n = int(batch.actual_token_num[0])
        out = batch.y[:n]  # the experts overwrite the batch they read (F2A sends it; nothing else reads y)
        with rt.op("experts", round_args, device.expert_ns(n)):
            run_experts(model, local, batch, out)
        f2a_bytes = n * cfg.token_bytes
        with rt.op("ffn_to_attention", {"units": units, "bytes": f2a_bytes}, device.link_ns(f2a_bytes)):
            ffn_to_attention(out, batch.session_ids[:n], batch.micro_batch_ids[:n], batch.token_ids[:n],
                             batch.expert_offsets[:n], np.array([n], np.int64), group, cfg.world_size,
                             [M, BS, K1], [M, BS, K1, H], attn_rank_table=attn_rank_table,
                             generation=cfg.generation)
        ffn_hop.append(time.monotonic_ns() - t0)
        rt.hooks.window_round_done()  # a drop-flag / reorder hits one round that sent data
        rt.progressed()
        rt.service()


def _receive_v1(rt, ctx, records, expert_num: int, place, batch):
    """A3: ffn_worker_scheduler_ (sync_group_size A in sync mode, 1 in async) waits for records and emits them;
    the round's faults fire; then NORM batching gathers what it emitted. (t0, units, batch), or None without work."""
    cfg, mem = rt.cfg, rt.mem
    with rt.op("ffn_worker_scheduler_"):
        ffn_worker_scheduler_(ctx, cfg.sessions if cfg.mode == "sync" else 1, idle=rt.idle)
    t0 = time.monotonic_ns()
    out_num = ctx.ffn.out_num
    if out_num == 0:
        return None
    sessions = mem.device.view(ctx.ffn.session_ids_buf, 4 * out_num, np.int32, field="ffn.session_ids_buf")
    for s in sessions.tolist():  # the headers are consumed: A2F backpressure on them is released
        rt.ring(f"attn{s}")
    layers = mem.device.view(ctx.ffn.layer_ids_buf, 4 * out_num, np.int32, field="ffn.layer_ids_buf")
    mbs = mem.device.view(ctx.ffn.micro_batch_ids_buf, 4 * out_num, np.int32, field="ffn.micro_batch_ids_buf")
    units, point = place(dict.fromkeys(zip(sessions.tolist(), mbs.tolist(), layers.tolist())))
    rt.check_faults(*point)
    with rt.op("ffn_worker_batching", {"units": units}):
        batch = ffn_worker_batching(ctx, expert_num, [cfg.sessions, cfg.micro_batch_size, cfg.selected,
                                                      cfg.hidden_size], token_dtype=mem.token_dtype_code,
                                    need_schedule=0, out=batch)
    return t0, units, batch


def _receive_v2(rt, ctx, records, expert_num: int, place, batch):
    """950: FfnWorkerBatching V2 receives and gathers in one op, no FFN scheduler. Async mode: its snapshot receive
    (need_schedule=1, sync_flag=True, layer_num=L) takes the sessions whose header is set in one micro-batch and
    regroups their ids by the record's layer; sync mode: its wait-all receive (layer_num=0, the table's ids already
    per layer). The round is known once the op returned; its faults fire then (a corrupt field meets the next
    receive's own check). (t0 = the end of the op's wait, units, batch), or None when stopped while waiting. The
    trace's wait inside the op ends when its last idle returned (the policy's own bound ends before a yield, which
    is when the attention side, given the core, sends), so the a2f hop ends where the work arrived."""
    cfg, mem = rt.cfg, rt.mem
    snapshot = cfg.snapshot_receive
    waits = rt.waits

    def idle(waiting) -> None:
        rt.idle(waiting)
        waits.wait_last = time.perf_counter_ns()  # the wait lasts until here: a yield the attention side used counts

    try:
        with rt.op("ffn_worker_batching", {"units": []}) as span:  # (no units: a receive that was stopped)
            batch = ffn_worker_batching(ctx, expert_num, [cfg.sessions, cfg.micro_batch_size, cfg.selected,
                                                          cfg.hidden_size], token_dtype=mem.token_dtype_code,
                                        need_schedule=1, layer_num=cfg.layers if snapshot else 0,
                                        sync_flag=snapshot, generation="950", idle=idle, out=batch)
            t0 = waits.wait_last if waits.wait_start >= span.t0 else span.t0
            keys = _round_keys(ctx, records, batch, cfg.micro_batch_num, snapshot)
            if not keys:  # a snapshot whose every slot was masked (a bad layer word): nothing to compute or send
                return None
            units, point = place(keys)
            span.args = {"units": units}
    except Stopped:
        if ctx.run_flag == 0:
            return None
        raise
    rt.check_faults(*point)
    return t0, units, batch


def _round_keys(ctx, records: np.ndarray, batch, m: int, snapshot: bool) -> list[tuple[int, int, int]]:
    """The (session, micro_batch, layer) units a V2 receive took: its micro-batch is the one before the new
    polling_index; its sessions are those with rows (snapshot: a session's header reaches only the ranks it sent
    slots to) or all A (wait-all); a unit's layer is its record's layer word, which consuming leaves alone (and
    the session rewrites only after this round's F2A let its combine run)."""
    mb = (int(ctx.ffn.polling_index) - 1) % m
    if snapshot:
        sessions = np.unique(batch.session_ids[:int(batch.actual_token_num[0])]).tolist()
    else:
        sessions = range(records.shape[0])
    return [(s, mb, int(records[s, mb, 1])) for s in sessions]
