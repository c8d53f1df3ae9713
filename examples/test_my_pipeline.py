"""Driving afd-sim from your own test suite: a completed run, a run_flag=0 stop, and a killed rank."""
import time

import numpy as np
import pytest


@pytest.mark.timeout(120)
def test_completed_run_matches_reference(afd_pipeline, afd_config):
    pipeline = afd_pipeline(afd_config, steps=3)
    result = pipeline.wait()
    assert result.outcome == "completed" and result.exit_code == 0
    assert result.outputs_match_reference
    for key, y in result.outputs.items():  # final hidden states per (session, micro-batch)
        np.testing.assert_array_equal(y, result.reference[key])


@pytest.mark.timeout(120)
def test_run_flag_stop(afd_pipeline):
    pipeline = afd_pipeline(steps=100000)
    while pipeline.step_count < 1:  # let it make progress first
        time.sleep(0.05)
    pipeline.stop()  # run_flag = 0 in every ScheduleContext, then the wake-up broadcast
    result = pipeline.wait(timeout=10)
    assert result.outcome == "stopped" and result.exit_code == 0


@pytest.mark.timeout(120)
def test_killed_ffn_rank_is_named(afd_pipeline):
    pipeline = afd_pipeline(steps=50, faults=["kill:ffn0@step=2"])
    result = pipeline.wait()
    assert result.outcome == "failed" and result.exit_code == 3
    assert result.failure["role"] == "ffn0"
