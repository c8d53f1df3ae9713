"""Fault campaigns: many runs, each with one random fault at a random point, checked against the documented outcome."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import config as config_mod
from . import control
from .device import list_segments
from .faults import KINDS, random_fault
from .launcher.pipeline import Pipeline


@dataclass
class CampaignRun:
    """One run of a campaign and what was checked about it."""

    fault: str
    kind: str
    outcome: str
    exit_code: int
    as_documented: bool
    detect_s: float | None
    leftover_processes: int
    leftover_segments: int
    wrong_before_fault: int
    reason: str


def _documented(fault, result) -> bool:
    outcome, code, kind = fault.documented()
    if result.outcome != outcome or result.exit_code != code:
        return False
    if kind is not None and (result.failure or {}).get("kind") != kind:
        return False
    if fault.kind in ("kill", "hang") and (result.failure or {}).get("role") != fault.target:
        return False
    return True


class CampaignRuns(list):
    """The runs of a campaign; `interrupted` names the signal that cut it short (the run it cut is not among them)."""

    interrupted: str | None = None


def run_one(config, fault) -> CampaignRun | None:
    """One run with one fault; None when SIGTERM / SIGHUP stopped it (its outcome says nothing about the fault)."""
    pipeline = Pipeline(config, faults=[fault])
    with pipeline:
        result = pipeline.wait(timeout=120)
    if pipeline.signalled:
        return None
    pids = list(pipeline.pids.values())
    alive = 0
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive += 1
        except ProcessLookupError:
            pass
    namespace = pipeline.device.namespace if pipeline.device else ""
    segments = len(list_segments(namespace)) + int((control.runs_root() / namespace).exists())
    wrong_before = sum(1 for m in result.mismatches if fault.step is not None and m["step"] < fault.step)
    detect = next((f.get("detect_s") for f in result.faults if "detect_s" in f), None)
    return CampaignRun(fault.spec, fault.kind, result.outcome, result.exit_code, _documented(fault, result), detect,
                       alive, segments, wrong_before, result.reason)


def campaign(config=None, runs: int = 20, seed: int = 0, overrides: list[str] | None = None,
             on_run=None) -> CampaignRuns:
    """`runs` runs with a random fault each. A SIGTERM or SIGHUP (between runs or during one) ends the campaign
    after cleaning up the run in progress: the runs so far are returned, `interrupted` set."""
    cfg = config_mod.load(config, overrides)
    rng = random.Random(seed)
    out = CampaignRuns()
    caught: list[int] = []
    old = _catch(caught)
    try:
        for i in range(runs):
            if caught:
                break
            fault = random_fault(rng, cfg)
            t0 = time.monotonic()
            run = run_one(cfg, fault)
            if run is None:
                caught.append(signal.SIGTERM if not caught else caught[0])
                break
            out.append(run)
            if on_run:
                on_run(i, run, time.monotonic() - t0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if not caught else signal.SIG_IGN)  # asked to end: the table still prints
    if caught:
        out.interrupted = signal.Signals(caught[0]).name
    return out


def _catch(caught: list) -> dict:
    """Between runs a stop signal is noted (each run's Pipeline takes the signals while it runs)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
            for sig in (signal.SIGTERM, signal.SIGHUP)}


def summarize(runs: list[CampaignRun]) -> list[dict]:
    """One row per fault kind: runs, as documented, detection p50/p99, leftovers, wrong outputs before the fault."""
    rows = []
    for kind in KINDS:
        mine = [r for r in runs if r.kind == kind]
        if not mine:
            continue
        detects = [r.detect_s for r in mine if r.detect_s is not None]
        rows.append({"kind": kind, "runs": len(mine), "as_documented": sum(r.as_documented for r in mine),
                     "detect_p50_s": float(np.percentile(detects, 50)) if detects else None,
                     "detect_p99_s": float(np.percentile(detects, 99)) if detects else None,
                     "leftover_processes": sum(r.leftover_processes for r in mine),
                     "leftover_segments": sum(r.leftover_segments for r in mine),
                     "wrong_before_fault": sum(r.wrong_before_fault for r in mine)})
    return rows
