"""The torch front-end's figures: the combine through torch_npu vs the op on numpy views, the torchrun round trip."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

TARGET_COMBINE_RATIO = 1.3  # the front-end adds dispatch, not copies
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "npu" / "window_round_trip.py"


def measure_combine(bs: int = 48, k: int = 8, hidden: int = 7168, rounds: int = 30, per_round: int = 10) -> dict:
    """npu_attention_worker_combine(need_schedule=0) on npu tensors, then torch.npu.synchronize(), against
    afd.ops.attention_worker_combine on numpy views of the same bytes; rounds alternate, best of each."""
    import torch

    from .. import device as _device
    from ..layout import align512
    from ..npu import install
    from ..ops import create_schedule_context_holder
    from ..ops.attention_worker_combine import attention_worker_combine, warm_up
    from ..tokens import BF16
    install()
    import torch_npu

    k1, m = k + 1, 1
    slots = m * bs * k1
    size = align512(4 * slots) + 2 * slots * hidden
    rng = np.random.default_rng(0)
    data = rng.standard_normal(slots * hidden, np.float32).astype(BF16)
    scales = rng.random((bs, k), dtype=np.float32)
    warm_up(1)
    dev = _device.Device()
    try:
        buf = dev.malloc(size)
        buf.view()[:] = 0
        buf.view(BF16, offset=align512(4 * slots))[:data.size] = data
        holder = create_schedule_context_holder(1, 1, m, bs, k1, 16, 512, 2 * hidden, attention_window=buf.address,
                                                attention_window_size=size, device=dev)
        holder.init()
        ctx, lid = holder.get_schedule_context(), np.zeros(1, np.int32)
        window = torch.zeros(size, dtype=torch.int8).npu()
        window[align512(4 * slots):align512(4 * slots) + 2 * data.size].view(torch.int16).copy_(
            torch.from_numpy(data.view(np.int16)))
        th = torch_npu._afd.create_schedule_context_holder(
            schedule_mode=1, session_num=1, micro_batch_num=m, micro_batch_size=bs, selected_expert_num=k1,
            expert_num=16, attn_to_ffn_token_size=512, ffn_to_attn_token_size=2 * hidden,
            attention_window=window.data_ptr(), attention_window_size=size)
        tctx, tscales, tlid = th.get_schedule_context_tensor(), torch.from_numpy(scales).npu(), \
            torch.zeros(1, dtype=torch.int32).npu()

        def numpy_call():
            return attention_worker_combine(ctx, scales, lid, hidden, 1, 0)[0]

        def torch_call():
            y, _ = torch_npu.npu_attention_worker_combine(tctx, tscales, tlid, hidden, token_dtype=1, need_schedule=0)
            torch.npu.synchronize()
            return y

        same = bool((torch_call().cpu().view(torch.int16).numpy() == numpy_call().view(np.int16)).all())
        best = {"numpy": float("inf"), "torch": float("inf")}
        for _ in range(rounds):
            for name, call in (("numpy", numpy_call), ("torch", torch_call)):
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    call()
                    best[name] = min(best[name], time.perf_counter() - t0)
        holder.close()
    finally:
        dev.close()
    ratio = best["torch"] / best["numpy"]
    return {"bs": bs, "k": k, "hidden": hidden, "dtype": "bfloat16", "numpy_ms": best["numpy"] * 1e3,
            "torch_ms": best["torch"] * 1e3, "ratio": ratio, "same_output": same,
            "target_ratio": TARGET_COMBINE_RATIO, "pass": ratio <= TARGET_COMBINE_RATIO and same}


def measure_round_trip(bs: int = 48, k: int = 8, hidden: int = 7168, steps: int = 30, timeout: float = 300.0) -> dict:
    """examples/npu/window_round_trip.py on two ranks (quant mode 0, bf16): round trips per second on the attention
    rank, after a warm-up step (torchrun and torch start-up not counted)."""
    from ..npu.launch import TorchrunJob
    args = ["--bs", str(bs), "--topk", str(k), "--hidden", str(hidden), "--experts", "16", "--quant-mode", "0",
            "--steps", str(steps), "--quiet"]
    job = TorchrunJob(str(EXAMPLE), args, nproc=2)
    t0 = time.monotonic()
    try:
        result = job.run(timeout)
    finally:
        job.cleanup()
    found = re.search(r"round_trips_per_s=([0-9.]+)", result.output)
    return {"bs": bs, "k": k, "hidden": hidden, "steps": steps, "returncode": result.returncode,
            "round_trips_per_s": float(found.group(1)) if found else None, "wall_s": time.monotonic() - t0}


def measure(quick: bool = False) -> dict:
    """Both figures, or why they were skipped (torch is an optional extra)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"skipped": "torch is not installed (pip install 'afd-sim[npu]')"}
    out = {"combine": measure_combine(rounds=8 if quick else 30)}
    if not quick:  # a torchrun job of its own: the full bench only
        out["round_trip"] = measure_round_trip(steps=30)
    return out
