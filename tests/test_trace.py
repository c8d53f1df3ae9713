"""Traces of real pipeline runs: valid Chrome trace JSON, a process per role, flows, protocol order, the PNG."""
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from afd import trace
from afd.launcher.pipeline import Pipeline, run


def _load(path):
    data = json.loads(path.read_text())
    assert isinstance(data["traceEvents"], list)
    for ev in data["traceEvents"]:
        assert ev["ph"] in {"X", "M", "i", "C", "s", "t", "f"}
        assert isinstance(ev["pid"], int) and "name" in ev
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
    return data


def _names(data):
    return {ev["pid"]: ev["args"]["name"] for ev in data["traceEvents"] if ev["ph"] == "M"
            and ev["name"] == "process_name"}


@pytest.mark.timeout(90)
def test_cli_trace_and_plot(tmp_path):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    proc = subprocess.run([sys.executable, "-m", "afd", "run", "--quiet", "--set", "micro_batch_num=3",
                           "--set", "trace=false", "--trace", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr
    assert "bubble fraction" in proc.stdout
    data = _load(out)
    names = _names(data)
    assert set(names.values()) == {"attn0", "sched0", "combine0", "ffn0"}
    slices = [ev for ev in data["traceEvents"] if ev["ph"] == "X"]
    assert {names[ev["pid"]] for ev in slices} == set(names.values())  # slices from every role's process

    # Flows: each chain starts once, ends once, and one micro-batch crosses >= 3 processes.
    flows = defaultdict(list)
    for ev in data["traceEvents"]:
        if ev["ph"] in "stf":
            flows[ev["id"]].append(ev)
    assert flows
    widest = 0
    for chain in flows.values():
        assert [e["ph"] for e in chain][0] == "s" and chain[-1]["ph"] == "f"
        assert [e["ts"] for e in chain] == sorted(e["ts"] for e in chain)
        widest = max(widest, len({names[e["pid"]] for e in chain}))
    assert widest >= 3

    # Protocol order: no combine of a micro-batch pass ends before the last F2A of that pass started.
    layers = 2
    f2a_start = defaultdict(float)
    for ev in slices:
        if ev["name"] == "ffn_to_attention":
            for s, mb, layer, step in ev["args"]["units"]:
                key = (s, mb, step * layers + layer)
                f2a_start[key] = max(f2a_start[key], ev["ts"])
    combines = [ev for ev in slices if ev["name"] == "attention_worker_combine"]
    assert len(combines) == 3 * 4 * layers
    for ev in combines:
        a = ev["args"]
        key = (a["session"], a["micro_batch"], a["step"] * layers + a["layer"])
        assert key in f2a_start
        assert ev["ts"] + ev["dur"] >= f2a_start[key]
    counters = [ev for ev in data["traceEvents"] if ev["ph"] == "C"]
    assert counters and max(c["args"]["in_flight"] for c in counters) <= 3
    assert counters[-1]["args"]["in_flight"] == 0

    # The picture: a real PNG of a sensible size that is not blank.
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 800
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    assert (abs(rgb - rgb[0, 0]).sum(axis=-1) > 0.1).mean() > 0.02  # a fair share of non-background pixels
    del matplotlib


@pytest.mark.timeout(60)
def test_result_events_and_metrics():
    result = run(None, ["steps=2", "micro_batch_num=2"])
    assert result.outcome == "completed"
    roles = {e.role for e in result.events}
    assert roles == {"attn0", "sched0", "combine0", "ffn0"}
    m = result.metrics
    assert set(m["roles"]) == roles
    for frac in m["roles"].values():
        assert abs(frac["busy"] + frac["waiting"] + frac["idle"] - 1) < 0.02 or frac["idle"] == 0
    assert 0 <= m["bubble_fraction"] <= 1
    assert all(m["hops_us"][h]["n"] > 0 for h in ("a2f", "ffn", "f2a", "flag_to_combine"))
    assert m["micro_batches_per_s"] > 0
    assert result.report()["metrics"] == m


@pytest.mark.timeout(60)
def test_trace_written_up_to_a_fault(tmp_path):
    """A role killed mid-run: the others' events still make a trace that ends around the fault."""
    with Pipeline(None, ["steps=400"]) as p:
        import time
        deadline = time.monotonic() + 20
        while p.step_count < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.processes["ffn0"].kill()
        result = p.wait(30)
    assert result.outcome == "failed"
    path = trace.write_result(tmp_path / "fault.json", result)
    data = _load(path)
    assert data["otherData"]["outcome"] == "failed"
    names = _names(data)
    assert {"attn0", "combine0"} <= set(names.values())
    assert any(ev["ph"] == "X" and ev["name"] == "attention_worker_combine" for ev in data["traceEvents"])


def test_trace_does_not_import_the_runtime():
    """afd.trace is read by the runtime's results; importing it must not import the runtime back (no import circle)."""
    code = "import afd.trace, sys; print([m for m in sys.modules if m.startswith(('afd.runtime', 'afd.launcher'))])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
