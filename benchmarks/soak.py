"""Soak: the pipeline running continuously for a while (default 10 minutes); RSS per process at start and end."""
from __future__ import annotations

import argparse
import json
import time

from afd.launcher.pipeline import Pipeline


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", default="configs/minimal.yaml")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the first RSS sample")
    parser.add_argument("--trace", action="store_true",
                        help="keep event recording on (it grows to its cap of 100k events per role, then stays)")
    args = parser.parse_args()
    with Pipeline(args.config, steps=10**9, run_timeout_s=args.seconds + 120, trace=args.trace) as pipeline:
        time.sleep(args.warmup)
        start = {role: rss_kib(pid) for role, pid in pipeline.pids.items()}
        steps_start = pipeline.step_count
        time.sleep(max(0.0, args.seconds - args.warmup))
        end = {role: rss_kib(pid) for role, pid in pipeline.pids.items()}
        pipeline.stop("soak finished")
        result = pipeline.wait(timeout=30)
    rows = {role: {"rss_start_kib": start[role], "rss_end_kib": end[role],
                   "growth_kib": end[role] - start[role]} for role in start}
    print(json.dumps({"seconds": args.seconds, "outcome": result.outcome, "steps": result.steps,
                      "steps_after_warmup": result.steps - steps_start,
                      "micro_batch_layers_per_s": round(result.micro_batch_layers_per_s, 1),
                      "outputs_match_reference": result.outputs_match_reference, "compared": result.compared,
                      "rss": rows}, indent=1))
    flat = all(r["growth_kib"] <= max(2048, 0.05 * r["rss_start_kib"]) for r in rows.values())
    print("memory flat:", "yes" if flat else "NO")
    return 0 if flat and result.outputs_match_reference else 1


if __name__ == "__main__":
    raise SystemExit(main())
