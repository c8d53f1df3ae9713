"""`afd predict`: the ping-pong model's step time for a config, and with --measure, measured beside predicted."""
from __future__ import annotations

import json

from . import add_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="analytic step time of a config (device_time model); --measure runs it")
    p.add_argument("config", nargs="?", help="a YAML config with a device_time section (see configs/)")
    add_overrides(p)
    p.add_argument("--steps", type=int, help="decode steps per measured run")
    p.add_argument("--measure", action="store_true", help="run micro_batch_num = 1..--max-m and compare")
    p.add_argument("--max-m", type=int, default=4, help="largest micro_batch_num measured (default 4)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(handler=main)


def model_text(pred) -> str:
    d = pred.as_dict()
    return (f"T_a {d['t_a_us']:.0f} us  T_e {d['t_e_us']:.0f} us  T_c {d['t_c_us']:.0f} us "
            f"(A2F {d['t_c_a2f_us']:.0f}, F2A {d['t_c_f2a_us']:.0f})  T_f = max(T_a, T_e) = {d['t_f_us']:.0f} us\n"
            f"hiding condition m >= 2(1 + T_c/T_f) = {d['m_hiding']:.2f}\n"
            f"ping-pong step T = (T_a + T_e + 2 T_c) + T_f (m L - 1) = {d['step_pingpong_us']:.0f} us "
            f"at m={pred.micro_batch_num}, L={pred.layers}" + ("" if pred.hidden else " (m below the hiding "
                                                                 "condition: each pass costs the round trip / m)"))


def measure(cfg_source, overrides: list[str], max_m: int = 4) -> list[dict]:
    """Run micro_batch_num = 1..max_m; measured step time = event window / steps (start-up excluded)."""
    from ..launcher.pipeline import run
    from ..timing import diagnose, predict
    rows = []
    for m in range(1, max_m + 1):
        result = run(cfg_source, overrides + [f"micro_batch_num={m}", "trace=true"])
        cfg = result.config
        pred = predict(cfg)
        row = {"m": m, "outcome": result.outcome, "predicted_step_us": round(pred.step_s * 1e6, 1),
               "hidden": pred.hidden}
        if result.outcome == "completed" and result.metrics:
            measured = result.metrics["window_s"] / cfg.steps
            row.update(measured_step_us=round(measured * 1e6, 1),
                       ratio=round(measured / pred.step_s, 3) if pred.step_s else None,
                       bubble_fraction=result.metrics.get("bubble_fraction"),
                       notes=diagnose(pred, result.events, measured) if pred.step_s else
                       ["no device_time section: the model predicts 0"])
        else:
            row.update(measured_step_us=None, ratio=None, notes=[f"run {result.outcome}: {result.reason}"])
        rows.append(row)
    return rows


def table_text(rows: list[dict]) -> str:
    lines = [f"{'m':>2}  {'predicted us/step':>17}  {'measured us/step':>16}  {'ratio':>6}  {'bubble':>6}  notes"]
    for r in rows:
        meas = f"{r['measured_step_us']:.0f}" if r.get("measured_step_us") else "-"
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "-"
        bubble = f"{r['bubble_fraction']:.2f}" if r.get("bubble_fraction") is not None else "-"
        notes = "; ".join(r.get("notes") or []) or "within 15%"
        lines.append(f"{r['m']:>2}  {r['predicted_step_us']:>17.0f}  {meas:>16}  {ratio:>6}  {bubble:>6}  {notes}")
    return "\n".join(lines)


def main(args) -> int:
    from .. import config as config_mod
    from ..timing import predict
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = config_mod.load(args.config, overrides)
    pred = predict(cfg)
    rows = measure(args.config, overrides, args.max_m) if args.measure else None
    if args.json:
        print(json.dumps({"model": pred.as_dict(), "measured": rows}, indent=2))
        return 0
    if cfg.device_time is None:
        print("note: the config has no device_time section: every modelled term is 0")
    print(model_text(pred))
    if rows is not None:
        print()
        print(table_text(rows))
    return 0
