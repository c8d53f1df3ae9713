"""`afd faults campaign`: run many pipelines with a random fault each and tabulate how each kind ended."""
from __future__ import annotations

import json

from . import add_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("faults", help="fault campaigns")
    fsub = p.add_subparsers(dest="faults_command", metavar="SUBCOMMAND")
    fsub.required = True
    c = fsub.add_parser("campaign", help="N runs, one random fault each; a table per fault kind")
    c.add_argument("config", nargs="?", help="a YAML config (default: the built-in one)")
    c.add_argument("--runs", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    add_overrides(c)
    c.add_argument("--json", action="store_true", help="print the per-kind rows as JSON")
    c.set_defaults(handler=main)


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..campaign import campaign, summarize
    if args.runs <= 0:
        from ..errors import ConfigError
        raise ConfigError("--runs", f"must be > 0, got {args.runs}")
    if args.seed < 0:
        from ..errors import ConfigError
        raise ConfigError("--seed", f"must be >= 0, got {args.seed}")
    err = Console(stderr=True)
    runs = campaign(args.config, args.runs, args.seed, args.overrides,
                    on_run=lambda i, r, s: err.print(f"[{i + 1}/{args.runs}] {r.fault}: {r.outcome} exit {r.exit_code}"
                                                     f" ({'as documented' if r.as_documented else 'NOT AS DOCUMENTED'})"
                                                     f" {s:.1f}s"))
    rows = summarize(runs)
    if args.json:
        print(json.dumps({"rows": rows, "runs": [r.__dict__ for r in runs], "interrupted": runs.interrupted},
                         indent=1))
    else:
        title = f"fault campaign: {args.runs} runs, seed {args.seed}"
        if runs.interrupted:
            title = f"fault campaign: {len(runs)} of {args.runs} runs (stopped by {runs.interrupted}), seed {args.seed}"
        table = Table(title=title)
        for col in ("kind", "runs", "as documented", "detect p50", "detect p99", "leftover procs", "leftover segs",
                    "wrong before fault"):
            table.add_column(col, justify="right" if col != "kind" else "left")
        fmt = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
        for r in rows:
            table.add_row(r["kind"], str(r["runs"]), str(r["as_documented"]), fmt(r["detect_p50_s"]),
                          fmt(r["detect_p99_s"]), str(r["leftover_processes"]), str(r["leftover_segments"]),
                          str(r["wrong_before_fault"]))
        Console().print(table)
        for r in runs:
            if not r.as_documented:
                print(f"not as documented: {r.fault}: {r.outcome} exit {r.exit_code}: {r.reason}")
    bad = [r for r in runs if not r.as_documented or r.leftover_processes or r.leftover_segments
           or r.wrong_before_fault]
    return 1 if bad else 0
