"""afd.bench.stop, quick: real `afd run`s stopped by SIGTERM and by `afd stop`, each figure a positive time, every run
clean at its end (report written, segments, run directory and processes gone); targets printed, not asserted."""
import pytest

from afd.bench import stop


@pytest.mark.timeout(180)
def test_quick_stop_bench_measures_clean_stops():
    r = stop.measure(quick=True)
    assert list(r["configs"]) == ["minimal"] and r["runs"] == 1
    for row in (r["configs"]["minimal"], r["afd_stop"]):
        assert 0 < row["median_s"] <= row["max_s"] < 30
        assert row["not_clean"] == 0
        assert isinstance(row["pass"], bool)
    assert r["target_s"] == 0.5 and r["afd_stop"]["target_s"] == 1.0
