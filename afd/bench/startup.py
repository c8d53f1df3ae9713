"""Start-up time of the quick `afd` commands and of `afd npu` on a torch start, beside Python's and torch's own."""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_CLI_S = 0.3  # issue 20: a quick command starts (and ends) in at most 0.3 s
TARGET_NPU_OVERHEAD_S = 0.3  # issue 20: `afd npu` (install() and the wrapper) adds at most 0.3 s to a torch start
QUICK_COMMANDS = ("afd --help", "afd stop", "afd context decode", "afd check")


def afd_command() -> list[str]:
    """The `afd` console script beside this Python (what a user runs; a pyenv shim on PATH would add its own
    start-up), else `python -m afd`."""
    script = os.path.join(os.path.dirname(sys.executable), "afd")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "afd"]


def _has_torch() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def commands(work: str) -> dict[str, tuple[list[str], str | None]]:
    """name -> (argv, the baseline it stands beside). `afd stop` finds nothing (an empty run directory), the context
    dump is 1024 zero bytes, `afd check` checks the built-in default config."""
    py, afd = sys.executable, afd_command()
    dump = os.path.join(work, "context.bin")
    with open(dump, "wb") as f:
        f.write(bytes(1024))
    out = {"python -c pass": ([py, "-c", "pass"], None),
           "afd --help": (afd + ["--help"], "python -c pass"),
           "afd stop": (afd + ["stop"], "python -c pass"),
           "afd context decode": (afd + ["context", "decode", dump], "python -c pass"),
           "afd check": (afd + ["check"], "python -c pass")}
    if _has_torch():
        out["import torch"] = ([py, "-c", "import torch"], None)
        out["import torch; afd.npu.install()"] = ([py, "-c", "import torch, afd.npu; afd.npu.install()"],
                                                  "import torch")
        out["afd npu -- python -c 'import torch, torch_npu'"] = (
            afd + ["npu", "--", py, "-c", "import torch, torch_npu"], "import torch")
    return out


def _run(argv: list[str], env: dict) -> tuple[float, float, int]:
    """(wall s, CPU s of the process and every child it waited for, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), code


def measure(quick: bool = False, runs: int | None = None, progress=None) -> dict:
    """Median wall and CPU time of each command over `runs` rounds; a round runs every command once, so load that
    comes and goes weighs on all of them alike. Targets are judged on the median wall time."""
    runs = runs or (1 if quick else 7)
    work = tempfile.mkdtemp(prefix="afd-bench-startup-")
    env = {k: v for k, v in os.environ.items() if k != "AFD_NPU"}  # a plain torch start, not one under `afd npu`
    env["AFD_RUN_DIR"] = os.path.join(work, "runs")  # `afd stop` finds no pipeline and no torch job
    load_before = os.getloadavg()[0]
    try:
        cmds = commands(work)
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in cmds}
        for i in range(runs):
            if progress:
                progress(f"start-up times, round {i + 1} of {runs}")
            for name, (argv, _) in cmds.items():
                samples[name].append(_run(argv, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for name, (argv, baseline) in cmds.items():
        walls = [s[0] for s in samples[name]]
        rows[name] = {"wall_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                      "cpu_s": statistics.median(s[1] for s in samples[name]), "exit_codes": sorted(
                          {s[2] for s in samples[name]}), "baseline": baseline}
    for row in rows.values():
        if row["baseline"]:
            row["over_baseline_s"] = row["wall_s"] - rows[row["baseline"]]["wall_s"]
    for name in QUICK_COMMANDS:
        rows[name]["target"] = f"<= {TARGET_CLI_S:g} s"
        rows[name]["pass"] = rows[name]["wall_s"] <= TARGET_CLI_S
    npu = rows.get("afd npu -- python -c 'import torch, torch_npu'")
    if npu:
        npu["target"] = f"<= {TARGET_NPU_OVERHEAD_S:g} s over import torch"
        npu["pass"] = npu["over_baseline_s"] <= TARGET_NPU_OVERHEAD_S
    return {"runs": runs, "afd": " ".join(afd_command()), "python": sys.executable, "torch": _has_torch(),
            "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], "rows": rows,
            "npu_overhead_s": npu["over_baseline_s"] if npu else None}
