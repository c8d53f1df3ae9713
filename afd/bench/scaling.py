"""The scaling table: the real pipeline's rate and fraction of the copy bound against H and against BS; RSS per role."""
# One pipeline run per point (afd.launcher.pipeline.run, outputs checked against the reference), the other fields
# SHAPE's: H in 1024 ... 8192 at the bench's BS=48, and BS in 8 ... 512 at DeepSeek's H=7168. The copy bound is
# measured right after each run, at that point's shape (measure_copy_bound), so each fraction compares two figures
# taken under the same load. The per-role RSS comes from the DeepSeek-shape point (H=7168, BS=48): every process
# reports its own peak in its final report (afd.runtime.rss).
from __future__ import annotations

import math
import os
import time

from .pipeline import SHAPE, bench_config, measure_copy_bound

H_POINTS = (1024, 2048, 4096, 7168, 8192)
BS_POINTS = (8, 32, 128, 512)
QUICK_POINTS = (("H", 7168, SHAPE["micro_batch_size"]), ("BS", SHAPE["hidden_size"], 8))
MIN_RUN_S = 1.0  # pipeline time per point in full mode; shorter runs are mostly start-up and ramp
UNITS_PER_STEP = SHAPE["layers"] * SHAPE["micro_batch_num"] * SHAPE["sessions"]  # micro-batch layers per step


def points(quick: bool = False) -> list[tuple[str, int, int]]:
    """(axis, hidden_size, micro_batch_size) of every row, in table order."""
    if quick:
        return list(QUICK_POINTS)
    bs, h = SHAPE["micro_batch_size"], SHAPE["hidden_size"]
    return [("H", x, bs) for x in H_POINTS] + [("BS", h, x) for x in BS_POINTS]


def payload_bytes(bs: int, h: int) -> int:
    """A2F + F2A payload of one micro-batch layer (the copy bound's bytes): 2 * BS*(K+1)*H * 2 (bf16)."""
    return 2 * bs * (SHAPE["top_k"] + 1) * h * 2


def first_steps(bs: int, h: int, target_s: float) -> int:
    """Steps expected to take target_s: ~2 ms a micro-batch layer plus 2.5 GB/s of payload (a quiet 2-core machine,
    ~134 micro-batch layers/s at the DeepSeek shape); a run that still comes out short is redone longer."""
    per_unit_s = 2e-3 + payload_bytes(bs, h) / 2.5e9
    return max(2, math.ceil(target_s / (per_unit_s * UNITS_PER_STEP)))


def measure_point(axis: str, h: int, bs: int, steps: int, min_run_s: float = 0.0, attempts: int = 3) -> dict:
    """One row: a pipeline run at (H, BS) with the reference check, then the copy bound at that shape. A run that
    did not complete is retried (another process may have swept its segments); one shorter than min_run_s is redone
    with the steps scaled up to 1.3 * min_run_s."""
    from ..launcher.pipeline import run

    t0 = time.monotonic()
    for attempt in range(1, attempts + 1):
        result = run(bench_config(steps, hidden_size=h, micro_batch_size=bs, check_reference=True))
        if attempt == attempts:
            break
        if result.outcome == "completed":
            if result.run_s >= min_run_s:
                break
            steps = math.ceil(steps * 1.3 * min_run_s / max(result.run_s, 1e-3))
    wall_s = time.monotonic() - t0
    copy = measure_copy_bound(bs=bs, h=h)
    rate, bound = result.micro_batch_layers_per_s, copy["micro_batch_layers_per_s"]
    return {"axis": axis, "hidden_size": h, "micro_batch_size": bs, "steps": steps, "attempts": attempt,
            "outcome": result.outcome, "reason": result.reason,
            "micro_batch_layers": result.micro_batch_layers, "run_s": result.run_s, "wall_s": wall_s,
            "micro_batch_layers_per_s": rate, "payload_bytes": copy["bytes"], "copy_gb_per_s": copy["gb_per_s"],
            "copy_bound_micro_batch_layers_per_s": bound, "fraction_of_copy_bound": rate / bound if bound else 0.0,
            "outputs_match_reference": result.outputs_match_reference if result.compared else None,
            "compared": result.compared, "rss": result.rss, "roles": list(result.roles)}


def measure_scaling(quick: bool = False, progress=None) -> dict:
    """Every point of the scaling table in one run (quick: two points, two steps each: a smoke test), and the RSS
    per role of the DeepSeek-shape point."""
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    rows = []
    for axis, h, bs in points(quick):
        if progress:
            progress(f"scaling: {axis} point H={h} BS={bs}")
        steps = 2 if quick else first_steps(bs, h, 1.5 * MIN_RUN_S)
        rows.append(measure_point(axis, h, bs, steps, min_run_s=0.0 if quick else MIN_RUN_S))
    deepseek = next(r for r in rows if (r["hidden_size"], r["micro_batch_size"]) ==
                    (SHAPE["hidden_size"], SHAPE["micro_batch_size"]))
    return {"quick": quick, "cpus": os.cpu_count(),
            "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "shape": {k: v for k, v in SHAPE.items() if k not in ("hidden_size", "micro_batch_size")},
            "rows": rows, "rss_per_role": deepseek["rss"], "rss_roles": deepseek["roles"],
            "rss_shape": {"hidden_size": deepseek["hidden_size"], "micro_batch_size": deepseek["micro_batch_size"],
                          "steps": deepseek["steps"]},
            "wall_s": time.monotonic() - t0}
