"""afd.ops.catalog: every operator described once, every front-end's entry well formed."""
import numpy as np
import pytest

from afd import tokens
from afd.ops import catalog


def test_each_operator_once_and_each_entry_name_once_per_namespace():
    names = [op.name for op in catalog.OPERATORS]
    assert len(names) == len(set(names))
    for namespace in (catalog.NPU, catalog.COT):
        entries = [e.name for op in catalog.OPERATORS for e in op.entries if e.namespace == namespace]
        assert len(entries) == len(set(entries)) == len(catalog.entries(namespace))
    assert set(catalog.entries(catalog.COT)) == {"npu_attention_to_ffn", "npu_ffn_to_attention", "ffn_worker_batching"}


def test_a_generation_is_an_entry_of_the_same_operator():
    for op in catalog.OPERATORS:
        for entry in op.entries:
            assert entry.generation in (None, *tokens.GENERATIONS)
            assert entry.aclnn.startswith("aclnn")
        cot = [e for e in op.entries if e.namespace == catalog.COT]
        assert all(e.generation == "950" and e.aclnn.endswith("V2") for e in cot)


def test_what_the_schemas_say_about_each_entry():
    scheduler = catalog.entries(catalog.NPU)["attention_worker_scheduler_"][1]
    assert scheduler.inplace and not scheduler.window_write and scheduler.bound_to_afd
    a2f = catalog.entries(catalog.COT)["npu_attention_to_ffn"][1]
    assert a2f.window_write and not a2f.inplace
    assert catalog.entries(catalog.NPU)["npu_ffn_worker_batching"][1].returns.count("Tensor") == 8


@pytest.mark.parametrize("generation, token_dtype", [("A3", 0), ("A3", 2), ("950", 3), ("950", 5)])
def test_the_batching_output_rule_is_the_operators(generation, token_dtype):
    op = catalog.operator("ffn_worker_batching")
    specs = op.outputs({"expert_num": 6, "max_out_shape": [2, 3, 4, 64], "token_dtype": token_dtype}, generation)
    assert [s.name for s in specs] == ["y", "group_list", "session_ids", "micro_batch_ids", "token_ids",
                                       "expert_offsets", "dynamic_scale", "actual_token_num"]
    assert specs[0].shape == ((24, 32) if token_dtype == 5 else (24, 64))
    assert specs[1].shape == (6, 2) and specs[1].dtype == np.int64


def test_waits_follow_the_call_and_the_debtor_is_named():
    assert catalog.operator("attention_worker_combine").waits({"need_schedule": 1})
    assert not catalog.operator("attention_worker_combine").waits({"need_schedule": 0})
    assert not catalog.operator("ffn_to_attention").waits({})
    assert catalog.operator("attention_worker_combine").owes == "ffn"
    assert catalog.operator("ffn_worker_batching").owes == "attention"
