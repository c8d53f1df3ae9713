"""`afd bench`: the pipeline vs a Queue baseline and the copy bound, hop latency, the stage table; --full: scaling, RSS."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich and the benchmarks load when `afd bench` runs, not for `afd --help`
    from rich.table import Table


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the pipeline (throughput, hop latency, Queue baseline, copy bound, stage table)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test; the targets stay the same)")
    p.add_argument("--full", action="store_true",
                   help="then the scaling table: the pipeline against H and against BS, and RSS per role")
    p.set_defaults(handler=main)


def _verdict(ok) -> str:
    return "[dim]n/a[/dim]" if ok is None else ("[green]PASS[/green]" if ok else "[red]FAIL[/red]")


def _f(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def tables(r: dict) -> list[Table]:
    from rich.table import Table
    d, t = r["details"], r["targets"]
    shape = r["shape"]
    title = (f"afd bench: BS={shape['micro_batch_size']} K={shape['top_k']}+1 H={shape['hidden_size']} "
             f"{shape['token_dtype']} {shape['expert_kind']} experts, M={shape['micro_batch_num']} "
             f"L={shape['layers']} steps={shape['steps']}" + (" (quick)" if r["quick"] else ""))
    c = d["copy"]
    thr = Table(title=title)
    thr.caption = (f"copy bound: {c['bytes'] / 1e6:.1f} MB moved per micro-batch-layer (A2F + F2A) at "
                   f"{c['gb_per_s']:.1f} GB/s")
    for col in ("path", "mbl/s", "vs pipeline", "run", "matches reference"):
        thr.add_column(col, justify="right" if col not in ("path", "matches reference") else "left")
    rate = r["micro_batch_layers_per_s"]
    match = {None: "not checked", True: "yes", False: "NO"}
    for key in ("pipeline", "pipeline_spin", "pipeline_two_hosts"):
        if d.get(key, {"outcome": "completed"})["outcome"] != "completed":
            thr.caption += f"\n[red]{key} run {d[key]['outcome']}: {d[key]['reason']}[/red]"
    thr.add_row("pipeline, default wait", _f(rate), "1.00x",
                f"{d['pipeline']['micro_batch_layers']} in {d['pipeline']['run_s']:.2f} s",
                match[d["pipeline"]["outputs_match_reference"]])
    ps = d["pipeline_spin"]
    thr.add_row("pipeline, spin wait", _f(ps["micro_batch_layers_per_s"]),
                f"{ps['micro_batch_layers_per_s'] / rate:.2f}x" if rate else "-",
                f"{ps['micro_batch_layers']} in {ps['run_s']:.2f} s", match[ps["outputs_match_reference"]])
    p2 = d.get("pipeline_two_hosts")
    if p2:
        thr.add_row("pipeline, two hosts (TCP windows)", _f(p2["micro_batch_layers_per_s"]),
                    f"{p2['micro_batch_layers_per_s'] / rate:.2f}x" if rate else "-",
                    f"{p2['micro_batch_layers']} in {p2['run_s']:.2f} s", match[p2["outputs_match_reference"]])
    q = d["queue"]
    thr.add_row("multiprocess.Queue", _f(q["micro_batch_layers_per_s"]),
                f"{q['micro_batch_layers_per_s'] / rate:.2f}x" if rate else "-",
                f"{q['micro_batch_layers']} in {q['run_s']:.2f} s", match[q["outputs_match_reference"]])
    thr.add_row("numpy copy bound",
                _f(c["micro_batch_layers_per_s"]), f"{c['micro_batch_layers_per_s'] / rate:.2f}x" if rate else "-",
                f"{c['copy_ms']:.3f} ms/mbl", "")

    hop = Table(title="flag hop: last flag store -> attention_worker_scheduler_ returns (us)",
                caption=f"dedicated: writer waits {d['hop']['gap_us'][0]:.0f}-{d['hop']['gap_us'][1]:.0f} us, "
                        "then flags + doorbell; in pipeline: includes queueing behind the combine")
    for col in ("measurement", "wait", "p50", "p99", "max", "n"):
        hop.add_column(col, justify="left" if col in ("measurement", "wait") else "right")
    for key, wait in (("hop", "default"), ("hop_spin", "spin")):
        h = d[key]
        hop.add_row("dedicated, 2 processes", wait, _f(h["p50"]),
                    _f(h["p99"]), _f(h["max"]), str(h["n"]))
    for key, label, wait in (("pipeline", "in pipeline", "default"), ("pipeline_spin", "in pipeline", "spin"),
                             ("pipeline_two_hosts", "in pipeline, two hosts (FFN -> agent -> scheduler)", "default")):
        p = d.get(key)
        if p:
            hop.add_row(label, wait, _f(p["hop_us_p50"]), _f(p["hop_us_p99"]), "", str(p["hop_n"]))

    tgt = Table(title="targets")
    for col in ("figure", "measured", "target", "verdict"):
        tgt.add_column(col)
    ops = r["ops"]
    rows = [("ratio_vs_queue", f"{r['ratio_vs_queue']:.2f}x"),
            ("fraction_of_copy_bound", f"{r['fraction_of_copy_bound']:.1%}"),
            ("hop_latency_us_p50", f"{r['hop_latency_us_p50']:.1f} us"),
            ("hop_latency_us_p50_spin", f"{r['hop_latency_us_p50_spin']:.1f} us"),
            ("scheduler_scan", f"{ops['scan']['per_iteration_us']:.2f} us/iteration"),
            ("combine_vs_read", f"{ops['combine']['ratio']:.2f}x ({ops['combine']['combine_ms']:.3f} ms vs "
                                f"{ops['combine']['read_only_ms']:.3f} ms)" if "ratio" in ops["combine"] else "-"),
            ("tracing_overhead", f"{r['tracing_overhead']:.1%} (median of {r['tracing']['runs'] // 2} on/off pairs; "
                                 f"best on {r['tracing']['rate_on']:.1f} vs off {r['tracing']['rate_off']:.1f} "
                                 "micro-batch layers/s)"),
            ("torch_combine_vs_numpy", _npu_combine(r.get("npu") or {})),
            ("two_host_vs_one_host", f"{r['two_host_vs_one_host']:.2f}x (trusted network "
                                     f"{r['two_host_trusted_vs_one_host']:.2f}x)"),
            ("two_host_hop_latency_us_p50", _f(r["two_host_hop_latency_us_p50"]) + " us (put -> store "
                                            + _f(r["two_host_put_to_store_us_p50"]) + " us)"),
            ("pipeline_vs_stage_ideal", f"{r['pipeline_vs_stage_ideal']:.1%} of "
                                        f"{r['stage_ideal_micro_batch_layers_per_s']:.1f} micro-batch layers/s"
                                        + (f" (scheduler fused into the combine role: "
                                           f"{r['pipeline_fused_vs_stage_ideal']:.1%})"
                                           if "pipeline_fused_vs_stage_ideal" in r else ""))]
    for name, measured in rows:
        tgt.add_row(name, measured, t[name]["target"], _verdict(t[name]["pass"]))
    tables_ = [thr, hop, tgt, two_host_table(r)]
    if r.get("pipeline_breakdown"):
        tables_.append(one_host_table(r["pipeline_breakdown"]))
    if r.get("stages"):
        tables_.append(stage_table(r["stages"], r.get("stages_total"), d.get("stages") or {}))
    if r.get("round_trip"):
        tables_.append(round_trip_table(r["round_trip"]))
    npu = r.get("npu") or {}
    if "combine" in npu:
        rt, c = npu.get("round_trip") or {"round_trips_per_s": None}, npu["combine"]
        front = Table(title=f"torch front-end (afd npu): BS={c['bs']} K={c['k']}+1 H={c['hidden']} {c['dtype']}")
        for col in ("figure", "measured", "beside it"):
            front.add_column(col)
        front.add_row("npu_attention_worker_combine + synchronize", f"{c['torch_ms']:.3f} ms",
                      f"afd op on numpy views {c['numpy_ms']:.3f} ms ({c['ratio']:.2f}x; same output: "
                      f"{'yes' if c['same_output'] else 'NO'})")
        front.add_row("two-rank window round trip (torchrun)",
                      f"{_f(rt['round_trips_per_s'])} /s" if rt["round_trips_per_s"] else "not run (--quick)",
                      f"numpy pipeline {rate:.1f} micro-batch layers/s")
        tables_.append(front)
    return tables_


def two_host_table(r: dict) -> Table:
    """Where the two-host pipeline's time goes, ms per micro-batch layer (afd.bench.two_hosts), and the transport
    alone in its four ways."""
    from rich.table import Table
    tr = r.get("transport") or {}
    table = Table(title="two hosts: ms per micro-batch layer (both directions)",
                  caption=("transport alone, one micro-batch layer's writes: " + ", ".join(
                      f"{m} {tr[m]['ms']:.2f} ms" for m in ("curve", "encrypted", "trusted", "none") if m in tr)))
    for col in ("part", "encrypted (default)", "trusted network"):
        table.add_column(col, justify="left" if col == "part" else "right")
    enc, tru = r.get("two_host_breakdown") or {}, r.get("two_host_trusted_breakdown") or {}
    for key in enc:
        if key != "one_host_period":
            table.add_row(key, _f(enc.get(key)), _f(tru.get(key)))
    table.add_row("one host's period", _f(enc.get("one_host_period")), "")
    return table


def one_host_table(b: dict) -> Table:
    """Where the one-host pipeline's period goes (afd bench's pipeline_breakdown): each role's busy, waiting and idle
    ms per micro-batch layer, and the hand-offs between roles."""
    from rich.table import Table
    hand_offs = ", ".join(f"{k} {v:.0f} us" for k, v in (b.get("hand_offs_us_p50") or {}).items())
    table = Table(title=f"one host: ms per micro-batch layer of each role (period {_f(b.get('period'), '{:.2f}')} ms)",
                  caption=f"hand-offs p50: {hand_offs}" if hand_offs else None)
    for col in ("role", "busy", "waiting", "idle"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role, parts in (b.get("roles") or {}).items():
        table.add_row(role, *(_f(parts.get(k), "{:.2f}") for k in ("busy", "waiting", "idle")))
    return table


def round_trip_table(rt: dict) -> Table:
    from rich.table import Table
    """The window round trip of one micro-batch layer with the V1 (A3) and the V2 (950) operators, and their ratio."""
    table = Table(title="window round trip of one micro-batch layer, one process: V1 (A3) vs V2 (950)")
    table.caption = (f"attention_to_ffn ... attention_worker_combine; {rt['timing']}; V2: async, FfnWorkerBatching V2's "
                     "snapshot receive instead of the FFN scheduler + batching")
    for col in ("operators", "ms", "vs V1"):
        table.add_column(col, justify="left" if col == "operators" else "right")
    table.add_row("V1 (A3)", f"{rt['v1_ms']:.3f}", "1.00x")
    table.add_row("V2 (950)", f"{rt['v2_ms']:.3f}", _f(rt["v2_vs_v1"], "{:.2f}x"))
    return table


def stage_table(rows: list[dict], total: dict | None = None, info: dict | None = None) -> Table:
    """The stage table (afd.bench.stages): per operator of one micro-batch layer, ms, bytes, GB/s, vs numpy's copy."""
    from rich.table import Table
    info = info or {}
    table = Table(title="stages of one micro-batch layer, one process (afd.bench.stages)")
    table.caption = (f"ms: {info.get('timing', 'median per micro-batch layer')}; MB: read + written (formulas in "
                     "afd/bench/stages.py), so GB/s counts both directions; copy: np.copyto reading and writing the "
                     "same bytes in the same loop, as cold as the stage's data (of copy: the stage's rate over it); "
                     "warm: the same copy back to back; outputs checked against the reference layer "
                     f"({info.get('checked', '?')} layers)")
    table.add_column("stage", no_wrap=True, min_width=max(len(row["name"]) for row in rows))
    for col in ("ms", "MB", "GB/s", "copy GB/s", "of copy", "warm copy GB/s", "of warm"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows + ([total] if total else []):
        table.add_row(row["name"], f"{row['ms']:.3f}", f"{row['bytes'] / 1e6:.3f}", f"{row['gb_per_s']:.2f}",
                      f"{row['copy_gb_per_s']:.1f}", f"{row['fraction_of_copy']:.1%}",
                      f"{row.get('warm_copy_gb_per_s', 0):.1f}", f"{row.get('fraction_of_warm_copy', 0):.1%}",
                      end_section=row is not total and row is rows[-1])
    return table


def scaling_table(scaling: dict) -> Table:
    """The scaling table (afd.bench.scaling): one pipeline run per point, its rate beside the copy bound there."""
    from rich.table import Table
    shape = scaling["shape"]
    table = Table(title=f"scaling (afd.bench.scaling): K={shape['top_k']}+1 {shape['token_dtype']} "
                        f"{shape['expert_kind']} experts, M={shape['micro_batch_num']} L={shape['layers']}"
                        + (" (quick)" if scaling["quick"] else ""))
    la = scaling["loadavg_before_after"]
    table.caption = ("mbl/s: micro-batch layers per second of the real pipeline over run s; copy bound: np.copyto "
                     "of that point's A2F + F2A payload (MB/mbl), measured right after its run; "
                     f"load average {la[0]} before / {la[1]} after, wall {scaling['wall_s']:.0f} s")
    # two- and three-line headers: the table fits 80 columns (what rich assumes when the output is not a terminal)
    for col in ("axis", "H", "BS", "MB/mbl", "mbl/s", "copy\nbound\nmbl/s", "of copy\nbound", "run s",
                "matches\nreference"):
        table.add_column(col, justify="left" if col in ("axis", "matches\nreference") else "right", no_wrap=True)
    match = {None: "not checked", True: "yes", False: "NO"}
    rows = scaling["rows"]
    for i, row in enumerate(rows):
        done = row["outcome"] == "completed"
        table.add_row(row["axis"], str(row["hidden_size"]), str(row["micro_batch_size"]),
                      f"{row['payload_bytes'] / 1e6:.1f}", _f(row["micro_batch_layers_per_s"]),
                      _f(row["copy_bound_micro_batch_layers_per_s"], "{:.0f}"),
                      f"{row['fraction_of_copy_bound']:.1%}",
                      f"{row['run_s']:.2f}" if done else f"[red]{row['outcome']}[/red]",
                      match[row["outputs_match_reference"]],
                      end_section=i + 1 < len(rows) and rows[i + 1]["axis"] != row["axis"])
    return table


def rss_table(scaling: dict) -> Table:
    """Peak RSS of each process of the DeepSeek-shape run, and what was resident at its end by kind."""
    from rich.table import Table
    shape = scaling["rss_shape"]
    table = Table(title=f"RSS per role: H={shape['hidden_size']} BS={shape['micro_batch_size']}, "
                        f"{shape['steps']} steps (MB)")
    table.caption = ("peak: the process's high-water RSS (VmHWM); at the end, before the windows are unmapped: "
                     "anon, file (mapped files, mostly libraries), shmem (the shared windows this process touched); "
                     "private: pages only this process maps; pss: each page split among the processes mapping it "
                     "(roles share the fork server's pages)")
    table.add_column("process")
    for col in ("peak", "at end", "anon", "file", "shmem", "private", "pss"):
        table.add_column(col, justify="right")
    rss = scaling["rss_per_role"]
    for role in scaling.get("rss_roles") or list(rss):
        u = rss.get(role)
        if not u:
            table.add_row(role, "[red]no report[/red]", "", "", "", "", "", "")
            continue
        table.add_row(role, *(_f(u.get(k)) for k in ("peak_mb", "rss_mb", "anon_mb", "file_mb", "shmem_mb",
                                                     "private_mb", "pss_mb")))
    return table


def startup_table(startup: dict) -> Table:
    """Start-up (afd.bench.startup): each quick command and `afd npu` on a torch start, beside its baseline."""
    from rich.table import Table
    table = Table(title=f"start-up: median of {startup['runs']} rounds, every command once a round (afd.bench.startup)")
    table.caption = (f"afd is {startup['afd']}; CPU: user + system of the command and its children; over: the "
                     "median wall time above its baseline's" + ("" if startup["torch"] else "; torch not installed"))
    for col in ("command", "wall s", "min s", "CPU s", "over", "target", "verdict"):
        table.add_column(col, justify="left" if col in ("command", "target", "verdict") else "right")
    for name, row in startup["rows"].items():
        over = f"{row['over_baseline_s']:+.3f} vs {row['baseline']}" if row.get("baseline") else "baseline"
        table.add_row(name, f"{row['wall_s']:.3f}", f"{row['min_s']:.3f}", f"{row['cpu_s']:.3f}", over,
                      row.get("target", ""), _verdict(row["pass"]) if "pass" in row else "")
    return table


def stop_table(stop: dict) -> Table:
    """Stop latency (afd.bench.stop): per config, and `afd stop` end to end, beside their targets."""
    from rich.table import Table
    table = Table(title=f"stop: run_flag = 0 -> the launcher's exit, its process group empty (afd.bench.stop), "
                        f"{stop['runs']} per config")
    table.caption = ("stopped by SIGTERM once running; not clean: a run whose report, segments, run directory or "
                     "processes were not all done with at its exit; afd stop: its own start included, until it and "
                     "the pipeline have exited (minimal config)")
    for col in ("config", "median s", "max s", "not clean", "target", "verdict"):
        table.add_column(col, justify="left" if col in ("config", "target", "verdict") else "right")
    rows = [(name, row, stop["target_s"]) for name, row in stop["configs"].items()]
    for name, row, target in rows + [("afd stop, end to end", stop["afd_stop"], stop["afd_stop"]["target_s"])]:
        table.add_row(name, f"{row['median_s']:.3f}", f"{row['max_s']:.3f}", str(row["not_clean"]),
                      f"max <= {target:g} s", _verdict(row["pass"]))
    return table


def _npu_combine(npu: dict) -> str:
    c = npu.get("combine")
    if not c:
        return npu.get("skipped", "-")
    return f"{c['ratio']:.2f}x ({c['torch_ms']:.3f} ms vs {c['numpy_ms']:.3f} ms)"


def main(args) -> int:
    from rich.console import Console

    from .. import bench
    from ..bench.startup import measure as measure_startup
    err = Console(stderr=True)
    t0 = time.monotonic()
    if args.json:  # the start-up times first, while nothing of the bench's own runs lingers
        startup = measure_startup(quick=args.quick)
    else:
        with err.status("afd bench: start-up times") as status:
            startup = measure_startup(quick=args.quick, progress=lambda what: status.update(f"afd bench: {what}"))
    from ..bench.stop import measure as measure_stop
    if args.json:
        stop = measure_stop(quick=args.quick)
    else:
        with err.status("afd bench: stop latency") as status:
            stop = measure_stop(quick=args.quick, progress=lambda what: status.update(f"afd bench: {what}"))
    if args.json:
        result = bench.measure(quick=args.quick)
    else:
        with err.status("afd bench") as status:
            result = bench.measure(quick=args.quick, progress=lambda what: status.update(f"afd bench: {what}"))
    if args.full:  # after the bench, not inside it: the scaling runs must not skew the bench's figures
        from ..bench.scaling import measure_scaling
        if args.json:
            result["scaling"] = measure_scaling(quick=args.quick)
        else:
            with err.status("afd bench: scaling") as status:
                result["scaling"] = measure_scaling(quick=args.quick, progress=lambda what: status.update(
                    f"afd bench: {what}"))
    result["startup"] = startup
    result["stop"] = stop
    result["wall_s"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    console = Console()
    for table in tables(result):
        console.print(table)
    console.print(startup_table(result["startup"]))
    console.print(stop_table(result["stop"]))
    if "scaling" in result:
        console.print(scaling_table(result["scaling"]))
        console.print(rss_table(result["scaling"]))
    la = result["loadavg_before_after"]
    console.print(f"{result['cpus']} CPUs, load average {la[0]} before / {la[1]} after; "
                  f"wall {result['wall_s']:.1f} s. Targets are printed, not asserted: other load skews every figure.")
    return 0
