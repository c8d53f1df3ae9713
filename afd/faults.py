"""Fault plans: `KIND[:TARGET][@WHEN]` specs, when they fire, what firing does, and the outcome each kind must end in."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .comm import put_rows_of
from .errors import ConfigError

KINDS = ("stop", "kill", "hang", "drop-flag", "delay", "corrupt", "reorder")
DEFAULT_TARGET = {"stop": "combine0", "kill": "ffn0", "hang": "ffn0", "drop-flag": "ffn0", "delay": "ffn0",
                  "corrupt": "sched0", "reorder": "ffn0"}
WHEN_KEYS = ("step", "layer", "mb", "t")
NPU_WHEN_KEYS = ("call", "t")  # the torch front-end: the target rank's N-th operator call (0-based), or a time
PARAM_KEYS = {"delay": {"ms"}, "drop-flag": {"slots"}, "corrupt": {"field"}, "reorder": {"ms"}}
CORRUPT_FIELDS = {"attention": ("micro_batch_id", "schedule_mode", "token_info_buf"),
                  "ffn": ("polling_index", "schedule_mode", "token_info_buf")}

# What each kind must end in: (outcome, exit code, failure kind or None). The README table mirrors this.
DOCUMENTED = {
    "stop": ("stopped", 0, None),
    "kill": ("failed", 3, "died"),
    "kill:controller": ("failed", 3, "controller"),
    "hang": ("failed", 3, "hang"),
    "drop-flag": ("failed", 4, "error"),
    "delay": ("completed", 0, None),
    "corrupt": ("failed", 4, "error"),
    "reorder": ("failed", 4, None),
}


@dataclass(frozen=True)
class Fault:
    """One fault: what, on which role, and when (any of step/layer/mb, or t seconds after start)."""

    kind: str
    target: str
    step: int | None = None
    layer: int | None = None
    mb: int | None = None
    t: float | None = None
    params: dict = field(default_factory=dict)
    call: int | None = None  # torch front-end faults: the operator call they fire at

    @property
    def spec(self) -> str:
        when = [f"{k}={getattr(self, k)}" for k in WHEN_KEYS + ("call",) if getattr(self, k) is not None]
        when += [f"{k}={v}" for k, v in self.params.items()]
        return f"{self.kind}:{self.target}" + (f"@{','.join(when)}" if when else "")

    def due(self, step: int, layer: int, mb: int, elapsed_s: float) -> bool:
        """True once the role reaches (step, layer, mb) — every given coordinate must match — or time t."""
        if self.t is not None:
            return elapsed_s >= self.t
        if self.step is None and self.layer is None and self.mb is None:
            return True
        return ((self.step is None or step == self.step) and (self.layer is None or layer == self.layer)
                and (self.mb is None or mb == self.mb))

    def reached(self, step: int, layer: int, mb: int, elapsed_s: float) -> bool:
        """For observers that sample progress (the controller): the point is at or behind (step, layer, mb)."""
        if self.t is not None:
            return elapsed_s >= self.t
        point = (self.step or 0, self.layer or 0, self.mb or 0)
        return (step, layer, mb) >= point

    def documented(self) -> tuple[str, int, str | None]:
        return DOCUMENTED["kill:controller" if self.kind == "kill" and self.target == "controller" else self.kind]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fault":
        return cls(**d)


def parse(spec: str, role_ids: list[str] | None = None, *, npu: bool = False) -> Fault:
    """Parse `KIND[:TARGET][@WHEN]`; WHEN is `step=N,layer=L,mb=M` (combinable) or `t=SECONDS`, plus kind params.

    npu=True parses the torch front-end's specs (AFD_NPU_FAULTS): TARGET is `rank<N>` (default rank0), WHEN is
    `call=N` (that rank's N-th operator call, 0-based; `op=NAME` counts only that operator's calls) or `t=SECONDS`.
    """
    text = spec.strip()
    head, _, when = text.partition("@")
    kind, _, target = head.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"fault {spec!r}", f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    if npu:
        return _parse_npu(spec, kind, target or "rank0", when)
    target = target or DEFAULT_TARGET[kind]
    if role_ids is not None and target not in role_ids:
        raise ConfigError(f"fault {spec!r}", f"target {target!r} is not a role of this run ({', '.join(role_ids)})")
    if kind in ("drop-flag", "reorder") and not target.startswith("ffn"):
        raise ConfigError(f"fault {spec!r}", f"{kind} targets an FFN rank (ffn<f>), not {target!r}")
    if kind in ("hang", "delay", "drop-flag", "reorder", "corrupt") and target == "controller":
        raise ConfigError(f"fault {spec!r}", f"{kind} cannot target the controller")
    values, params = _when(spec, when, WHEN_KEYS, PARAM_KEYS.get(kind, set()))
    if "t" in values and len(values) > 1:
        raise ConfigError(f"fault {spec!r}", "t=SECONDS cannot be combined with step/layer/mb")
    if kind == "corrupt":
        area = "ffn" if target.startswith("ffn") else "attention"
        params.setdefault("field", CORRUPT_FIELDS[area][0])
        if params["field"] not in CORRUPT_FIELDS[area]:
            raise ConfigError(f"fault {spec!r}", f"field must be one of {', '.join(CORRUPT_FIELDS[area])} for {target}")
    _kind_params(spec, kind, params)
    return Fault(kind, target, values.get("step"), values.get("layer"), values.get("mb"), values.get("t"), params)


def _when(spec: str, when: str, when_keys: tuple, param_keys: set) -> tuple[dict, dict]:
    """The `key=value,...` after @: (points: numbers >= 0 for `when_keys`, params: strings for `param_keys`)."""
    values: dict = {}
    params: dict = {}
    for part in filter(None, when.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"fault {spec!r}", f"WHEN part {part!r} must be key=value")
        if key in when_keys:
            try:
                values[key] = float(value) if key == "t" else int(value)
            except ValueError:
                raise ConfigError(f"fault {spec!r}", f"{key} must be a number, got {value!r}") from None
            if not (values[key] >= 0 and (key != "t" or math.isfinite(values[key]))):
                raise ConfigError(f"fault {spec!r}", f"{key} must be a finite number >= 0, got {value.strip()}")
        elif key in param_keys:
            params[key] = value.strip()
        else:
            allowed = list(when_keys) + sorted(param_keys)
            raise ConfigError(f"fault {spec!r}", f"unknown WHEN key {key!r}; use {', '.join(allowed)}")
    return values, params


def _kind_params(spec: str, kind: str, params: dict) -> None:
    """Defaults and rules of the per-kind parameters (ms, slots), in place."""
    if kind in ("delay", "reorder"):
        try:
            params["ms"] = float(params.get("ms", 5 if kind == "delay" else 50))
        except ValueError:
            raise ConfigError(f"fault {spec!r}", f"ms must be a number, got {params['ms']!r}") from None
        if not (math.isfinite(params["ms"]) and params["ms"] >= 0):
            raise ConfigError(f"fault {spec!r}", f"ms must be a finite number >= 0, got {params['ms']:g}")
    if kind == "drop-flag":
        slots = params.get("slots", "1")
        if slots != "all":
            try:
                params["slots"] = int(slots)
            except ValueError:
                raise ConfigError(f"fault {spec!r}", f"slots must be a whole number or 'all', got {slots!r}") from None
            if params["slots"] <= 0:
                raise ConfigError(f"fault {spec!r}", "slots must be > 0")


def _parse_npu(spec: str, kind: str, target: str, when: str) -> Fault:
    if not (target.startswith("rank") and target[4:].isdigit()):
        raise ConfigError(f"fault {spec!r}", f"target must be rank<N> (a torchrun rank), got {target!r}")
    values, params = _when(spec, when, NPU_WHEN_KEYS, PARAM_KEYS.get(kind, set()) | {"op"})
    if "t" in values and "call" in values:
        raise ConfigError(f"fault {spec!r}", "t=SECONDS cannot be combined with call=N")
    if kind == "corrupt":
        fields = CORRUPT_FIELDS["attention"] + CORRUPT_FIELDS["ffn"]
        params.setdefault("field", "micro_batch_id")
        if params["field"] not in fields:
            raise ConfigError(f"fault {spec!r}", f"field must be one of {', '.join(dict.fromkeys(fields))}")
    _kind_params(spec, kind, params)
    return Fault(kind, target, t=values.get("t"), params=params, call=values.get("call"))


def parse_all(specs: list[str], role_ids: list[str]) -> list[Fault]:
    return [parse(s, role_ids) for s in specs]


def random_fault(rng: random.Random, config) -> Fault:
    """A random fault at a random point of a run of `config` (for campaigns)."""
    kind = rng.choice(KINDS)
    roles = [r for r in config.role_ids() if r != "controller"]
    ffns = [r for r in roles if r.startswith("ffn")]
    if kind in ("drop-flag", "reorder"):
        target = rng.choice(ffns)
    elif kind == "corrupt":
        target = rng.choice([r for r in roles if r.startswith(("sched", "combine", "ffn"))])
    elif kind == "stop":
        target = rng.choice(["controller", "combine0"])
    elif kind == "kill":
        target = rng.choice(roles + ["controller"])
    else:
        target = rng.choice(roles)
    step = rng.randrange(config.steps)
    layer = rng.randrange(config.layers)
    params = {}
    if kind == "corrupt":
        area = "ffn" if target.startswith("ffn") else "attention"
        params["field"] = rng.choice(CORRUPT_FIELDS[area])
    spec = f"{kind}:{target}@step={step},layer={layer}" + "".join(f",{k}={v}" for k, v in params.items())
    if kind == "delay":
        spec += ",ms=2"
    return parse(spec, config.role_ids())


class FaultHooks:
    """The faults of one process not yet fired, and what firing each kind does there.

    Both ways in use it: a role process (points are step/layer/micro-batch) and the torch front-end (points are
    operator calls). What differs between them comes in as callbacks: `stop()` writes run_flag = 0 where this process
    can reach it, `corrupt(field)` spoils a context field, `alive()` tells a hung process whether to keep hanging
    (it returns when the owner of the process is gone), `on_fire(fault)` records the moment.
    `delay_s` (a straggler's extra time per op) and `window_fault` (drop-flag / reorder, applied by a FaultyWindow)
    are read by the code that runs the ops.
    """

    def __init__(self, faults=(), *, stop=None, corrupt=None, alive=None, on_fire=None):
        self.pending: list[Fault] = list(faults)
        self.fired: list[Fault] = []
        self.delay_s = 0.0
        self.window_fault: Fault | None = None
        self.window_fault_applied = False
        self._stop, self._corrupt, self._alive, self._on_fire = stop, corrupt, alive, on_fire

    def add(self, fault: Fault) -> None:
        self.pending.append(fault)

    def due(self, *point, elapsed_s: float = 0.0, matches=None) -> list[Fault]:
        """The pending faults due at this point (`matches(fault)` overrides Fault.due for other kinds of points)."""
        test = matches or (lambda f: f.due(*point, elapsed_s))
        return [f for f in self.pending if test(f)]

    def check(self, *point, elapsed_s: float = 0.0, matches=None) -> None:
        """Fire every pending fault due at this point."""
        if not self.pending:
            return
        for fault in self.due(*point, elapsed_s=elapsed_s, matches=matches):
            self.pending.remove(fault)
            self.fire(fault)

    def fire(self, fault: Fault) -> None:
        self.fired.append(fault)
        if self._on_fire is not None:
            self._on_fire(fault)
        kind = fault.kind
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "hang":
            while self._alive is None or self._alive():  # no progress, no heartbeat; leave once orphaned
                time.sleep(0.05)
        elif kind == "stop":
            self._stop(fault)
        elif kind == "delay":
            self.delay_s = fault.params["ms"] / 1000.0
        elif kind == "corrupt":
            self._corrupt(fault.params["field"])
        elif kind in ("drop-flag", "reorder"):
            self.window_fault = fault

    def window_round_done(self) -> None:
        """A round of window writes ended: a drop-flag / reorder that hit it is spent."""
        if self.window_fault_applied:
            self.window_fault = None
            self.window_fault_applied = False


class FaultyWindow:
    """A window as a writer sees it, with the writer's drop-flag / reorder fault applied to its puts.

    drop-flag: the first `slots` flag stores of a round (int32 puts at offset 0, the flag region) never happen;
    their data landed. reorder: the data of a round is held back and written after its flags, late enough
    (`late_data`) that a reader consumes the flags without it.
    """

    def __init__(self, window, hooks: FaultHooks):
        self.window, self.hooks = window, hooks
        self.size = window.size
        self.held = None  # reorder: data held back until after its flags
        self.dropped: list[int] = []

    def put_rows(self, offset, stride, index, rows):
        fault = self.hooks.window_fault
        if fault is not None and fault.kind == "reorder" and len(index):
            self.held = (offset, stride, np.array(index), np.array(rows))
            self.hooks.window_fault_applied = True
            return
        self.window.put_rows(offset, stride, index, rows)

    def put_rows_of(self, offset, stride, index, src, src_index, streaming=False):
        """put_rows(offset, stride, index, src[src_index]): the window's own single-pass copy when it has one."""
        fault = self.hooks.window_fault
        if fault is not None and fault.kind == "reorder" and len(index):
            self.put_rows(offset, stride, index, src[src_index])  # (held back there)
            return
        put_rows_of(self.window, offset, stride, index, src, src_index, streaming)

    def put_i32(self, offset, index, values):
        fault = self.hooks.window_fault
        index = np.asarray(index)
        if fault is not None and fault.kind == "drop-flag" and offset == 0 and index.size:
            n = index.size if fault.params["slots"] == "all" else min(fault.params["slots"], index.size)
            self.dropped = index[:n].tolist()
            index = index[n:]  # the data of these slots landed, their flags never will
            values = values if np.ndim(values) == 0 else np.asarray(values)[n:]
            self.hooks.window_fault_applied = True
        self.before_flags(offset, index)
        self.window.put_i32(offset, index, values)
        if self.held is not None and offset == 0:  # reorder: flags went first, the data follows late
            self.late_data(fault)
            self.window.put_rows(*self.held)
            self.held = None

    def before_flags(self, offset, index) -> None:
        """Called just before flag stores reach the window (subclasses stamp them)."""

    def late_data(self, fault: Fault) -> None:
        """How long reordered data is held back: `ms` (subclasses wait for the reader instead)."""
        time.sleep(max(0.0, fault.params["ms"] / 1000.0))

    def get_i32(self, offset, count):
        return self.window.get_i32(offset, count)
