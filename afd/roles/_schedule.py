"""The strict round-robin order every attention-side role walks: index i -> (step, layer, micro-batch)."""
from __future__ import annotations


def unit(config, index: int) -> tuple[int, int, int]:
    """The i-th (step, layer, micro_batch_id) of one session: micro-batches round-robin inside each layer pass."""
    p, m = divmod(index, config.micro_batch_num)
    t, layer = divmod(p, config.layers)
    return t, layer, m


def total_units(config) -> int:
    return config.steps * config.layers * config.micro_batch_num
