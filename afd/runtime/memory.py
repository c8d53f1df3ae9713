"""Every device allocation of one run (windows, contexts, session streams, status table, outputs) and how roles attach."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import comm
from ..config import TOKEN_DTYPE_CODE, Config
from ..device import Device
from ..layout import ScheduleContext
from ..ops.schedule_context import create_schedule_context_holder

# Session stream counters: device events between the roles of one attention session (aclrtRecordEvent-like).
SCHED_DONE, COMBINE_DONE, A2F_DONE = 0, 1, 2
STATUS_FIELDS = ("pid", "state", "step", "layer", "micro_batch", "op", "heartbeat_ns", "progress", "busy_ns",
                 "wait_ns", "stall", "exit_code", "fault_ns")
STATUS = {name: i for i, name in enumerate(STATUS_FIELDS)}
STATE_NAMES = ["new", "registered", "running", "stopping", "exited", "failed", "hung"]
OP_NAMES = ["idle", "attention", "attention_to_ffn", "attention_worker_scheduler_", "attention_worker_combine",
            "ffn_worker_scheduler_", "ffn_worker_batching", "experts", "ffn_to_attention", "wait"]
OP = {name: i for i, name in enumerate(OP_NAMES)}


@dataclass(frozen=True)
class SessionStreamLayout:
    """Per-session shared area: counters int64[16], F2A last-flag times int64[F, M], scales f32[M,BS,K],
    expert ids i32[M,BS,K] (for diagnosis), y [M,BS,H]."""

    ffn_ranks: int
    micro_batch_num: int
    micro_batch_size: int
    top_k: int
    hidden_size: int
    itemsize: int

    @property
    def f2a_offset(self) -> int:
        return 128

    @property
    def scales_offset(self) -> int:
        return self.f2a_offset + 8 * self.ffn_ranks * self.micro_batch_num

    @property
    def ids_offset(self) -> int:
        return self.scales_offset + 4 * self.micro_batch_num * self.micro_batch_size * self.top_k

    @property
    def y_offset(self) -> int:
        raw = self.ids_offset + 4 * self.micro_batch_num * self.micro_batch_size * self.top_k
        return (raw + 63) // 64 * 64

    @property
    def total_bytes(self) -> int:
        return self.y_offset + self.micro_batch_num * self.micro_batch_size * self.hidden_size * self.itemsize


DIGEST_RING = 4096  # step outputs kept for the reference check: a long run keeps the newest


def digest_rows(config: Config) -> int:
    return min(config.steps, DIGEST_RING)


class SessionStream:
    """Views over one session's stream area."""

    def __init__(self, buf: np.ndarray, layout: SessionStreamLayout, dtype: np.dtype):
        L = layout
        self.counters = buf[:128].view(np.int64)
        self.f2a_last_flag_ns = buf[L.f2a_offset:L.scales_offset].view(np.int64).reshape(L.ffn_ranks,
                                                                                          L.micro_batch_num)
        shape = (L.micro_batch_num, L.micro_batch_size, L.top_k)
        self.scales = buf[L.scales_offset:L.ids_offset].view(np.float32).reshape(shape)
        self.expert_ids = buf[L.ids_offset:L.ids_offset + 4 * int(np.prod(shape))].view(np.int32).reshape(shape)
        self.y = buf[L.y_offset:L.total_bytes].view(dtype).reshape(L.micro_batch_num, L.micro_batch_size,
                                                                   L.hidden_size)


class RunMemory:
    """The run's device memory: created by the launcher (owner), attached by roles from the plan."""

    def __init__(self, config: Config, device: Device, plan: dict, host: str | None = None):
        self.cfg = config
        self.device = device
        self.plan = plan
        self.host = host  # None: one host holds everything (the launcher's fast path)
        c = config
        self.local_sessions = [s for s in range(c.sessions) if host is None or c.session_host(s) == host]
        self.local_ranks = [f for f in range(c.ffn_ranks) if host is None or c.ffn_host(f) == host]
        self.remote = None  # host -> afd.comm_remote.AgentLink, set by the role runtime for other hosts' windows
        from ..tokens import X_DTYPE_BY_NAME  # (here: ml_dtypes is a slow import `afd check` never needs)
        self.dtype = X_DTYPE_BY_NAME[config.token_dtype]
        c = config
        self.stream_layout = SessionStreamLayout(c.ffn_ranks, c.micro_batch_num, c.micro_batch_size, c.top_k,
                                                 c.hidden_size, c.itemsize)
        self.roles = plan["roles"]
        self.role_index = {r: i for i, r in enumerate(self.roles)}
        self._ctx: dict = {}

    # -- creation (owner) ----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Config, device: Device, host: str | None = None) -> "RunMemory":
        """Allocate the run's memory (host None), or one host's part of it: the windows, contexts and streams of the
        sessions and FFN ranks placed there (None entries for the others), a status table, digests and outputs."""
        c = config
        holders = []
        plan: dict = {"namespace": device.namespace, "roles": c.role_ids(), "attention": [], "ffn": []}
        try:
            common = dict(session_num=c.sessions, micro_batch_num=c.micro_batch_num,
                          micro_batch_size=c.micro_batch_size, selected_expert_num=c.selected,
                          expert_num=c.expert_num, attn_to_ffn_token_size=c.token_bytes,
                          ffn_to_attn_token_size=c.token_bytes, device=device)
            for s in range(c.sessions):
                if host is not None and c.session_host(s) != host:
                    plan["attention"].append(None)
                    continue
                win = device.malloc(c.attention_window_bytes())
                holder = create_schedule_context_holder(1, **common, attention_window=win.address,
                                                        attention_window_size=win.size)
                holder.init()
                holders.append(holder)
                stream = device.malloc(SessionStreamLayout(c.ffn_ranks, c.micro_batch_num, c.micro_batch_size,
                                                           c.top_k, c.hidden_size, c.itemsize).total_bytes)
                plan["attention"].append({"window": win.address, "window_size": win.size,
                                          "context": holder.get_schedule_context().address,
                                          "stream": stream.address, **({"host": host} if host else {})})
            for f in range(c.ffn_ranks):
                if host is not None and c.ffn_host(f) != host:
                    plan["ffn"].append(None)
                    continue
                win = device.malloc(c.ffn_window_bytes())
                holder = create_schedule_context_holder(0, **common, ffn_window=win.address,
                                                        ffn_window_size=win.size)
                holder.init()
                holders.append(holder)
                plan["ffn"].append({"window": win.address, "window_size": win.size,
                                    "context": holder.get_schedule_context().address,
                                    **({"host": host} if host else {})})
            plan["status"] = device.malloc(8 * len(STATUS_FIELDS) * len(plan["roles"])).address
            plan["digests"] = device.malloc(8 * digest_rows(c) * c.sessions * c.micro_batch_num).address
            plan["outputs"] = device.malloc(c.sessions * c.micro_batch_num * c.micro_batch_size * c.token_bytes).address
        except BaseException:
            device.close()
            raise
        mem = cls(config, device, plan, host)
        mem._holders = holders
        return mem

    @classmethod
    def attach(cls, config: Config, plan: dict, host: str | None = None) -> "RunMemory":
        """Attach from a plan: a one-host plan, or (multi-host) the full plan seen from `host`."""
        if "hosts" in plan:
            if host not in plan["hosts"]:
                raise ValueError(f"host {host!r} is not in the run's plan (hosts {sorted(plan['hosts'])})")
            plan = {**plan, **plan["hosts"][host]}
        else:
            host = None
        return cls(config, Device(plan["namespace"]), plan, host)

    @staticmethod
    def merge_parts(base: dict, parts: dict[str, dict], transports: dict[str, str]) -> dict:
        """The full multi-host plan from each host's part (RunMemory.create(host=...).plan) and agent endpoint."""
        plan = dict(base)
        for kind in ("attention", "ffn"):
            n = max(len(p[kind]) for p in parts.values())
            plan[kind] = [next((p[kind][i] for p in parts.values() if p[kind][i] is not None), None)
                          for i in range(n)]
        plan["hosts"] = {h: {"namespace": p["namespace"], "status": p["status"], "digests": p["digests"],
                             "outputs": p["outputs"], "transport": transports[h]} for h, p in parts.items()}
        return plan

    def close(self) -> None:
        self.device.close()

    # -- views ---------------------------------------------------------------------------------------
    def attention_context(self, session: int) -> ScheduleContext:
        key = ("a", session)
        if key not in self._ctx:
            self._local("attention", session)
            self._ctx[key] = ScheduleContext.on_device(self.device, self.plan["attention"][session]["context"])
        return self._ctx[key]

    def ffn_context(self, rank: int) -> ScheduleContext:
        key = ("f", rank)
        if key not in self._ctx:
            self._local("ffn", rank)
            self._ctx[key] = ScheduleContext.on_device(self.device, self.plan["ffn"][rank]["context"])
        return self._ctx[key]

    def contexts(self) -> list[ScheduleContext]:
        """This host's contexts (all of them on one host)."""
        return ([self.attention_context(s) for s in self.local_sessions]
                + [self.ffn_context(f) for f in self.local_ranks])

    def stop_all(self) -> None:
        """run_flag = 0 in every context of the run (of this host when the run spans several; the other hosts' roles
        and agents write their own on the broadcast stop): the truth every poll re-reads, as stop_schedule() does."""
        for ctx in self.contexts():
            ctx.i32[128 // 4] = 0

    def _local(self, kind: str, index: int) -> None:
        if index not in (self.local_sessions if kind == "attention" else self.local_ranks):
            raise ValueError(f"the {kind} memory of {index} is on host {self.plan[kind][index].get('host')}, "
                             f"not on this host ({self.host}): only its agent and roles there can map it")

    def stream(self, session: int) -> SessionStream:
        self._local("attention", session)
        addr = self.plan["attention"][session]["stream"]
        buf = self.device.view(addr, self.stream_layout.total_bytes, field="session stream")
        return SessionStream(buf, self.stream_layout, self.dtype)

    def status(self) -> np.ndarray:
        n = len(self.roles)
        return self.device.view(self.plan["status"], 8 * len(STATUS_FIELDS) * n, np.int64,
                                field="status").reshape(n, len(STATUS_FIELDS))

    def digests(self) -> np.ndarray:
        """A ring [rows, A, M] uint64 over the newest steps: high 32 bits = step + 1 (0 = empty), low 32 = crc."""
        c = self.cfg
        rows = digest_rows(c)
        return self.device.view(self.plan["digests"], 8 * rows * c.sessions * c.micro_batch_num, np.uint64,
                                field="digests").reshape(rows, c.sessions, c.micro_batch_num)

    def units_done(self) -> list[int]:
        """Per session: micro-batch layer passes combined so far (from the status table)."""
        status = self.status()
        return [int(status[self.role_index[f"combine{s}"]][STATUS["progress"]]) for s in range(self.cfg.sessions)]

    def steps_done(self) -> int:
        """Steps every micro-batch of every session has completed."""
        per_step = self.cfg.layers * self.cfg.micro_batch_num
        return min(u // per_step for u in self.units_done())

    def outputs(self) -> np.ndarray:
        c = self.cfg
        return self.device.view(self.plan["outputs"], c.sessions * c.micro_batch_num * c.micro_batch_size
                                * c.token_bytes, self.dtype, field="outputs").reshape(
            c.sessions, c.micro_batch_num, c.micro_batch_size, c.hidden_size)

    def group(self, notify=None) -> comm.Group:
        """The HCCL group: FFN ranks 0..F-1, then attention ranks. A window in this host's memory is a LocalWindow;
        one owned by another host is a RemoteWindow whose puts travel to that host's agent (afd.comm_remote)."""
        windows = {}
        for f, a in enumerate(self.plan["ffn"]):
            windows[f] = self._window(a, f in self.local_ranks)
        for s, a in enumerate(self.plan["attention"]):
            windows[self.cfg.attention_rank(s)] = self._window(a, s in self.local_sessions)
        return comm.Group(f"afd-{self.plan.get('run', self.plan['namespace'])}", self.cfg.world_size, windows, notify)

    def _window(self, entry: dict, local: bool):
        if local:
            return comm.LocalWindow(self.device, entry["window"], entry["window_size"])
        from ..comm_remote import RemoteWindow
        return RemoteWindow(self._link(entry["host"]), entry["window"], entry["window_size"])

    def _link(self, host: str):
        if self.remote is None:
            raise ValueError(f"host {self.host}: a window on host {host} needs a link to its agent (none set)")
        return self.remote(host)

    def f2a_stamps(self, session: int, rank: int):
        """Where FFN rank `rank` stamps its last F2A flag store per micro-batch of `session` (for hop latency):
        `stamp(micro_batches, t_ns)`, a plain store on this host, an ordered put to the session host's agent
        otherwise (sent before the flags, so a reader never sees flags without their stamp), which stamps its own
        time when it applies it: the reader's clock, right before the flags' store; the F2A data sent ahead of the
        flags is then not in the hop (the agent's `f2a_put_to_store_ns` samples hold the writer's put -> store)."""
        M = self.cfg.micro_batch_num
        if session in self.local_sessions:
            row = self.stream(session).f2a_last_flag_ns[rank]

            def stamp(mbs, t_ns: int) -> None:
                row[mbs] = t_ns
            return stamp
        from ..comm_remote import RemoteWindow
        entry = self.plan["attention"][session]
        region = RemoteWindow(self._link(entry["host"]), entry["stream"] + self.stream_layout.f2a_offset,
                              8 * self.cfg.ffn_ranks * M)
        return lambda mbs, t_ns: region.put_stamp(8 * rank * M, mbs, t_ns)  # the owner's time of the store

    def regions(self) -> dict:
        """What other hosts may write here (an agent's whitelist): this host's windows and F2A stamp areas."""
        from ..comm_remote import LocalRegion
        out = {}
        for f in self.local_ranks:
            a = self.plan["ffn"][f]
            out[a["window"]] = LocalRegion(self.device, a["window"], a["window_size"])
        for s in self.local_sessions:
            a = self.plan["attention"][s]
            out[a["window"]] = LocalRegion(self.device, a["window"], a["window_size"])
            stamps = a["stream"] + self.stream_layout.f2a_offset
            out[stamps] = LocalRegion(self.device, stamps, 8 * self.cfg.ffn_ranks * self.cfg.micro_batch_num)
        return out

    def fault_times(self) -> dict[str, int]:
        """When each role fired its fault (monotonic ns, 0 = never), from the status table."""
        status = self.status()
        return {role: int(status[i][STATUS["fault_ns"]]) for role, i in self.role_index.items()}

    def expert_rank_table(self) -> np.ndarray:
        """[L, E+1, 1+2*F] int32: per expert [count, rank_0, local_0, ...]; local id = layer*n_local + j, or j alone
        with the snapshot receive (950 async), whose batching adds layer*n_local itself from the record's layer."""
        c = self.cfg
        width = 1 + 2 * c.ffn_ranks
        table = np.zeros((c.layers, c.expert_num, width), dtype=np.int32)
        local = {f: c.experts_on(f) for f in range(c.ffn_ranks)}
        for layer in range(c.layers):
            for e in range(c.expert_num):
                ranks = c.placement_of(e)
                table[layer, e, 0] = len(ranks)
                for i, f in enumerate(ranks):
                    table[layer, e, 1 + 2 * i] = f
                    table[layer, e, 2 + 2 * i] = (0 if c.snapshot_receive else layer * len(local[f])) \
                        + local[f].index(e)
        return table

    @property
    def token_dtype_code(self) -> int:
        return TOKEN_DTYPE_CODE[self.cfg.token_dtype]
