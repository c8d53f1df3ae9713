"""The run configuration: a validated pydantic model, loaded from YAML/dicts, with `--set key=value` overrides."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .inputs import CONFIG_CAP, InputError, read_text
from .layout import AttentionWindowLayout, FfnOutLayout, FfnWindowLayout, align512

ITEMSIZE = {"fp16": 2, "bf16": 2}
AGENT_PREFIX = "agent-"
TOKEN_DTYPE_CODE = {"fp16": 0, "bf16": 1}
Number = StrictInt | StrictFloat
MAX_K1_950, MAX_SESSIONS_950, MAX_EXPERTS_950 = 64, 1024, 8192  # FfnWorkerBatching V2's host limits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # every wait is bounded


class ControlConfig(_Strict):
    """Where the ZeroMQ control plane listens."""

    transport: Literal["ipc", "tcp"] = "ipc"
    host: StrictStr = "127.0.0.1"
    port: StrictInt = Field(0, ge=0, le=65535, description="0 = pick a free port")
    trusted_network: StrictBool = Field(False, description="the hosts' network is trusted: window writes across "
                                        "hosts travel unencrypted (still authenticated with the run's key)")


class DeviceTimeConfig(_Strict):
    """Emulated device times (afd.timing): roles wait them out inside the op span, so timelines show the model."""

    attention_us_per_token: Number = Field(0, ge=0, description="attention + gate per valid token")
    expert_us_per_token: Number = Field(0, ge=0, description="experts per (token, expert) row of an FFN round")
    link_gbps: Number = Field(0, ge=0, description="A2F/F2A link bandwidth; 0 = transfers cost only the overhead")
    op_overhead_us: Number = Field(0, ge=0, description="fixed cost of each modelled op")


class HostConfig(_Strict):
    """One host of a multi-host layout: which roles it runs, and the address its window agent is reached at."""

    roles: list[StrictStr]
    address: StrictStr = Field("127.0.0.1", description="where other hosts reach this host's agent (name or IP); "
                                                        "a loopback address binds there, any other binds 0.0.0.0")


class Config(_Strict):
    """Everything one pipeline run needs; every field has a default (the built-in scenario)."""

    name: StrictStr = "default"
    sessions: StrictInt = Field(1, gt=0, description="attention sessions A")
    ffn_ranks: StrictInt = Field(1, gt=0, description="FFN ranks F")
    micro_batch_num: StrictInt = Field(2, gt=0, le=64, description="M")
    micro_batch_size: StrictInt = Field(8, gt=0, description="BS, token capacity of one micro-batch")
    active_tokens: StrictInt | None = Field(None, gt=0, description="valid tokens per micro-batch (< BS: masked)")
    top_k: StrictInt = Field(2, gt=0, description="routed experts per token K")
    selected_expert_num: StrictInt | None = Field(None, gt=0, description="K+1; must equal top_k + 1 if given")
    routed_experts: StrictInt = Field(4, gt=0, description="routed experts per layer")
    hidden_size: StrictInt = Field(256, gt=0, description="H")
    layers: StrictInt = Field(2, gt=0)
    steps: StrictInt = Field(4, gt=0)
    token_dtype: Literal["fp16", "bf16"] = "fp16"
    expert_kind: Literal["linear", "scale"] = "linear"
    placement: dict[StrictInt, list[StrictInt]] | None = Field(
        None, description="expert id -> FFN ranks holding it (shared expert id = routed_experts); default e % F")
    mode: Literal["sync", "async"] = "sync"
    generation: Literal["A3", "950"] = Field("A3", description="A3: the V1 operators (torch_npu); 950: the V2 "
                                                              "window operators and the arch35 combine")
    fuse_scheduler: StrictBool = False
    seed: StrictInt = Field(0, ge=0, description="seeds the inputs and weights (numpy SeedSequence: >= 0)")
    wait: Literal["default", "spin"] = "default"
    spin_us: Number = Field(50, ge=0)
    stall_timeout_s: Number = Field(2.0, gt=0)
    heartbeat_interval_s: Number = Field(0.1, gt=0)
    hang_timeout_s: Number = Field(1.0, gt=0)
    start_timeout_s: Number = Field(30.0, gt=0)
    run_timeout_s: Number = Field(600.0, gt=0)
    strict: StrictBool = False
    check_reference: StrictBool = True
    trace: StrictBool = Field(True, description="record op/wait/flag events (cheap); afd run --trace FILE writes them")
    device_time: DeviceTimeConfig | None = Field(None, description="emulated device times; None = off")
    control: ControlConfig = ControlConfig()
    hosts: dict[StrictStr, HostConfig] | None = None
    faults: list[StrictStr] = []

    @field_validator("generation", mode="before")
    @classmethod
    def _generation_name(cls, value: Any) -> Any:
        """`generation: 950` (YAML, `--set generation=950`) reads as the number 950: the name "950"."""
        return str(value) if type(value) is int else value

    @model_validator(mode="after")
    def _rules(self) -> "Config":
        k1 = self.top_k + 1
        if self.selected_expert_num is not None and self.selected_expert_num != k1:
            raise ValueError(f"selected_expert_num: must equal top_k + 1 = {k1} (one shared expert), "
                             f"got {self.selected_expert_num}")
        if self.top_k > self.routed_experts:
            raise ValueError(f"top_k: must be <= routed_experts ({self.routed_experts}), got {self.top_k}")
        if self.active_tokens is not None and self.active_tokens > self.micro_batch_size:
            raise ValueError(f"active_tokens: must be <= micro_batch_size ({self.micro_batch_size}), "
                             f"got {self.active_tokens}")
        token_bytes = self.hidden_size * ITEMSIZE[self.token_dtype]
        if token_bytes % 512:
            raise ValueError(f"hidden_size: token size hidden_size*{ITEMSIZE[self.token_dtype]} = {token_bytes} bytes "
                             f"must be a multiple of 512 (attn_to_ffn_token_size / ffn_to_attn_token_size)")
        if self.placement is not None:
            for e in range(self.routed_experts + 1):
                ranks = self.placement.get(e)
                if not ranks:
                    raise ValueError(f"placement: expert {e} is placed on no FFN rank")
                bad = [r for r in ranks if not 0 <= r < self.ffn_ranks]
                if bad:
                    raise ValueError(f"placement: expert {e} names FFN rank(s) {bad} outside [0, {self.ffn_ranks})")
            extra = [e for e in self.placement if not 0 <= e <= self.routed_experts]
            if extra:
                raise ValueError(f"placement: expert id(s) {extra} outside [0, {self.routed_experts}]")
        if self.generation == "950":
            self._rules_950()
        if self.strict:
            if not 1024 <= self.hidden_size <= 8192:
                raise ValueError(f"hidden_size: must be in [1024, 8192] in strict mode, got {self.hidden_size}")
            if self.micro_batch_size > 512:
                raise ValueError(f"micro_batch_size: must be <= 512 in strict mode, got {self.micro_batch_size}")
            if self.top_k > 16:
                raise ValueError(f"top_k: must be in (0, 16] in strict mode, got {self.top_k}")
        if self.hosts is not None:
            placed = [r for h in self.hosts.values() for r in h.roles]
            missing = sorted(set(self.role_ids()) - set(placed) - {"controller"})
            if missing:
                raise ValueError(f"hosts: roles {missing} are placed on no host")
            unknown = sorted(set(placed) - set(self.role_ids()))
            if unknown:
                raise ValueError(f"hosts: unknown roles {unknown}")
            twice = sorted({r for r in placed if placed.count(r) > 1})
            if twice:
                raise ValueError(f"hosts: roles {twice} are placed on more than one host")
            bad = [h for h in self.hosts if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", h)]
            if bad:
                raise ValueError(f"hosts: host names {bad} must be letters, digits, '_', '.', '-'")
            for s in range(self.sessions):  # one session's roles share its context and stream: one host
                names = [f"attn{s}", f"sched{s}", f"combine{s}"]
                where = {r: self.host_of(r) for r in names if r in self.role_ids()}
                if len(set(where.values())) > 1:
                    raise ValueError(f"hosts: the roles of session {s} share its context and stream and must be on "
                                     f"one host, got {where}")
            if len(self.hosts) > 1 and self.control.transport != "tcp":
                raise ValueError("control.transport: must be tcp when roles are spread over several hosts")
        return self

    def _rules_950(self) -> None:
        """What the V2 operators refuse at any size (their other limits hold in strict mode, as on A3): checked
        here so a run that cannot work is one line before anything starts, not a role failing mid-run."""
        if self.selected > MAX_K1_950:
            raise ValueError(f"top_k: must be <= {MAX_K1_950 - 1} on generation 950 (FfnWorkerBatching V2 takes "
                             f"K+1 <= {MAX_K1_950}), got {self.top_k}")
        if self.sessions > MAX_SESSIONS_950:
            raise ValueError(f"sessions: must be <= {MAX_SESSIONS_950} on generation 950 (FfnWorkerBatching V2), "
                             f"got {self.sessions}")
        held = Counter(f for e in range(self.expert_num) for f in self.placement_of(e))
        rank, most = max(held.items(), key=lambda kv: kv[1])
        if most * self.layers > MAX_EXPERTS_950:
            raise ValueError(f"layers: local experts x layers of FFN rank {rank} = {most} x {self.layers} must be "
                             f"<= {MAX_EXPERTS_950} on generation 950 (FfnWorkerBatching V2's expert_num)")

    @property
    def snapshot_receive(self) -> bool:
        """950 in async mode: each FFN rank takes whatever sessions are ready through FfnWorkerBatching V2's snapshot
        receive (expert ids regrouped by the record's layer); 950 in sync mode waits for all A sessions (its
        wait-all receive, ids layer-encoded by the table as on A3); A3 runs the FFN scheduler + NORM batching."""
        return self.generation == "950" and self.mode == "async"

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def selected(self) -> int:
        return self.top_k + 1

    @property
    def valid_tokens(self) -> int:
        return self.active_tokens if self.active_tokens is not None else self.micro_batch_size

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.token_dtype]

    @property
    def token_bytes(self) -> int:
        return self.hidden_size * self.itemsize

    @property
    def expert_num(self) -> int:
        return self.routed_experts + 1

    @property
    def world_size(self) -> int:
        return self.ffn_ranks + self.sessions

    def attention_rank(self, session: int) -> int:
        """Global rank of an attention session: FFN ranks first, then attention (LAYER_OUT=FA)."""
        return self.ffn_ranks + session

    def experts_on(self, rank: int) -> list[int]:
        """Global expert ids held by an FFN rank, in local order."""
        return [e for e in range(self.expert_num) if rank in self.placement_of(e)]

    def placement_of(self, expert: int) -> list[int]:
        if self.placement is not None:
            return list(self.placement[expert])
        return [expert % self.ffn_ranks]

    def attention_layout(self) -> AttentionWindowLayout:
        return AttentionWindowLayout(self.micro_batch_num, self.micro_batch_size, self.selected, self.hidden_size,
                                     self.itemsize)

    def ffn_layout(self) -> FfnWindowLayout:
        return FfnWindowLayout(self.sessions, self.micro_batch_num, self.micro_batch_size, self.selected,
                               self.token_bytes)

    def ffn_out_layout(self) -> FfnOutLayout:
        return FfnOutLayout(self.sessions, self.micro_batch_size, self.selected)

    def attention_window_bytes(self) -> int:
        # The holder requires window_size > align512(info): one extra 512-byte page keeps it strict.
        return self.attention_layout().total_bytes + 512

    def ffn_window_bytes(self) -> int:
        return self.ffn_layout().total_bytes + 512

    def role_ids(self) -> list[str]:
        ids = ["controller"]
        for s in range(self.sessions):
            ids += [f"attn{s}"] + ([] if self.fuse_scheduler else [f"sched{s}"]) + [f"combine{s}"]
        ids += [f"ffn{f}" for f in range(self.ffn_ranks)]
        return ids

    # -- hosts ------------------------------------------------------------------------------------
    @property
    def multi_host(self) -> bool:
        """True when a `hosts:` section places the roles (each host's memory is then owned by its agent)."""
        return self.hosts is not None

    def host_map(self) -> dict[str, HostConfig]:
        """The hosts and their roles; without a `hosts:` section, one host "local" with every role."""
        if self.hosts is not None:
            return dict(self.hosts)
        return {"local": HostConfig(roles=[r for r in self.role_ids() if r != "controller"])}

    def host_of(self, role_id: str) -> str | None:
        """The host a role runs on (None for the controller when it is placed nowhere); agents: agent-<host>."""
        if role_id.startswith(AGENT_PREFIX):
            return role_id[len(AGENT_PREFIX):]
        for name, host in self.host_map().items():
            if role_id in host.roles:
                return name
        return None

    def session_host(self, session: int) -> str:
        return self.host_of(f"attn{session}")

    def ffn_host(self, rank: int) -> str:
        return self.host_of(f"ffn{rank}")

    def agent_ids(self) -> list[str]:
        """One window agent per host: it owns the host's device memory and applies other hosts' writes."""
        return [f"{AGENT_PREFIX}{h}" for h in self.host_map()]

    @property
    def passes(self) -> int:
        """Layer passes per micro-batch in the whole run (steps * layers)."""
        return self.steps * self.layers

    def summary_sizes(self) -> dict[str, Any]:
        return {"attention_window_bytes": self.attention_window_bytes(), "ffn_window_bytes": self.ffn_window_bytes(),
                "ffn_out_bytes": self.ffn_out_layout().total_bytes,
                "info_bytes_attention": align512(self.attention_layout().info_bytes),
                "info_bytes_ffn": align512(self.ffn_layout().info_bytes)}


DEFAULT_CONFIG: dict[str, Any] = {"name": "default"}


def _format_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    err = errors[0]
    same = [e for e in errors if e["loc"] and e["loc"][:-1] == err["loc"][:-1]]
    if err["loc"] and err["type"] != "extra_forbidden" and {e["loc"][-1] for e in same} == {"int", "float"}:
        # a number (int | float) that is neither: say the float branch's rule, at the key itself
        err = next(e for e in same if e["loc"][-1] == "float")
        err = {**err, "loc": err["loc"][:-1]}
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ": " in msg and not loc:
            loc, msg = msg.split(": ", 1)
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(err["loc"])
    elif err["type"] in {"int_type", "float_type", "string_type", "bool_type", "literal_error", "dict_type",
                         "list_type", "model_type", "finite_number", "greater_than", "greater_than_equal", "less_than",
                         "less_than_equal"}:
        msg = f"{msg} (got {err.get('input')!r})"
    return ConfigError(f"config: {loc or 'config'}", msg)


def _did_you_mean(loc: tuple) -> str:
    """' (did you mean X?)' for an unknown key close to a real one of its section, else ''."""
    import difflib
    model = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars/lists (so 8, true, bf16, [1,2] all work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError("--set", f"expects key=value, got {assignment!r}")
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}", f"{p} is not a section")
    node[parts[-1]] = parse_value(value)


def load_dict(source: str | os.PathLike | dict | Config | None) -> dict:
    if source is None:
        return dict(DEFAULT_CONFIG)
    if isinstance(source, Config):
        return source.model_dump(exclude_none=True)
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    try:
        text = read_text(path, CONFIG_CAP, "a config")  # capped: a FIFO, /dev/zero or a binary is one line
    except InputError as exc:
        rule = exc.rule.replace("cannot read a config: ", "")
        raise ConfigError(f"config file {path}", f"cannot be read ({rule})" if exc.rule != rule else rule) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}", f"is not valid YAML{where} ({what})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}", "must hold a mapping of keys to values")
    data.setdefault("name", path.stem)
    return data


def load(source: str | os.PathLike | dict | Config | None = None, overrides: list[str] | None = None,
         **values: Any) -> Config:
    """Build a validated Config from a path, dict, Config or None (the built-in default), plus overrides."""
    data = load_dict(source)
    for assignment in overrides or []:
        apply_override(data, assignment)
    data.update(values)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc) from None
