"""Every device allocation of one run (windows, contexts, session streams, status table, outputs) and how roles attach."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import comm
from ..config import TOKEN_DTYPE_CODE, Config
from ..device import Device
from ..layout import ScheduleContext
from ..model import DTYPES
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

    def __init__(self, config: Config, device: Device, plan: dict):
        self.cfg = config
        self.device = device
        self.plan = plan
        self.dtype = DTYPES[config.token_dtype]
        c = config
        self.stream_layout = SessionStreamLayout(c.ffn_ranks, c.micro_batch_num, c.micro_batch_size, c.top_k,
                                                 c.hidden_size, c.itemsize)
        self.roles = plan["roles"]
        self.role_index = {r: i for i, r in enumerate(self.roles)}
        self._ctx: dict = {}

    # -- creation (owner) ----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Config, device: Device) -> "RunMemory":
        c = config
        holders = []
        plan: dict = {"namespace": device.namespace, "roles": c.role_ids(), "attention": [], "ffn": []}
        try:
            common = dict(session_num=c.sessions, micro_batch_num=c.micro_batch_num,
                          micro_batch_size=c.micro_batch_size, selected_expert_num=c.selected,
                          expert_num=c.expert_num, attn_to_ffn_token_size=c.token_bytes,
                          ffn_to_attn_token_size=c.token_bytes, device=device)
            for _ in range(c.sessions):
                win = device.malloc(c.attention_window_bytes())
                holder = create_schedule_context_holder(1, **common, attention_window=win.address,
                                                        attention_window_size=win.size)
                holder.init()
                holders.append(holder)
                stream = device.malloc(SessionStreamLayout(c.ffn_ranks, c.micro_batch_num, c.micro_batch_size,
                                                           c.top_k, c.hidden_size, c.itemsize).total_bytes)
                plan["attention"].append({"window": win.address, "window_size": win.size,
                                          "context": holder.get_schedule_context().address,
                                          "stream": stream.address})
            for _ in range(c.ffn_ranks):
                win = device.malloc(c.ffn_window_bytes())
                holder = create_schedule_context_holder(0, **common, ffn_window=win.address,
                                                        ffn_window_size=win.size)
                holder.init()
                holders.append(holder)
                plan["ffn"].append({"window": win.address, "window_size": win.size,
                                    "context": holder.get_schedule_context().address})
            plan["status"] = device.malloc(8 * len(STATUS_FIELDS) * len(plan["roles"])).address
            n = c.steps * c.sessions * c.micro_batch_num
            plan["digests"] = device.malloc(8 * n).address
            plan["outputs"] = device.malloc(c.sessions * c.micro_batch_num * c.micro_batch_size * c.token_bytes).address
        except BaseException:
            device.close()
            raise
        mem = cls(config, device, plan)
        mem._holders = holders
        return mem

    @classmethod
    def attach(cls, config: Config, plan: dict) -> "RunMemory":
        return cls(config, Device(plan["namespace"]), plan)

    def close(self) -> None:
        self.device.close()

    # -- views ---------------------------------------------------------------------------------------
    def attention_context(self, session: int) -> ScheduleContext:
        key = ("a", session)
        if key not in self._ctx:
            self._ctx[key] = ScheduleContext.on_device(self.device, self.plan["attention"][session]["context"])
        return self._ctx[key]

    def ffn_context(self, rank: int) -> ScheduleContext:
        key = ("f", rank)
        if key not in self._ctx:
            self._ctx[key] = ScheduleContext.on_device(self.device, self.plan["ffn"][rank]["context"])
        return self._ctx[key]

    def contexts(self) -> list[ScheduleContext]:
        return ([self.attention_context(s) for s in range(self.cfg.sessions)]
                + [self.ffn_context(f) for f in range(self.cfg.ffn_ranks)])

    def stop_all(self) -> None:
        """run_flag = 0 in every context of the run: the truth every poll re-reads (as stop_schedule() writes it)."""
        for ctx in self.contexts():
            ctx.i32[128 // 4] = 0

    def stream(self, session: int) -> SessionStream:
        addr = self.plan["attention"][session]["stream"]
        buf = self.device.view(addr, self.stream_layout.total_bytes, field="session stream")
        return SessionStream(buf, self.stream_layout, self.dtype)

    def status(self) -> np.ndarray:
        n = len(self.roles)
        return self.device.view(self.plan["status"], 8 * len(STATUS_FIELDS) * n, np.int64,
                                field="status").reshape(n, len(STATUS_FIELDS))

    def digests(self) -> np.ndarray:
        """[steps, A, M] uint64: bit 32 set = written, low 32 bits = the crc of that step output."""
        c = self.cfg
        return self.device.view(self.plan["digests"], 8 * c.steps * c.sessions * c.micro_batch_num, np.uint64,
                                field="digests").reshape(c.steps, c.sessions, c.micro_batch_num)

    def outputs(self) -> np.ndarray:
        c = self.cfg
        return self.device.view(self.plan["outputs"], c.sessions * c.micro_batch_num * c.micro_batch_size
                                * c.token_bytes, self.dtype, field="outputs").reshape(
            c.sessions, c.micro_batch_num, c.micro_batch_size, c.hidden_size)

    def group(self, notify=None) -> comm.Group:
        """The HCCL group: FFN ranks 0..F-1, then attention ranks; windows in this host's memory."""
        windows = {}
        for f, a in enumerate(self.plan["ffn"]):
            windows[f] = comm.LocalWindow(self.device, a["window"], a["window_size"])
        for s, a in enumerate(self.plan["attention"]):
            windows[self.cfg.attention_rank(s)] = comm.LocalWindow(self.device, a["window"], a["window_size"])
        return comm.Group(f"afd-{self.plan['namespace']}", self.cfg.world_size, windows, notify)

    def expert_rank_table(self) -> np.ndarray:
        """[L, E+1, 1+2*F] int32: per expert [count, rank_0, local_0, ...]; local id = layer*n_local + j."""
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
                    table[layer, e, 2 + 2 * i] = layer * len(local[f]) + local[f].index(e)
        return table

    @property
    def token_dtype_code(self) -> int:
        return TOKEN_DTYPE_CODE[self.cfg.token_dtype]
