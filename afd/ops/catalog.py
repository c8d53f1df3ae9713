"""The AFD operators described once: each one's ways in (schema, aclnn name, generation), waits, debtors and outputs.

Every front-end is derived from this table: torch_npu's `torch.ops.npu` registrations and `torch_npu._afd`, the
`cann_ops_transformer` package, their meta functions and output allocation. A generation (A3, 950) is a variant of an
operator (its V2 entry), never a second operator; a new front-end is one more namespace in `Entry.namespace`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._spec import OutputSpec

NPU = "npu"  # torch_npu 2.14 (torch.ops.npu, torch_npu.<name>)
COT = "cann_ops_transformer"  # the Ascend 950 package (torch.ops.cann_ops_transformer)


@dataclass(frozen=True)
class Entry:
    """One way in to an operator: a name and schema in a front-end's namespace, the aclnn call behind it."""

    namespace: str
    schema: str  # as the real package registers it, verbatim
    aclnn: str
    generation: str | None  # "A3" or "950"; None: the device's own (the combine's kernel follows the SoC)
    bound_to_afd: bool = False  # torch_npu/utils/_afd_ops.py also binds it onto torch_npu._afd

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]

    @property
    def returns(self) -> str:
        return self.schema.rsplit("->", 1)[1].strip()

    @property
    def inplace(self) -> bool:
        """Returns its (a!) argument: the in-place scheduler form."""
        return self.returns == "Tensor(a!)"

    @property
    def window_write(self) -> bool:
        """Returns nothing: what it does is writing peers' windows (FX and compilers must keep the call)."""
        return self.returns == "()"


@dataclass(frozen=True)
class Operator:
    """An AFD operator: its afd.ops function, when it waits and for whom, its output rule, its ways in."""

    name: str  # the afd.ops function
    entries: tuple[Entry, ...]
    waits: Callable[[dict], bool]  # from the call's arguments: may it spin for flags another rank owes?
    owes: str | None  # whose flags a stalled wait lacks: "ffn" (slots an FFN rank writes back), "attention"
    # (headers an attention rank sends), None (it never waits)
    outputs: Callable[[dict, str], tuple[OutputSpec, ...]] | None = None  # the output rule: (arguments, generation)


def _combine_outputs(args: dict, generation: str) -> tuple[OutputSpec, ...]:
    """y [BS from expert_scales, H]: fp16 for token_dtype 0, bf16 otherwise (the 950's MX modes give bf16 too);
    next_layer_id [layer_id's length] int32. Tensor arguments come as their shapes."""
    from .. import tokens  # (on first use: ml_dtypes is a slow import, and registering the ops needs none of it)
    y = tokens.FP16 if args.get("token_dtype", 0) == 0 else tokens.BF16
    return (OutputSpec("y", (int(args["expert_scales"][0]), int(args["hidden_size"])), y, tokens.DTYPE_NAMES[y]),
            OutputSpec("next_layer_id", (int(args["layer_id"][0]),), np.dtype(np.int32), "int32"))


def _batching_outputs(args: dict, generation: str) -> tuple[OutputSpec, ...]:
    from .ffn_worker_batching import output_spec as _batching_output_spec
    return _batching_output_spec(args["expert_num"], args["max_out_shape"], args.get("token_dtype", 0), generation,
                                 args.get("mx_output_uint8", False))


_SCHEDULER = ("(Tensor(a!) self, *, int sync_group_size=1, int execute_mode=0) -> Tensor(a!)",
              "(Tensor self, *, int sync_group_size=1, int execute_mode=0) -> Tensor")

OPERATORS = (
    Operator("ffn_worker_scheduler_", (
        Entry(NPU, "ffn_worker_scheduler_" + _SCHEDULER[0], "aclnnInplaceFfnWorkerScheduler", None, True),
        Entry(NPU, "ffn_worker_scheduler" + _SCHEDULER[1], "aclnnInplaceFfnWorkerScheduler", None, True),
    ), waits=lambda args: True, owes="attention"),
    Operator("attention_worker_scheduler_", (
        Entry(NPU, "attention_worker_scheduler_(Tensor(a!) self) -> Tensor(a!)",
              "aclnnInplaceAttentionWorkerScheduler", None, True),
        Entry(NPU, "attention_worker_scheduler(Tensor self) -> Tensor", "aclnnInplaceAttentionWorkerScheduler",
              None, True),
    ), waits=lambda args: True, owes="ffn"),
    Operator("ffn_worker_batching", (
        Entry(NPU, "npu_ffn_worker_batching(Tensor schedule_context, int expert_num, int[4] max_out_shape, *, "
                   "int token_dtype=0, int need_schedule=0, int layer_num=0) -> (Tensor, Tensor, Tensor, Tensor, "
                   "Tensor, Tensor, Tensor, Tensor)", "aclnnFfnWorkerBatching", "A3"),
        Entry(COT, "ffn_worker_batching(Tensor(a!) schedule_context, int expert_num, int[] max_out_shape, *, "
                   "int token_dtype=0, int need_schedule=0, int layer_num=0, bool sync_flag=False, "
                   "bool mx_output_uint8=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
              "aclnnFfnWorkerBatchingV2", "950"),
    ), waits=lambda args: bool(args.get("need_schedule")), owes="attention", outputs=_batching_outputs),
    Operator("attention_worker_combine", (
        Entry(NPU, "npu_attention_worker_combine(Tensor schedule_context, Tensor expert_scales, Tensor layer_id, "
                   "int hidden_size, *, int token_dtype=0, int need_schedule=0) -> (Tensor, Tensor)",
              "aclnnAttentionWorkerCombine", None),
    ), waits=lambda args: bool(args.get("need_schedule")), owes="ffn", outputs=_combine_outputs),
    Operator("attention_to_ffn", (
        Entry(NPU, "npu_attention_to_ffn(Tensor x, Tensor session_id, Tensor micro_batch_id, Tensor layer_id, "
                   "Tensor expert_ids, Tensor expert_rank_table, str group, int world_size, "
                   "int[] ffn_token_info_table_shape, int[] ffn_token_data_shape, int[] attn_token_info_table_shape, "
                   "int moe_expert_num, *, Tensor? scales=None, Tensor? active_mask=None, int quant_mode=0, "
                   "int sync_flag=0, int ffn_start_rank_id=0) -> ()", "aclnnAttentionToFFN", "A3"),
        Entry(COT, "npu_attention_to_ffn(Tensor(a!) context, Tensor x, Tensor session_id, Tensor micro_batch_id, "
                   "Tensor layer_id, Tensor expert_ids, Tensor expert_rank_table, str group, int world_size, "
                   "int[] ffn_token_info_table_shape, int[] ffn_token_data_shape, int[] attn_token_info_table_shape, "
                   "int moe_expert_num, int quant_mode, int sync_flag, int ffn_start_rank_id, int ccl_buffer_size, "
                   "*, Tensor? scales=None, Tensor? active_mask=None) -> ()", "aclnnAttentionToFfnV2", "950"),
    ), waits=lambda args: True, owes=None),  # A3 spins while a header is still 1 (backpressure); owed by no flag
    Operator("ffn_to_attention", (
        Entry(NPU, "npu_ffn_to_attention(Tensor x, Tensor session_ids, Tensor micro_batch_ids, Tensor token_ids, "
                   "Tensor expert_offsets, Tensor actual_token_num, str group, int world_size, "
                   "int[] token_info_table_shape, int[] token_data_shape, *, Tensor? attn_rank_table=None) -> ()",
              "aclnnFFNToAttention", "A3"),
        Entry(COT, "npu_ffn_to_attention(Tensor(a!) context, Tensor x, Tensor session_ids, Tensor micro_batch_ids, "
                   "Tensor token_ids, Tensor expert_offsets, Tensor actual_token_num, str group, int world_size, "
                   "int[] token_info_table_shape, int[] token_data_shape, int ccl_buffer_size, *, "
                   "Tensor? attn_rank_table=None) -> ()", "aclnnFFNToAttentionV2", "950"),
    ), waits=lambda args: False, owes=None),  # it overwrites blindly
)


def entries(namespace: str) -> dict[str, tuple[Operator, Entry]]:
    """Every entry of a front-end namespace, by its registered name."""
    return {e.name: (op, e) for op in OPERATORS for e in op.entries if e.namespace == namespace}


def operator(name: str) -> Operator:
    for op in OPERATORS:
        if op.name == name:
            return op
    raise KeyError(name)
