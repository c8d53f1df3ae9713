"""Faults in a torch job: window_round_trip.py under `afd npu --fault SPEC -- torchrun`, one run per fault kind.

    python examples/npu/fault_demo.py              # every kind, one table
    python examples/npu/fault_demo.py kill hang    # some kinds

Rank 0 is the FFN rank, rank 1 the attention rank. Each step is two operator calls per rank: on rank 0
npu_ffn_worker_batching (call 2s) and npu_ffn_to_attention (2s+1), on rank 1 npu_attention_to_ffn (2s) and
npu_attention_worker_combine (2s+1). What each kind must end in is in EXPECTED (and in the README's table).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from afd.npu.launch import TorchrunJob

HERE = Path(__file__).parent
SHAPE = ["--bs", "32", "--hidden", "1024", "--topk", "6", "--steps", "3"]
STALL_S = 2.0
FAULTS = {
    "stop": "stop:rank1@call=1",  # run_flag = 0 on the attention rank, just before its first combine
    "kill": "kill:rank0@call=2",  # the FFN rank dies before its second batching
    "hang": "hang:rank0@call=2",  # the FFN rank's stream stops, the process lives
    "delay": "delay:rank0@call=0,ms=30",  # every FFN call 30 ms late
    "drop-flag": "drop-flag:rank0@op=npu_ffn_to_attention,call=0",  # the first F2A loses one flag
    "reorder": "reorder:rank0@op=npu_ffn_to_attention,call=1,ms=300",  # the second F2A: flags before data
    "corrupt": "corrupt:rank1@call=1,field=token_info_buf",  # the attention context loses its flag buffer
}
EXPECTED = {  # kind -> (rank 0 exit, rank 1 exit, what the job's output must say)
    "stop": (0, 0, ["ended by run_flag = 0"]),
    # rank 1 ends within seconds, well inside the stall bound: its watchdog sees rank 0 dead, or torchrun ends it
    "kill": (-9, "nonzero", ["fault kill:rank0@call=2 fires", "exitcode  : -9"]),
    "hang": ("nonzero", "nonzero", ["stalled 2.0s", "missing: mb 0 token", "(owed by rank 0)"]),
    "delay": (0, 0, ["flags_left=0"]),
    "drop-flag": ("nonzero", 1, ["(223/224 ready); missing: mb 0 token", "(owed by rank 0)"]),
    "reorder": (0, 0, ["flags_left=0"]),  # ends well, but step 1's output is wrong (the combine read stale data)
    "corrupt": ("nonzero", 1, ["attention.token_info_buf: must be a non-null device address"]),
}
STALL_S_OF = {"kill": 60.0}  # a kill must not need the stall bound


def run(kind: str, out_dir: str | None = None, timeout: float = 120.0):
    """One job with one fault; the TorchrunResult."""
    args = SHAPE + (["--out", out_dir] if out_dir else [])
    stall = STALL_S_OF.get(kind, STALL_S)
    job = TorchrunJob(str(HERE / "window_round_trip.py"), args, nproc=2,
                      afd_options=["--fault", FAULTS[kind], "--stall-timeout", str(stall)])
    try:
        return job.run(timeout)
    finally:
        job.cleanup()


def as_documented(kind: str, result) -> bool:
    r0, r1, said = EXPECTED[kind]
    codes = (result.ranks[0].exit_code, result.ranks[1].exit_code)

    def ok(code, want):
        return code not in (0, None) if want == "nonzero" else code == want
    return ok(codes[0], r0) and ok(codes[1], r1) and all(text in result.output for text in said)


def main(kinds: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="afd npu: faults in window_round_trip.py (rank 0 FFN, rank 1 attention)")
    for col in ("kind", "spec", "rank 0", "rank 1", "seconds", "as documented"):
        table.add_column(col)
    good = True
    for kind in kinds or FAULTS:
        with tempfile.TemporaryDirectory() as out:
            result = run(kind, out)
        fine = as_documented(kind, result)
        good &= fine
        table.add_row(kind, FAULTS[kind], str(result.ranks[0].exit_code), str(result.ranks[1].exit_code),
                      f"{result.seconds:.1f}", "yes" if fine else "NO")
    Console().print(table)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
