"""`cann_ops_transformer` under `afd npu`: this package is first on PYTHONPATH and swaps itself for the fake's."""
import sys

__afd_fake__ = True

import afd.npu  # noqa: E402

afd.npu.install()
from afd.npu import cot  # noqa: E402

cot.install_modules()
sys.modules[__name__] = sys.modules["cann_ops_transformer"]
