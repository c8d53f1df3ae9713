"""torchrun script: rank 1 fails at once with its own error; rank 0 keeps talking until torchrun ends it."""
import os
import time

import torch  # noqa: F401 (under afd npu: the fake NPU, and so its SIGTERM handling, is in place)

if os.environ["RANK"] == "1":
    time.sleep(0.5)
    raise ValueError("rank 1's own error: the root cause")
for i in range(6000):  # fills the tail of the merged output
    print(f"rank 0 is still busy with line {i} of its work", flush=True)
    time.sleep(0.01)
