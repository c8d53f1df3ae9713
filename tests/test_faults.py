"""Every fault kind ends as documented on a minimal, a multi-session and the Ascend 950 config, and leaves nothing behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afd import control, device
from afd.campaign import run_one
from afd.config import load
from afd.faults import DOCUMENTED, parse
from afd.launcher.pipeline import Pipeline

MINIMAL = {"name": "t-minimal", "steps": 3}
MULTI = {"name": "t-multi", "sessions": 2, "ffn_ranks": 2, "micro_batch_num": 3, "steps": 3}
# Ascend 950 (configs/ascend950.yaml's path: V2 operators, the FFN ranks' snapshot receive), shorter
ASCEND950 = {**load(Path(__file__).resolve().parents[1] / "configs" / "ascend950.yaml").model_dump(exclude_none=True),
             "name": "t-ascend950", "steps": 3}


def assert_nothing_left(pipeline):
    for role, pid in pipeline.pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert device.list_segments(pipeline.device.namespace) == []
    assert not (control.runs_root() / pipeline.device.namespace).exists()


def run_fault(cfg, spec):
    pipeline = Pipeline(cfg, faults=[spec])
    with pipeline:
        result = pipeline.wait(timeout=60)
    assert_nothing_left(pipeline)
    return result


CASES = [
    ("stop:combine0@step=1,layer=1", "stopped", 0, None),
    ("stop@t=0.3", "stopped", 0, None),
    ("kill:ffn0@step=1", "failed", 3, "died"),
    ("kill:attn0@step=1,mb=1", "failed", 3, "died"),
    ("kill:controller@step=1", "failed", 3, "controller"),
    ("hang:sched0@step=1", "failed", 3, "hang"),
    ("drop-flag:ffn0@step=1,layer=1", "failed", 4, "error"),
    ("corrupt:sched0@step=1,field=micro_batch_id", "failed", 4, "error"),
    ("corrupt:ffn0@step=1,field=polling_index", "failed", 4, "error"),
    ("corrupt:combine0@step=1,field=token_info_buf", "failed", 4, "error"),
    ("reorder:ffn0@step=1", "failed", 4, "wrong-output"),
    ("delay:ffn0@step=0,ms=3", "completed", 0, None),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cfg", [MINIMAL, MULTI, ASCEND950], ids=["minimal", "multi", "ascend950"])
@pytest.mark.parametrize("spec,outcome,code,kind", CASES, ids=[c[0] for c in CASES])
def test_fault_ends_as_documented(cfg, spec, outcome, code, kind):
    if cfg is MULTI and spec.startswith(("stop@t", "delay", "corrupt:combine0")):
        pytest.skip("covered on the minimal config")  # keeps the suite short; same code path
    if "@t=" in spec:
        cfg = dict(cfg, steps=100000)  # a time-based fault needs a run that lasts
    result = run_fault(cfg, spec)
    fault = parse(spec, load(cfg).role_ids())
    assert (result.outcome, result.exit_code) == (outcome, code), result.reason
    assert (result.outcome, result.exit_code) == fault.documented()[:2]
    assert result.faults[0]["fired"]
    if kind is not None and cfg is ASCEND950 and spec.startswith("reorder"):
        # On 950 an FFN rank serves both sessions from one snapshot: while it holds one session's data back (up to
        # 2 s, until that session's combine has read the flags without it), the other session's scheduler may
        # wait on this rank past its 2 s stall bound. Both ends are the reorder's doing and documented (failed, 4):
        # the wrong output it shows 9 runs in 10, or the stall it causes, naming the slots ffn0 owes.
        assert result.failure["kind"] in (kind, "error")
        if result.failure["kind"] == "error":
            assert "owed by ffn0" in result.reason, result.reason
    elif kind is not None:
        assert result.failure["kind"] == kind
    if spec.startswith(("kill:ffn0", "kill:attn0", "hang")):
        assert result.failure["role"] == fault.target  # the report names the role ...
        assert result.failure.get("in_flight") or result.in_flight  # ... and what it had in flight
    if spec.startswith("drop-flag"):
        missing = result.failure["error"]["missing"]
        assert missing and {"micro_batch", "token", "expert_slot", "expert_id", "ffn_rank"} <= set(missing[0])
    if spec.startswith("corrupt"):
        err = result.failure["error"]
        assert err["type"] in ("KernelError", "DeviceAddressError") and err["field"] and err["rule"]
    if spec.startswith("reorder"):
        if result.failure["kind"] == "wrong-output":  # (the 950 stall case may end before a late row is read)
            assert result.outputs_match_reference is False
        assert all(m["step"] >= fault.step for m in result.mismatches)
    else:  # micro-batches completed before (or despite) the fault still equal the reference
        assert result.outputs_match_reference is True
    if kind in ("died", "controller"):
        assert result.faults[0]["detect_s"] < 1.0
    if kind == "hang":
        assert result.faults[0]["detect_s"] < 2.0
    if outcome == "stopped":
        assert result.in_flight and all(k in result.in_flight["combine0"] for k in ("step", "layer", "micro_batch"))


@pytest.mark.timeout(60)
def test_stop_ends_every_process_within_2s_and_scheduler_keeps_flags():
    with Pipeline({"name": "t-stop", "steps": 100000}) as pipeline:
        # Mid-run: every role has joined (a role still loading its kernels cannot hear a stop yet).
        deadline = time.monotonic() + 30
        while pipeline.step_count < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        pipeline.stop("test")
        result = pipeline.wait(timeout=10)
        assert time.monotonic() - t0 < 2.0 + 0.5
    assert result.outcome == "stopped" and result.exit_code == 0
    assert all(r["exit_code"] == 0 for r in result.roles.values())
    assert_nothing_left(pipeline)


@pytest.mark.timeout(60)
def test_launcher_sigkill_leaves_no_role_and_no_segment(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))  # where this test looks for the run
    proc = subprocess.Popen([sys.executable, "-m", "afd", "run", "--quiet", "--steps", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TMPDIR=str(tmp)))
    deadline = time.monotonic() + 30
    info = None
    while time.monotonic() < deadline and info is None:
        info = next((r for r in control.live_runs() if r["pid"] == proc.pid), None)
        time.sleep(0.1)
    assert info, "the run never appeared"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    pids = list(info["roles"].values())
    while time.monotonic() - t0 < 5:
        alive = [p for p in pids if _alive(p)]
        if not alive and not device.list_segments(info["namespace"]):
            break
        time.sleep(0.05)
    assert [p for p in pids if _alive(p)] == []
    assert device.list_segments(info["namespace"]) == []
    # nor the launcher's multiprocess temp directory with the fork server's socket (its normal exit removes it)
    while time.monotonic() - t0 < 5 and list(tmp.glob("pymp-*")):
        time.sleep(0.05)
    assert list(tmp.glob("pymp-*")) == []
    assert time.monotonic() - t0 < 5


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["stop:controller@step=1,layer=0", "kill:controller@step=1,layer=0"])
def test_a_controller_fault_fires_even_when_the_run_ends_before_the_controller_looks(spec):
    """A 3-step run takes ~50 ms, and the controller samples progress every ~20 ms: the run can pass the fault's
    point and end between two looks. The fault still fires (the campaign once found such a run "completed")."""
    cfg = load({"name": "t-controller-fault", "steps": 3})
    runs = [run_one(cfg, parse(spec, cfg.role_ids())) for _ in range(4)]
    assert all(r.as_documented for r in runs), [(r.outcome, r.exit_code, r.reason) for r in runs]
    assert sum(r.leftover_processes + r.leftover_segments for r in runs) == 0


@pytest.mark.timeout(600)
def test_campaign_of_20_runs_ends_as_documented():
    cfg = load({"name": "t-campaign", "steps": 3})
    import random

    from afd.faults import random_fault
    rng = random.Random(7)
    runs = [run_one(cfg, random_fault(rng, cfg)) for _ in range(20)]
    bad = [r for r in runs if not r.as_documented]
    assert not bad, [(r.fault, r.outcome, r.exit_code, r.reason) for r in bad]
    assert sum(r.leftover_processes + r.leftover_segments + r.wrong_before_fault for r in runs) == 0


def test_documented_table_covers_every_kind():
    from afd.faults import KINDS
    assert set(KINDS) <= set(DOCUMENTED)
