"""`afd check`: validate a config and print the windows and memory each rank needs, without starting anything.

Exit 0 when the config is valid and fits this machine (a broken HCCL window-size rule is a warning); 2 when it is
not valid or does not fit (one line naming the key and the rule), and when a hardware limit is broken in strict mode.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..errors import ConfigError
from . import add_overrides

if TYPE_CHECKING:  # the config (pydantic, numpy) loads when a config is checked, not for `afd --help`
    from ..config import Config

HCCL_RULE = "(M*BS*(K+1)*HS*2 + M*BS*(K+1)*4)/1MiB + 1 <= HCCL_BUFFSIZE"


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="validate a config and show the window sizes and memory of every rank")
    p.add_argument("config", nargs="?", help="a YAML config (the built-in default when omitted)")
    add_overrides(p)
    p.add_argument("--strict", action="store_true",
                   help="treat broken A3 hardware limits (HCCL window size, M == 1) as errors "
                        "(also on with strict: true in the config or AFD_STRICT=1)")
    p.add_argument("--json", action="store_true", help="print the sizes as JSON")
    p.set_defaults(handler=main)


def _hccl_buffsize_mb() -> int:
    from ..ops import _limits
    try:
        value = _limits.hccl_buffsize_mb()
    except ValueError:
        import os
        raise ConfigError("HCCL_BUFFSIZE", f"must be a whole number of MB, got {os.environ.get('HCCL_BUFFSIZE')!r}") \
            from None
    if value <= 0:
        raise ConfigError("HCCL_BUFFSIZE", f"must be > 0 MB, got {value}")
    return value


def hccl(cfg: Config) -> dict:
    """The HCCL window-size rule of FFNToAttention (spec §2.2) for this shape."""
    from ..ops import _limits
    c = cfg
    need = _limits.hccl_window_mb_needed(c.micro_batch_num, c.micro_batch_size, c.selected, c.hidden_size,
                                         c.itemsize)
    have = _hccl_buffsize_mb()
    return {"rule": HCCL_RULE, "needed_mb": need, "hccl_buffsize_mb": have, "holds": need <= have}


def _fmt(n: int) -> str:
    if n >= 1 << 30:
        return f"{n:>14,} B  ({n / (1 << 30):.2f} GiB)"
    if n >= 1 << 20:
        return f"{n:>14,} B  ({n / (1 << 20):.2f} MiB)"
    if n >= 1 << 10:
        return f"{n:>14,} B  ({n / (1 << 10):.1f} KiB)"
    return f"{n:>14,} B"


def main(args) -> int:
    from .. import config as config_mod
    from .. import preflight
    from ..layout import CONTEXT_SIZE
    from ..ops import _limits
    from ..preflight import sizes
    cfg = config_mod.load(args.config, args.overrides)
    strict = bool(args.strict or cfg.strict or _limits.strict())
    sz = sizes(cfg)
    rule = hccl(cfg)
    c = cfg
    problems = []  # broken A3 hardware limits: warnings, errors in strict mode
    if not rule["holds"]:
        problems.append(("HCCL_BUFFSIZE",
                         f"HCCL window rule broken: the shape needs {rule['needed_mb']} MB = (M*BS*(K+1)*HS*2 + "
                         f"M*BS*(K+1)*4)//1MiB + 1 with M={c.micro_batch_num} BS={c.micro_batch_size} "
                         f"K+1={c.selected} HS={c.hidden_size}, but HCCL_BUFFSIZE is {rule['hccl_buffsize_mb']} MB"))
    if strict and c.micro_batch_num != 1:
        problems.append(("micro_batch_num", f"FFNToAttention requires M == 1 on A3, got {c.micro_batch_num}"))
    need, have = preflight.needs(c), preflight.has()
    try:
        preflight.check(c, need, have)
        misfit = None
    except ConfigError as exc:  # valid, but it does not fit this machine: afd run would refuse it
        misfit = exc

    if args.json:
        print(json.dumps({"config": c.model_dump(mode="json"), "valid": True, "strict": strict,
                          "processes": c.role_ids(), "sizes": sz, "hccl_window": rule,
                          "warnings": [f"{k}: {m}" for k, m in problems],
                          "resources": {"needs": asdict(need), "has": asdict(have),
                                        "fits": misfit is None, "error": None if misfit is None else str(misfit)}},
                         indent=2))
    else:
        src = args.config or "(built-in default)"
        print(f"afd check: {src} (name {c.name}): config is valid")
        print(f"shape       A={c.sessions} F={c.ffn_ranks} M={c.micro_batch_num} BS={c.micro_batch_size} "
              f"K={c.top_k}+1 H={c.hidden_size} {c.token_dtype} ({c.token_bytes} B per token) "
              f"experts={c.routed_experts}+1 L={c.layers} steps={c.steps} {c.mode}"
              + (" fused" if c.fuse_scheduler else "") + (" strict" if strict else ""))
        roles = c.role_ids()
        print(f"processes   {len(roles)}: {' '.join(roles)}")
        a, f, s = sz["attention_window"], sz["ffn_window"], sz["session_stream"]
        print(f"\nper attention session (x{c.sessions}):")
        print(f"  attention window   {_fmt(a['total_bytes'])}  flags int32[M,BS,K+1] {a['flags_bytes']:,} B, "
              f"data [M,BS,K+1,HS] {a['data_bytes']:,} B at {a['data_offset']:,}, +512")
        print(f"  schedule context   {_fmt(CONTEXT_SIZE)}")
        print(f"  session stream     {_fmt(s['total_bytes'])}  counters, F2A flag times, scales, expert ids, "
              f"y[M,BS,H] at {s['y_offset']:,}")
        print(f"  total              {_fmt(sz['per_attention_session']['total'])}")
        o = sz["ffn_out_buffers"]
        print(f"\nper FFN rank (x{c.ffn_ranks}):")
        print(f"  FFN window         {_fmt(f['total_bytes'])}  records int32[A,M,2+BS*(K+1)] {f['records_bytes']:,} B, "
              f"data [A,M,BS,K+1,HS] {f['data_bytes']:,} B at {f['data_offset']:,}, +512")
        print(f"  FFN out buffers    {_fmt(o['total_bytes'])}  layer/session/micro-batch ids {o['ids_bytes']} B each, "
              f"expert ids {o['expert_ids_bytes']:,} B (each aligned to 512)")
        print(f"  schedule context   {_fmt(CONTEXT_SIZE)}")
        print(f"  total              {_fmt(sz['per_ffn_rank']['total'])}")
        r = sz["run_wide"]
        print("\nrun-wide (launcher):")
        print(f"  status table       {_fmt(r['status_table'])}")
        print(f"  digests            {_fmt(r['digests'])}")
        print(f"  outputs            {_fmt(r['outputs'])}")
        print(f"\nshared memory in all {_fmt(sz['total_bytes'])}")
        print("\nthis machine (afd run refuses a run that does not fit):")
        print(f"  shared memory      needs {_fmt(need.shared_bytes)}, /dev/shm has {_fmt(have.shm_free_bytes)} free")
        print(f"  memory in all      needs {_fmt(need.memory_bytes)} (about), {_fmt(have.memory_available_bytes)} "
              f"available")
        print(f"  processes          {need.processes:>14,}    limit {have.max_processes} (AFD_MAX_PROCESSES)")
        verdict = "holds" if rule["holds"] else "DOES NOT HOLD"
        print(f"\nHCCL window rule   {HCCL_RULE}: needs {rule['needed_mb']} MB, HCCL_BUFFSIZE is "
              f"{rule['hccl_buffsize_mb']} MB: {verdict}")
    for key, msg in problems:
        kind = "error" if strict else "warning"
        tail = "" if strict else " (a real A3 run would fail; an error with --strict)"
        print(f"afd: {kind}: {key}: {msg}{tail}", file=sys.stderr)
    if misfit is not None:
        print(f"afd: error: {misfit}", file=sys.stderr)
        return 2
    if problems and strict:
        return 2
    return 0
