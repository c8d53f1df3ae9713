"""`torch_npu` under `afd npu`: this package is first on PYTHONPATH and swaps itself for the fake NPU's module."""
import sys

__afd_fake__ = True  # (so install() does not take this package for a real torch_npu)

import afd.npu  # noqa: E402

afd.npu.install()
sys.modules[__name__] = sys.modules["torch_npu"]
