"""`afd run`: run the pipeline on a config (or the built-in default), show progress and a summary, write the report."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from . import add_overrides

if TYPE_CHECKING:  # rich loads where a table or progress is drawn, not for `afd --help`
    from rich.table import Table


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the pipeline (built-in default when no CONFIG is given)")
    p.add_argument("config", nargs="?", help="a YAML config (see configs/)")
    add_overrides(p)
    p.add_argument("--steps", type=int, help="decode steps to run")
    p.add_argument("--fault", dest="faults", action="append", default=[], metavar="KIND[:TARGET][@WHEN]",
                   help="inject a fault (repeatable): stop, kill, hang, drop-flag, delay, corrupt, reorder; "
                        "WHEN is step=N,layer=L,mb=M or t=SECONDS")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here (whatever the outcome)")
    p.add_argument("--log", metavar="FILE", help="write the run log here (default: REPORT.log beside --report)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trace", metavar="FILE", help="write the Chrome trace JSON here (Perfetto, chrome://tracing)")
    p.add_argument("--plot", metavar="FILE", help="draw the timeline PNG here (needs the plot extra: matplotlib)")
    p.set_defaults(handler=main)


def summary_table(result) -> Table:
    from rich.table import Table
    table = Table(title=f"afd run: {result.config.name}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    c = result.config
    table.add_row("outcome", f"{result.outcome}" + (f" ({result.reason})" if result.reason else ""))
    table.add_row("shape", f"A={c.sessions} F={c.ffn_ranks} M={c.micro_batch_num} BS={c.micro_batch_size} "
                           f"K={c.top_k}+1 H={c.hidden_size} L={c.layers} {c.token_dtype} {c.expert_kind} {c.mode}")
    table.add_row("steps", f"{result.steps} / {c.steps}")
    table.add_row("micro-batches", str(result.micro_batches))
    table.add_row("micro-batch layers", str(result.micro_batch_layers))
    table.add_row("run time", f"{result.run_s:.3f} s")
    table.add_row("micro-batches per second", f"{result.micro_batches_per_s:.1f}")
    table.add_row("micro-batch layers per second", f"{result.micro_batch_layers_per_s:.1f}")
    for name, p in result.hops_us.items():
        if p:
            # the samples' names say what the roles record (ns); the table shows microseconds, said once
            table.add_row(f"latency {name.removesuffix('_ns')} (us)", f"p50 {p['p50']:.1f}  p99 {p['p99']:.1f}  "
                                                                      f"(n={p['n']})")
    m = result.metrics
    if m:
        table.add_row("bubble fraction", f"{m['bubble_fraction']:.2f}" if m.get("bubble_fraction") is not None
                      else "-")
        table.add_row("busy / waiting / idle", "  ".join(f"{r} {v['busy']:.0%}/{v['waiting']:.0%}/{v['idle']:.0%}"
                                                        for r, v in m["roles"].items()))
        for name, p in m["hops_us"].items():
            if p:
                table.add_row(f"hop {name} (us)", f"p50 {p['p50']:.1f}  p90 {p['p90']:.1f}  p99 {p['p99']:.1f}")
    match = result.outputs_match_reference
    table.add_row("outputs match reference", "not checked" if match is None else
                  ("yes" if match else f"NO ({len(result.mismatches)} differ)") + f" ({result.compared} compared)")
    if result.failure:
        table.add_row("failure", str(result.failure))
    for f in result.faults:
        table.add_row("fault", f"{f['spec']}: " + ("fired" if f["fired"] else "did not fire") +
                      (f", detected after {f['detect_s']:.3f} s" if "detect_s" in f else ""))
    bad = {r: v for r, v in result.roles.items() if v["exit_code"] != 0}
    table.add_row("roles", f"{len(result.roles)} processes" + (f", non-zero exits: {bad}" if bad else ", all exit 0"))
    return table


def _hold_signals() -> None:
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def _quick_exit() -> None:
    """At this process's exit, keep what it loaded (numpy, pydantic, zmq, rich) out of the interpreter's final
    collection, which walked all of it: ~0.15 s of every `afd run`'s end, after the run. Nothing of the run needs a
    finalizer by then (its processes, segments and sockets are closed). Registered last, it runs first."""
    import atexit
    import gc
    atexit.register(gc.freeze)


def main(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..launcher.pipeline import Pipeline
    from ..preflight import check_output
    for flag in ("report", "log", "trace", "plot"):  # before the run: its end must not be lost to a bad path
        check_output(f"--{flag}", getattr(args, flag))
    if args.report and not args.log:
        check_output("--report", f"{args.report}.log")
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.trace or args.plot:
        overrides.append("trace=true")
    if args.plot:
        from ..plot import _pyplot
        _pyplot()  # a missing matplotlib is a usage error before the run, not after it
    console = Console(stderr=True)
    pipeline = Pipeline(args.config, overrides, faults=args.faults)
    show = not args.quiet and console.is_terminal
    with pipeline:
        if show:
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("micro-batch layers"), TimeElapsedColumn(), console=console,
                                transient=True)
            task = progress.add_task(pipeline.cfg.name, total=None)
            pipeline.on_progress = lambda done, total: progress.update(task, completed=done, total=total)
            with progress:
                result = pipeline.wait()
        else:
            result = pipeline.wait()
    _hold_signals()  # the run is over: what is left is writing what it found, which a late SIGTERM must not cut
    _quick_exit()
    lost = _write_outputs(args, result)
    Console().print(summary_table(result))
    if result.exit_code:
        print(f"afd: run {result.outcome}: {result.reason}", file=sys.stderr)
    for flag, exc in lost:  # checked writable before the run; this is a disk that filled or a directory removed since
        print(f"afd: error: {flag}: could not write {exc.filename}: {exc.strerror}", file=sys.stderr)
    return result.exit_code or (1 if lost else 0)


def _write_outputs(args, result) -> list[tuple[str, OSError]]:
    """Every output asked for, each on its own: one that fails does not stop the others (nor the summary)."""
    from ..launcher.report import write_log, write_report
    from ..plot import plot_result
    from ..trace import write_result
    lost = []
    steps = [("--report", lambda: write_report(result, args.report, args.log)) if args.report else
             ("--log", lambda: write_log(result, args.log)) if args.log else None,
             ("--trace", lambda: write_result(args.trace, result)) if args.trace else None,  # a fault's ends at it
             ("--plot", lambda: plot_result(result, args.plot)) if args.plot else None]
    for step in filter(None, steps):
        try:
            step[1]()
        except OSError as exc:
            lost.append((step[0], exc))
    return lost
