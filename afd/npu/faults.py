"""AFD_NPU_FAULTS: faults of a torch job by rank and operator call (`drop-flag:rank0@call=2`), fired on the streams.

Specs are separated by `;` (or spaces); each names a target rank (`rank<N>`, the torchrun RANK), a point
(`call=N`: that rank's N-th AFD operator call, 0-based, counting in launch order; `op=NAME` counts only that
operator; or `t=SECONDS` after the first call) and the kind's parameters, as `afd run --fault` does. A fault fires on
the stream, right before the call it names runs:
  stop       run_flag = 0 in every schedule context of the rank (what stop_schedule() writes)
  kill       SIGKILL of the rank
  hang       the rank's stream stops (the process stays alive until its parent is gone)
  delay      every later operator call of the rank takes `ms` longer
  drop-flag  the next window write of the rank (F2A or A2F) loses `slots` flags
  reorder    the next window write puts its flags before its data
  corrupt    a field of the rank's schedule contexts gets a value the kernels reject
"""
from __future__ import annotations

import os
import threading
import time

from ..errors import ConfigError
from ..faults import Fault, FaultHooks, FaultyWindow, parse
from . import trace, watchdog

ENV = "AFD_NPU_FAULTS"
_lock = threading.Lock()
_hooks: FaultHooks | None = None
_calls: dict[str, int] = {}
_t0: float | None = None
BAD_VALUES = {"micro_batch_id": 1 << 20, "polling_index": 1 << 20, "schedule_mode": 2, "token_info_buf": 0}


def parse_env(text: str | None = None) -> list[Fault]:
    """Every spec of AFD_NPU_FAULTS (a bad one is an error naming it and the variable)."""
    text = os.environ.get(ENV, "") if text is None else text
    specs = [s for chunk in text.split(";") for s in chunk.split()]
    try:
        return [parse(s, npu=True) for s in specs]
    except ConfigError as exc:
        raise ConfigError(f"{ENV}: {exc.field}", exc.rule) from None


def hooks() -> FaultHooks:
    """This rank's pending faults (parsed once)."""
    global _hooks
    if _hooks is not None:
        return _hooks
    with _lock:
        if _hooks is None:
            mine = [f for f in parse_env() if f.target == f"rank{watchdog.rank()}"]
            _hooks = FaultHooks(mine, stop=_stop, corrupt=_corrupt, alive=_alive, on_fire=_fired)
        return _hooks


def next_call(op: str) -> tuple[int, int]:
    """At launch: (this rank's call index over every operator, the index among this operator's calls)."""
    global _t0
    if not hooks().pending and not trace.enabled():
        return -1, -1  # nothing counts calls: not worth a lock per call
    with _lock:
        if _t0 is None:
            _t0 = time.monotonic()
        total = _calls.get("", 0)
        mine = _calls.get(op, 0)
        _calls[""], _calls[op] = total + 1, mine + 1
        return total, mine


def quiet() -> bool:
    """No fault pending on this rank and no straggler delay: an operator call has nothing to ask here."""
    h = hooks()
    return not h.pending and not h.delay_s


def before_op(op: str, call: tuple[int, int]) -> None:
    """On the stream, right before the call runs: fire what is due."""
    h = hooks()
    if not h.pending:
        return
    elapsed = time.monotonic() - (_t0 or time.monotonic())

    def due(f: Fault) -> bool:
        if f.t is not None:
            return elapsed >= f.t
        wanted = f.params.get("op")
        if wanted is not None and wanted != op:
            return False
        index = call[1] if wanted is not None else call[0]
        return f.call is None or f.call == index

    h.check(matches=due)


def delay_s() -> float:
    return hooks().delay_s


def window(win):
    """A window this rank writes into, with its drop-flag / reorder faults applied (the window itself if none)."""
    h = hooks()
    if any(f.kind in ("drop-flag", "reorder") for f in h.pending + h.fired):
        return FaultyWindow(win, h)
    return win


def round_done() -> None:
    hooks().window_round_done()


def _fired(fault: Fault) -> None:
    watchdog.announce(f"fault {fault.spec} fires")
    trace.instant("fault", {"spec": fault.spec})


def _stop(fault: Fault) -> None:
    from .holder import live_holders
    for h in live_holders():
        h.stop_schedule()


def _corrupt(field: str) -> None:
    from .holder import live_holders
    for h in live_holders():
        ctx = h._impl.get_schedule_context()
        area = "common" if field == "schedule_mode" else ("attention" if h._impl.schedule_mode == 1 else "ffn")
        if area != "common" and field not in ("token_info_buf",) and \
                field not in ({"micro_batch_id"} if area == "attention" else {"polling_index"}):
            continue
        setattr(getattr(ctx, area), field, BAD_VALUES[field])


def _alive() -> bool:
    watchdog.check_parent()
    return True
