"""The stage table in-process on a small shape: every stage, the documented bytes, positive figures, and runs whose
outputs are wrong or whose protocol breaks are refused rather than measured."""
import numpy as np
import pytest

from afd.bench import stages

SMALL = {"micro_batch_size": 4, "top_k": 2, "routed_experts": 4, "hidden_size": 256}
# BS=4, K=2 (12 slots), H=256 bf16 (512-byte rows), by hand from the formulas in afd/bench/stages.py.
SMALL_BYTES = {
    "attention": 2 * 4 * 512,
    "gate": 4 * 64 * 2 + 2 * 4 * 2 * 4,
    "attention_to_ffn": 4 * 512 + 12 * 512 + 4 * 2 * 4 + 12 * 4,
    "ffn_worker_scheduler_": 144,
    "ffn_worker_batching": 12 * 4 + 2 * 12 * 512 + 4 * 12 * 4,
    "experts": 12288,
    "ffn_to_attention": 2 * 12 * 512 + 4 * 12 * 4 + 12 * 4,
    "attention_worker_scheduler_": 96,
    "attention_worker_combine": 12 * 512 + 4 * 2 * 4 + 4 * 512,
}


@pytest.mark.timeout(60)
def test_small_shape_every_stage_checked():
    result = stages.measure_stages(repeats=5, **SMALL)
    assert [row["name"] for row in result["rows"]] == list(SMALL_BYTES)
    for row in result["rows"]:
        assert row["bytes"] == SMALL_BYTES[row["name"]], row["name"]
        assert row["ms"] > 0 and row["best_ms"] <= row["ms"] and row["gb_per_s"] > 0
        assert 0 < row["copy_gb_per_s"] and 0 < row["fraction_of_copy"]
    assert result["total"]["bytes"] == sum(SMALL_BYTES.values())
    assert result["timed"] == 5 and result["checked"] == 2
    assert result["shape"]["micro_batch_size"] == 4 and result["shape"]["hidden_size"] == 256


@pytest.mark.timeout(60)
def test_a_wrong_combine_output_is_refused(monkeypatch):
    real = stages.attention_worker_combine

    def off_by_one_value(*args, **kwargs):
        y, next_layer = real(*args, **kwargs)
        y = y.copy()
        y.reshape(-1).view(np.uint16)[7] ^= 1  # one bf16 value off by one unit in the last place
        return y, next_layer

    monkeypatch.setattr(stages, "attention_worker_combine", off_by_one_value)
    with pytest.raises(RuntimeError, match="differs from the reference layer in 1 of"):
        stages.measure_stages(repeats=2, **SMALL)


@pytest.mark.timeout(60)
def test_a_lost_row_stops_the_run(monkeypatch):
    """F2A that drops its last row leaves a flag at 0: the attention scheduler would wait, which here is an error."""
    real = stages.ffn_to_attention

    def drop_last(x, *args, **kwargs):
        *ids, actual, group, world_size, info_shape, data_shape = args
        return real(x, *ids, np.array([int(actual[0]) - 1], np.int64), group, world_size, info_shape, data_shape,
                    **kwargs)

    monkeypatch.setattr(stages, "ffn_to_attention", drop_last)
    with pytest.raises(RuntimeError, match="attention_worker_scheduler_ had to wait"):
        stages.measure_stages(repeats=2, **SMALL)


def test_bench_shape_bytes():
    """The bench shape's total: what `afd bench` reports in its stages table."""
    from afd.bench import bench_config
    from afd.config import load

    assert sum(stages.stage_bytes(load(bench_config(1))).values()) == 52_337_664
