"""The pipeline on Ascend 950 (generation "950"): the V2 operators in real multi-process runs, its trace, and its
config rules. The fault kinds on 950 are in tests/test_faults.py (its ascend950 parameter)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_faults import assert_nothing_left

from afd import trace
from afd.config import load
from afd.errors import ConfigError
from afd.launcher.pipeline import Pipeline
from afd.runtime.memory import RunMemory

ROOT = Path(__file__).resolve().parents[1]
ASCEND950 = ROOT / "configs" / "ascend950.yaml"


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))


def run(overrides: list[str]):
    pipeline = Pipeline(ASCEND950, overrides)
    with pipeline:
        result = pipeline.wait(60)
    assert_nothing_left(pipeline)
    return result


def batching_rounds(result) -> list[tuple[str, list]]:
    """(FFN role, units) of every ffn_worker_batching op of the run that took work (the last one of each rank
    waits until the run's stop: no units)."""
    return [(e.role, e.args["units"]) for e in result.events if e.name == "ffn_worker_batching" and e.args["units"]]


def every_unit(cfg) -> set[tuple[int, int, int, int]]:
    return {(s, m, layer, t) for s in range(cfg.sessions) for m in range(cfg.micro_batch_num)
            for layer in range(cfg.layers) for t in range(cfg.steps)}


@pytest.mark.timeout(120)
def test_ascend950_runs_the_v2_path_matches_the_reference_and_traces(tmp_path, recorded_namespaces):
    result = run(["steps=3"])
    cfg = result.config
    assert (cfg.generation, cfg.mode, cfg.snapshot_receive) == ("950", "async", True)
    assert (result.outcome, result.exit_code) == ("completed", 0), (result.reason, result.failure)
    assert result.outputs_match_reference is True
    assert result.compared == cfg.steps * cfg.sessions * cfg.micro_batch_num
    assert set(result.roles) == set(cfg.role_ids()) and all(r["exit_code"] == 0 for r in result.roles.values())

    # No FFN scheduler: each FFN rank received through the batching op itself, and between them the FFN ranks
    # took every (session, micro-batch, layer, step) unit, every layer of the expert ids regrouped there.
    names = {e.name for e in result.events if e.role.startswith("ffn")}
    assert "ffn_worker_scheduler_" not in names and {"ffn_worker_batching", "experts", "ffn_to_attention"} <= names
    rounds = batching_rounds(result)
    taken = {tuple(u) for _, units in rounds for u in units}
    assert taken == every_unit(cfg)
    assert {role for role, _ in rounds} == {f"ffn{f}" for f in range(cfg.ffn_ranks)}

    # The trace: valid Chrome JSON with a process per role and F2A before each combine of its unit.
    data = json.loads(trace.write_result(tmp_path / "run.json", result).read_text())
    procs = {ev["args"]["name"] for ev in data["traceEvents"] if ev["ph"] == "M" and ev["name"] == "process_name"}
    assert procs == set(cfg.role_ids()) - {"controller"}
    assert all(result.metrics["hops_us"][h]["n"] > 0 for h in ("a2f", "ffn", "f2a", "flag_to_combine"))
    for frac in result.metrics["roles"].values():
        assert abs(frac["busy"] + frac["waiting"] + frac["idle"] - 1) < 0.02 or frac["idle"] == 0


@pytest.mark.timeout(120)
def test_ascend950_sync_mode_waits_for_every_session(recorded_namespaces):
    """mode sync on 950: A2F V2 with sync_flag 0 gives every FFN rank every header, and FfnWorkerBatching V2's wait-all
    receive takes all A sessions of a micro-batch in each round."""
    result = run(["steps=2", "mode=sync"])
    cfg = result.config
    assert (result.outcome, result.exit_code) == ("completed", 0), (result.reason, result.failure)
    assert result.outputs_match_reference is True
    rounds = batching_rounds(result)
    assert rounds and all(sorted(u[0] for u in units) == list(range(cfg.sessions)) for _, units in rounds)
    for f in range(cfg.ffn_ranks):  # every FFN rank takes every unit (some with no slot of its own)
        assert {tuple(u) for role, units in rounds if role == f"ffn{f}" for u in units} == every_unit(cfg)


def test_generation_is_validated():
    assert load(None).generation == "A3"
    assert load(None, ["generation=950"]).generation == "950"  # (YAML reads 950 as a number: the name)
    with pytest.raises(ConfigError) as err:
        load(None, generation="910")
    assert "generation" in str(err.value) and "'A3' or '950'" in str(err.value)
    with pytest.raises(ConfigError, match=r"top_k: must be <= 63 on generation 950"):
        load(None, generation="950", top_k=64, routed_experts=64)
    with pytest.raises(ConfigError, match=r"layers: local experts x layers .* 8192 on generation 950"):
        load(None, generation="950", layers=2000, routed_experts=8, ffn_ranks=1)
    load(None, top_k=64, routed_experts=64)  # (A3 has no such rule)


@pytest.mark.parametrize("generation,mode,encoded", [("A3", "async", True), ("950", "sync", True),
                                                      ("950", "async", False)])
def test_expert_rank_table_per_layer(generation, mode, encoded):
    """[L, E+1, 1+2F] rows [count, rank, local]: local ids layer-encoded (layer * local experts + j), but for the
    snapshot receive (950 async), whose batching adds the layer itself from the record."""
    cfg = load(None, generation=generation, mode=mode, layers=3, ffn_ranks=2)
    table = RunMemory(cfg, None, {"roles": []}).expert_rank_table()
    assert table.shape == (3, cfg.expert_num, 5)
    assert (table[..., 0] == 1).all() and (table[..., 1] == np.arange(cfg.expert_num) % 2).all()
    plain = np.arange(cfg.expert_num) // 2  # e % F placement: expert e is local expert e // 2 of rank e % 2
    local_count = np.array([len(cfg.experts_on(e % 2)) for e in range(cfg.expert_num)])
    for layer in range(3):
        assert (table[layer, :, 2] == plain + (layer * local_count if encoded else 0)).all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_v2_round_trip_in_one_process_matches_the_reference_layer(mode):
    """afd bench's V2 round trip (afd.bench.stages on 950): the V2 operators in sequence, no FFN scheduler stage; its
    loop compares the combine output with the reference layer (and raises when a receive would have to wait)."""
    from afd.bench import stages
    result = stages.measure_stages(repeats=3, generation="950", mode=mode, hidden_size=1024, micro_batch_size=8)
    assert result["generation"] == "950" and result["checked"] == 2
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["ffn_worker_scheduler_"]["ms"] < 0.05  # (not run: the stage is the two clock reads around nothing)
    assert result["round_trip_ms"] >= rows["ffn_worker_batching"]["best_ms"] > 0
