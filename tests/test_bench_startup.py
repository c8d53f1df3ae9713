"""afd.bench.startup: one round of the start-up figures has every command, its fields and its target (no speed is
asserted: load skews every figure; `afd bench` prints them)."""
import pytest

from afd.bench import startup
from afd.cli.bench import startup_table


@pytest.mark.timeout(300)
def test_one_round_measures_every_command_beside_its_baseline():
    r = startup.measure(runs=1)
    rows = r["rows"]
    expected = ["python -c pass", *startup.QUICK_COMMANDS]
    if r["torch"]:
        expected += ["import torch", "import torch; afd.npu.install()", "afd npu -- python -c 'import torch, torch_npu'"]
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        assert row["wall_s"] > 0 and row["min_s"] <= row["wall_s"] <= row["max_s"] and row["cpu_s"] > 0, name
    assert rows["afd stop"]["exit_codes"] == [1]  # nothing to stop in its own run directory
    assert all(rows[n]["exit_codes"] == [0] for n in expected if n != "afd stop"), rows
    for name in startup.QUICK_COMMANDS:
        assert rows[name]["baseline"] == "python -c pass" and rows[name]["target"] == "<= 0.3 s"
        assert rows[name]["over_baseline_s"] == rows[name]["wall_s"] - rows["python -c pass"]["wall_s"]
        assert rows[name]["pass"] is (rows[name]["wall_s"] <= 0.3)
    if r["torch"]:
        npu = rows["afd npu -- python -c 'import torch, torch_npu'"]
        assert npu["baseline"] == "import torch" and r["npu_overhead_s"] == npu["over_baseline_s"]
        assert npu["pass"] is (npu["over_baseline_s"] <= 0.3)
    assert startup_table(r).row_count == len(rows)
