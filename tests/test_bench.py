"""`afd bench --quick --json`: one JSON object with every figure, of the right types and positive (targets not checked)."""
import json
import subprocess
import sys

import pytest

NUMBERS = ("micro_batch_layers_per_s", "ratio_vs_queue", "fraction_of_copy_bound", "hop_latency_us_p50",
           "hop_latency_us_p99", "hop_latency_us_p50_spin", "hop_latency_us_p99_spin",
           "queue_micro_batch_layers_per_s", "copy_bound_micro_batch_layers_per_s",
           "two_host_micro_batch_layers_per_s", "two_host_vs_one_host", "two_host_hop_latency_us_p50",
           "torch_combine_vs_numpy")


@pytest.mark.timeout(200)
def test_bench_quick_json_has_every_figure():
    proc = subprocess.run([sys.executable, "-m", "afd", "bench", "--quick", "--json"], capture_output=True, text=True,
                          timeout=190)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in NUMBERS:
        assert isinstance(result[key], (int, float)) and not isinstance(result[key], bool), key
        assert result[key] > 0, key
    assert result["hop_latency_us_p99"] >= result["hop_latency_us_p50"]
    assert result["outputs_match_reference"] is True  # the pipeline computed the right numbers
    assert result["queue_outputs_match_reference"] is True  # and the baseline did the same work
    assert result["two_host_outputs_match_reference"] is True  # across hosts through the window transport too
    for name in ("ratio_vs_queue", "fraction_of_copy_bound", "hop_latency_us_p50", "hop_latency_us_p50_spin"):
        assert isinstance(result["targets"][name]["pass"], bool)
    ops = result["ops"]
    assert ops["scan"]["per_iteration_us"] > 0 and ops["combine"]["combine_ms"] > 0
    assert result["npu"]["combine"]["same_output"] is True  # the torch front-end gave the operator's bits
    assert result["npu_round_trips_per_s"] is None  # the torchrun round trip is in the full bench only
    assert isinstance(result["targets"]["torch_combine_vs_numpy"]["pass"], bool)
