"""A fake-NPU rank that lists a schedule context for `afd stop`, says where the listing is, then blocks in native
code: a TCPStore connect to a port nobody listens on (60 s), where a Python signal handler would never run.

    RANK=0 LOCAL_RANK=0 python blocked_rank.py            the rank itself
    python blocked_rank.py --parent                       a launcher that starts the rank and prints its pid
"""
import datetime
import json
import os
import socket
import subprocess
import sys
import time

if sys.argv[1:] == ["--parent"]:
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    child = subprocess.Popen([sys.executable, __file__], env=env)
    print(json.dumps({"child": child.pid}), flush=True)
    time.sleep(600)
    sys.exit(0)

import torch
import torch.distributed as dist

import afd.npu

afd.npu.install()
import torch_npu  # noqa: E402

from afd.npu import registry  # noqa: E402

window = torch.zeros(1 << 16, dtype=torch.int8).npu()
holder = torch_npu._afd.create_schedule_context_holder(
    schedule_mode=0, ffn_window=window.data_ptr(), ffn_window_size=window.numel(), session_num=1, micro_batch_num=1,
    micro_batch_size=4, selected_expert_num=3, expert_num=4, attn_to_ffn_token_size=512, ffn_to_attn_token_size=512)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # free, and nobody will listen on it
print(json.dumps({"pid": os.getpid(), "listing": str(registry._path())}), flush=True)
dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
print("the connect returned", flush=True)
