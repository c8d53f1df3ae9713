"""`afd bench --quick --json`: one JSON object with every figure, of the right types and positive (targets not checked),
and the stage table with every stage and the documented byte counts."""
import json
import subprocess
import sys

import pytest

NUMBERS = ("micro_batch_layers_per_s", "ratio_vs_queue", "fraction_of_copy_bound", "hop_latency_us_p50",
           "hop_latency_us_p99", "hop_latency_us_p50_spin", "hop_latency_us_p99_spin",
           "queue_micro_batch_layers_per_s", "copy_bound_micro_batch_layers_per_s",
           "two_host_micro_batch_layers_per_s", "two_host_vs_one_host", "two_host_hop_latency_us_p50",
           "torch_combine_vs_numpy", "pipeline_fused_micro_batch_layers_per_s", "pipeline_fused_vs_stage_ideal")
# Bytes read + written per micro-batch layer at BS=48, K=8 (9 slots a token, 432 slots), H=7168 bf16 (14,336-byte
# rows), as documented in afd/bench/stages.py, worked out by hand.
STAGE_BYTES = {
    "attention": 2 * 48 * 14336,  # h in, a out
    "gate": 48 * 64 * 2 + 2 * 48 * 8 * 4,  # 64 features in; ids and scales out
    "attention_to_ffn": 48 * 14336 + 432 * 14336 + 48 * 8 * 4 + 432 * 4,  # tokens once, slots out, ids
    "ffn_worker_scheduler_": 3 * 432 * 4,  # record ids in, out buffer, sentinel
    "ffn_worker_batching": 432 * 4 + 2 * 432 * 14336 + 4 * 432 * 4,  # ids in, rows gathered, 4 id outputs
    "experts": 2 * 432 * 14336,
    "ffn_to_attention": 2 * 432 * 14336 + 4 * 432 * 4 + 432 * 4,  # rows, 4 id inputs, flags
    "attention_worker_scheduler_": 2 * 432 * 4,
    "attention_worker_combine": 432 * 14336 + 48 * 8 * 4 + 48 * 14336,  # slots and scales in, y out
}


@pytest.mark.timeout(200)
def test_bench_quick_json_has_every_figure():
    proc = subprocess.run([sys.executable, "-m", "afd", "bench", "--quick", "--json"], capture_output=True, text=True,
                          timeout=190, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in NUMBERS:
        assert isinstance(result[key], (int, float)) and not isinstance(result[key], bool), key
        assert result[key] > 0, key
    assert result["hop_latency_us_p99"] >= result["hop_latency_us_p50"]
    assert result["outputs_match_reference"] is True  # the pipeline computed the right numbers
    assert result["queue_outputs_match_reference"] is True  # and the baseline did the same work
    assert result["two_host_outputs_match_reference"] is True  # across hosts through the window transport too
    assert result["pipeline_fused_outputs_match_reference"] is True  # and with the scheduler fused into the combine
    assert {"attn0", "sched0", "combine0", "ffn0"} <= set(result["pipeline_breakdown"]["roles"])  # every role's time
    for name in ("ratio_vs_queue", "fraction_of_copy_bound", "hop_latency_us_p50", "hop_latency_us_p50_spin"):
        assert isinstance(result["targets"][name]["pass"], bool)
    ops = result["ops"]
    assert ops["scan"]["per_iteration_us"] > 0 and ops["combine"]["combine_ms"] > 0
    assert result["npu"]["combine"]["same_output"] is True  # the torch front-end gave the operator's bits
    assert result["npu_round_trips_per_s"] is None  # the torchrun round trip is in the full bench only
    assert isinstance(result["targets"]["torch_combine_vs_numpy"]["pass"], bool)

    stages = result["stages"]
    assert [row["name"] for row in stages] == list(STAGE_BYTES)  # every stage, in data-path order
    for row in stages:
        assert row["bytes"] == STAGE_BYTES[row["name"]], row["name"]
        for key in ("ms", "gb_per_s", "copy_gb_per_s", "fraction_of_copy"):
            assert isinstance(row[key], float) and row[key] > 0, (row["name"], key)
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        assert row["fraction_of_copy"] == pytest.approx(row["copy_ms"] / row["ms"])
    total = result["stages_total"]
    assert total["bytes"] == sum(STAGE_BYTES.values()) == 52_337_664
    assert total["ms"] >= max(row["ms"] for row in stages)
    assert result["details"]["stages"]["checked"] == 2  # two micro-batch layers matched the reference layer
    rt = result["round_trip"]  # the window round trip with the V1 (A3) and the V2 (950) operators, same shape
    assert rt["v1_ms"] > 0 and rt["v2_ms"] > 0 and rt["v2_vs_v1"] == pytest.approx(rt["v2_ms"] / rt["v1_ms"])
    assert rt["v2_checked"] == 2
