"""AFD_NPU_TRACE: one Chrome trace of a torch job: a track per rank and stream, a slice per operator call, flows
from every window write to the operator on the peer that consumed it."""
import json
from collections import Counter
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent.parent / "examples" / "npu"


@pytest.mark.timeout(180)
def test_the_ping_pong_job_gives_one_trace_with_streams_and_flows(afd_torchrun, tmp_path):
    out = tmp_path / "job.json"
    result = afd_torchrun(EXAMPLES / "ping_pong.py", "--layers", "2", "--micro-batches", "2",
                          env={"AFD_NPU_TRACE": str(out)})
    assert result.returncode == 0, result.output[-3000:]
    assert f"afd npu: trace written to {out}" in result.output
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "rank0"), (1, "rank1")}
    threads = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert (0, "default stream") in threads
    assert len([t for t in threads if t[0] == 1 and t[1].startswith("stream ")]) == 2  # send and receive streams
    slices = Counter((e["pid"], e["name"]) for e in events if e["ph"] == "X")
    units = 2 * 2  # layers x micro-batches
    assert slices[(1, "npu_attention_to_ffn")] == units and slices[(1, "npu_attention_worker_combine")] == units
    assert slices[(0, "npu_ffn_worker_batching")] == units and slices[(0, "npu_ffn_to_attention")] == units
    combine_tids = {e["tid"] for e in events if e["ph"] == "X" and e["name"] == "npu_attention_worker_combine"}
    a2f_tids = {e["tid"] for e in events if e["ph"] == "X" and e["name"] == "npu_attention_to_ffn"}
    assert len(combine_tids) == len(a2f_tids) == 1 and combine_tids != a2f_tids
    starts = [e for e in events if e["ph"] == "s"]
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    flows = Counter((e["cat"], e["pid"], ends[e["id"]]["pid"]) for e in starts)
    assert flows == {("a2f", 1, 0): units, ("f2a", 0, 1): units}
    for s in starts:  # each arrow goes forward in time, from a write to its consumer
        assert ends[s["id"]]["ts"] >= s["ts"]
    assert not list(tmp_path.glob("afd-npu-trace-*"))
