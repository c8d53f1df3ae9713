"""All benchmark logic behind `afd bench` and `benchmarks/`, one module per measurement (see README, Benchmarks)."""
from .pipeline import SHAPE, bench_config
from .scaling import measure_scaling
from .stages import measure_stages
from .suite import measure

__all__ = ["SHAPE", "bench_config", "measure", "measure_scaling", "measure_stages"]
