"""What a run produced: outcome, reason, counts, timings, hop latencies, reference check, per-role exits."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import Config
from ..runtime.memory import STATUS
from .reference import REFERENCE_BUDGET_S
from .reference import reference as reference_in_process

# Exit codes of `afd run` by what ended the run.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOST, EXIT_PROTOCOL = 0, 1, 2, 3, 4
_LOST_KINDS = {"died", "hang", "controller", "join"}


def percentiles(samples_ns: list[int]) -> dict[str, float] | None:
    if not samples_ns:
        return None
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"n": int(us.size), "p50": round(float(np.percentile(us, 50)), 2),
            "p99": round(float(np.percentile(us, 99)), 2), "max": round(float(us.max()), 2)}


@dataclass
class Result:
    """The end of one run, as typed attributes; `report()` is the JSON report."""

    outcome: str
    reason: str
    faults: list
    exit_code: int
    config: Config
    steps: int
    micro_batches: int
    micro_batch_layers: int
    run_s: float
    wall_s: float
    hops_us: dict
    outputs_match_reference: bool | None
    compared: int
    mismatches: list
    roles: dict
    failure: dict | None
    in_flight: dict | None
    malformed_messages: int
    refused_messages: int = 0
    log: list = field(default_factory=list, repr=False)
    outputs: dict = field(default_factory=dict, repr=False)
    reference: dict = field(default_factory=dict, repr=False)
    events: list = field(default_factory=list, repr=False)  # afd.trace.Event, every role's (when cfg.trace)
    metrics: dict = field(default_factory=dict)  # afd.metrics.compute: busy/wait/idle, bubble, hops, rates
    rss: dict = field(default_factory=dict)  # process -> afd.runtime.rss.usage() at its end (processes that reported)

    @property
    def micro_batches_per_s(self) -> float:
        return self.micro_batches / self.run_s if self.run_s > 0 else 0.0

    @property
    def micro_batch_layers_per_s(self) -> float:
        return self.micro_batch_layers / self.run_s if self.run_s > 0 else 0.0

    @property
    def rss_mb(self) -> dict[str, float]:
        """Peak resident set size of each process of the run (roles, controller, agents), MB."""
        return {role: usage["peak_mb"] for role, usage in self.rss.items() if "peak_mb" in usage}

    def report(self) -> dict:
        return {
            "config": self.config.model_dump(mode="json"),
            "outcome": self.outcome, "reason": self.reason, "exit_code": self.exit_code,
            "counts": {"steps": self.steps, "micro_batches": self.micro_batches,
                       "micro_batch_layers": self.micro_batch_layers},
            "timings": {"run_s": round(self.run_s, 4), "wall_s": round(self.wall_s, 4),
                        "micro_batches_per_s": round(self.micro_batches_per_s, 2),
                        "micro_batch_layers_per_s": round(self.micro_batch_layers_per_s, 2),
                        "hops_us": self.hops_us},
            "outputs_match_reference": self.outputs_match_reference,
            "compared_micro_batches": self.compared, "mismatches": self.mismatches,
            "failure": self.failure, "in_flight": self.in_flight, "faults": self.faults,
            "malformed_messages": self.malformed_messages, "refused_messages": self.refused_messages,
            "roles": self.roles, "metrics": self.metrics, "rss": self.rss,
        }


def _fault_report(mem, faults, failure, detect_ns: int) -> list[dict]:
    """Each planned fault, whether it fired, and how long until the run noticed."""
    status = mem.status()
    fired_ns = {role: int(status[i][STATUS["fault_ns"]]) for role, i in mem.role_index.items()}
    out = []
    for f in faults:
        ns = fired_ns.get(f.target, 0)
        entry = {"spec": f.spec, "kind": f.kind, "target": f.target, "fired": bool(ns)}
        if ns and detect_ns and detect_ns >= ns:
            entry["detect_s"] = round((detect_ns - ns) / 1e9, 4)
        out.append(entry)
    return out


def build_result(cfg: Config, mem, controller: dict | None, died_first, exit_codes: dict, wall_s: float,
                 faults: list = (), reference=reference_in_process) -> Result:
    """The Result from the controller's result, the run's memory and the exit codes; `reference` computes the
    reference digests (afd.launcher.reference: the launcher passes forked_reference)."""
    controller = controller or {}
    reports = controller.get("reports", {})
    failure = controller.get("failure")
    outcome = controller.get("outcome")
    reason = controller.get("reason", "")
    in_flight = controller.get("in_flight")
    detect_ns = int(controller.get("detect_ns") or 0)
    # The launcher saw a process die first: its view (exit code, what it had in flight) wins unless the controller
    # knows better (a role that reported an error and then exited 1 failed, it did not die).
    if died_first is not None and (outcome is None or (failure and failure.get("kind") == "died"
                                                        and failure.get("role") == died_first[0])):
        role, code, detect_ns, flight = died_first
        kind = "controller" if role == "controller" else "died"
        outcome, failure = "failed", {"role": role, "kind": kind, "exitcode": code, "in_flight": flight}
        reason = f"{role} exited unexpectedly (exit code {code})" + (
            "; the run was stopped through run_flag=0" if role != "controller" else "")
    if outcome is None:
        outcome, reason = "failed", reason or "the controller reported no result"
        failure = failure or {"role": "controller", "kind": "controller"}

    digests = mem.digests()
    tags = (digests >> np.uint64(32)).astype(np.int64)  # step + 1, 0 = never written
    written = tags > 0
    steps_done = mem.steps_done()
    L, M = cfg.layers, cfg.micro_batch_num
    micro_batches = sum((u // (L * M)) * M + max(0, u % (L * M) - (L - 1) * M) for u in mem.units_done())
    layers_done = int(controller.get("done", 0))
    match, compared, mismatches = None, int(written.sum()), []
    outputs, ref_finals = {}, {}
    finals = steps_done >= cfg.steps
    log = list(controller.get("log", []))
    if cfg.check_reference:
        # The reference only for the units the ring holds, newest first: a stopped or failed run is checked within a
        # time budget (its newest units), a completed one in full.
        cells = np.argwhere(written)[np.argsort(-tags[written], kind="stable")]  # (ring row, session, mb)
        units = np.column_stack([tags[tuple(cells.T)] - 1, cells[:, 1:]])  # (step, session, mb), newest first
        try:
            ref = reference(cfg.model_dump_json(), units, None if outcome == "completed" else REFERENCE_BUDGET_S,
                            finals)
        except Exception as exc:  # noqa: BLE001 - the run's report matters more than its reference check
            log.append(f"reference check failed: {exc}")
            ref = None
        if ref is not None:
            ref_finals = ref["finals"]
            want = np.asarray(ref["digests"], np.uint64)
            compared = len(want)  # what is really checked, after the time budget
            got = digests[tuple(cells[:compared].T)] & np.uint64(0xFFFFFFFF)
            mismatches = [{"step": int(t), "session": int(s), "micro_batch": int(m)}
                          for t, s, m in units[:compared][got != want]]
            mismatches.sort(key=lambda d: (d["step"], d["session"], d["micro_batch"]))
            match = not mismatches
    if finals:
        out = mem.outputs()
        for s in range(cfg.sessions):
            for m in range(cfg.micro_batch_num):
                outputs[(s, m)] = out[s, m, :cfg.valid_tokens].copy()

    hops: dict[str, list] = {}
    for role, rep in reports.items():
        for name, samples in (rep.get("metrics") or {}).items():
            hops.setdefault(name, []).extend(samples)
    hops_us = {name: percentiles(samples) for name, samples in sorted(hops.items())}
    from .. import metrics as metrics_mod
    from .. import trace as trace_mod
    events = trace_mod.collect(reports)
    run_metrics = metrics_mod.compute(events, cfg)

    rss = {role: rep["rss"] for role, rep in reports.items() if rep.get("rss")}
    if controller.get("rss"):
        rss["controller"] = controller["rss"]
    order = list(exit_codes)  # the processes' order (a role that joined from outside the launcher goes last)
    rss = dict(sorted(rss.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))

    roles = {}
    for role, code in exit_codes.items():
        rep = reports.get(role, {})
        roles[role] = {"exit_code": code, "outcome": rep.get("outcome", "completed" if role == "controller" and
                                                             code == 0 else ("killed" if code and code < 0 else
                                                                             "no report")),
                       **({"error": rep["error"]} if rep.get("error") else {})}

    if outcome in ("completed", "stopped"):
        exit_code = EXIT_OK
    elif failure and failure.get("kind") in _LOST_KINDS:
        exit_code = EXIT_LOST
    elif failure and failure.get("kind") == "error":
        exit_code = EXIT_PROTOCOL if failure.get("error", {}).get("type") in (
            "Stall", "KernelError", "DeviceAddressError", "AclnnError") else EXIT_FAILED
    else:
        exit_code = EXIT_FAILED
    if match is False:
        outcome = "failed" if outcome == "completed" else outcome
        reason = reason + ("; " if reason else "") + f"{len(mismatches)} micro-batch outputs differ from the reference"
        exit_code = EXIT_PROTOCOL if exit_code == EXIT_OK else exit_code
    fault_report = _fault_report(mem, faults, failure, detect_ns)
    fired_steps = [f.step for f in faults if f.step is not None]
    if mismatches and faults and fired_steps and failure is None:
        failure = {"role": faults[0].target, "kind": "wrong-output",
                   "detail": "outputs differ from the reference (a flag was seen before its data)"}
    return Result(outcome=outcome, reason=reason, faults=fault_report, exit_code=exit_code, config=cfg, steps=steps_done,
                  micro_batches=micro_batches, micro_batch_layers=layers_done,
                  run_s=float(controller.get("run_s") or wall_s), wall_s=wall_s, hops_us=hops_us,
                  outputs_match_reference=match, compared=compared, mismatches=mismatches[:50], roles=roles,
                  failure=failure, in_flight=in_flight, malformed_messages=int(controller.get("malformed", 0)),
                  refused_messages=int(controller.get("unknown_senders", 0)), log=log,
                  outputs=outputs, reference=ref_finals, events=events, metrics=run_metrics, rss=rss)
