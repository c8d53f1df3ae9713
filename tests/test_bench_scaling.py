"""The scaling table's smoke run (real pipelines, two points): every row completed, matched the reference and has a
plausible rate and fraction of the copy bound; every process of the DeepSeek-shape run reported its peak RSS."""
import pytest

from afd.bench import SHAPE, bench_config
from afd.bench.pipeline import measure_copy_bound
from afd.bench.scaling import measure_scaling, payload_bytes, points
from afd.config import load
from afd.runtime import rss


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    """Runs of this test live in their own runs root (not beside other users' runs)."""
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))


@pytest.mark.timeout(90)
def test_quick_scaling_runs_real_pipelines(recorded_namespaces):
    result = measure_scaling(quick=True)
    rows = result["rows"]
    assert [(r["axis"], r["hidden_size"], r["micro_batch_size"]) for r in rows] == points(quick=True)
    assert {r["axis"] for r in rows} == {"H", "BS"}
    for row in rows:
        where = (row["axis"], row["hidden_size"], row["micro_batch_size"])
        assert row["outcome"] == "completed", (where, row["reason"])
        assert row["outputs_match_reference"] is True and row["compared"] > 0, where
        assert row["micro_batch_layers"] == row["steps"] * SHAPE["layers"] * SHAPE["micro_batch_num"], where
        assert row["micro_batch_layers_per_s"] > 0 and row["copy_bound_micro_batch_layers_per_s"] > 0, where
        assert 0 < row["fraction_of_copy_bound"] <= 1, where
        assert row["payload_bytes"] == payload_bytes(row["micro_batch_size"], row["hidden_size"]), where
    assert len(recorded_namespaces) >= len(rows)  # the runs were launched here (and the fixture checks their segments)

    # every process of the DeepSeek-shape run: its roles and the controller
    assert (result["rss_shape"]["hidden_size"], result["rss_shape"]["micro_batch_size"]) == (
        SHAPE["hidden_size"], SHAPE["micro_batch_size"])
    expected = {"controller", *load(bench_config(1)).role_ids()}
    per_role = result["rss_per_role"]
    assert set(per_role) == expected == set(result["rss_roles"])
    for role, usage in per_role.items():
        assert 20 < usage["peak_mb"] < 2000, (role, usage)
        assert usage["rss_mb"] <= usage["peak_mb"] + 0.01, (role, usage)
        assert usage["anon_mb"] + usage["file_mb"] + usage["shmem_mb"] == pytest.approx(usage["rss_mb"], abs=0.05)
        assert 0 < usage["private_mb"] <= usage["pss_mb"] <= usage["rss_mb"] + 0.01, (role, usage)
    # forked from one server, the data roles share most of their pages: each one's PSS is well under its RSS
    assert all(per_role[r]["pss_mb"] < 0.8 * per_role[r]["rss_mb"] for r in ("attn0", "combine0", "ffn0")), per_role
    # the FFN rank touches its window, whose token slots alone are BS*(K+1)*H*2 bytes
    slots_mb = SHAPE["micro_batch_size"] * (SHAPE["top_k"] + 1) * SHAPE["hidden_size"] * 2 / 1e6
    assert per_role["ffn0"]["shmem_mb"] > slots_mb, per_role["ffn0"]


def test_copy_bound_shape():
    """The copy bound's bytes: SHAPE's without arguments (as `afd bench` measures it), another shape's with them."""
    assert measure_copy_bound(repeats=1)["bytes"] == payload_bytes(48, 7168) == 2 * 48 * 9 * 7168 * 2
    assert measure_copy_bound(repeats=1, bs=8, h=1024)["bytes"] == 2 * 8 * 9 * 1024 * 2


def test_rss_usage_of_this_process():
    usage = rss.usage()
    assert 20 < usage["peak_mb"] and usage["rss_mb"] <= usage["peak_mb"] + 0.01
    assert {"anon_mb", "file_mb", "shmem_mb", "private_mb", "pss_mb"} <= set(usage)
    assert 0 < usage["private_mb"] <= usage["pss_mb"] <= usage["rss_mb"] + 0.01
