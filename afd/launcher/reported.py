"""A multi-host run's memory as its agents reported it: what build_result reads (digests, outputs, status rows)."""
from __future__ import annotations

import base64

import numpy as np

from ..config import Config
from ..runtime import memory as memory_mod
from ..runtime.memory import STATUS, STATUS_FIELDS
from ..tokens import X_DTYPE_BY_NAME


class ReportedMemory:
    """The parts of RunMemory that build_result reads, rebuilt from the agents' final reports (no shared memory:
    the launcher, or a controller in a container, shares none with the hosts). Unreported sessions stay zero."""

    def __init__(self, config: Config, controller: dict | None):
        c = self.cfg = config
        controller = controller or {}
        reports = controller.get("reports", {})
        self.roles = c.role_ids()
        self.role_index = {r: i for i, r in enumerate(self.roles)}
        rows = memory_mod.digest_rows(c) if hasattr(memory_mod, "digest_rows") else c.steps
        self._digests = np.zeros((rows, c.sessions, c.micro_batch_num), np.uint64)
        self._outputs = np.zeros((c.sessions, c.micro_batch_num, c.micro_batch_size, c.hidden_size),
                                 X_DTYPE_BY_NAME[c.token_dtype])
        self._status = np.zeros((len(self.roles), len(STATUS_FIELDS)), np.int64)
        self.hosts: dict[str, dict] = {}
        for role, rep in reports.items():
            extra = rep.get("extra") or {}
            if "host" not in extra or "status" not in extra:
                continue  # not an agent
            self.hosts[extra["host"]] = {k: extra.get(k) for k in ("namespace", "transport", "applied", "refused")}
            for s, table in (extra.get("digests") or {}).items():
                self._digests[:, int(s), :] = np.asarray(table, dtype=np.uint64).reshape(rows, c.micro_batch_num)
            for s, data in (extra.get("outputs") or {}).items():
                self._outputs[int(s)] = np.frombuffer(base64.b64decode(data), self._outputs.dtype).reshape(
                    self._outputs.shape[1:])
            for r, row in (extra.get("status") or {}).items():
                if r in self.role_index:
                    self._status[self.role_index[r]] = [row.get(k, 0) for k in STATUS_FIELDS]
        # what a role reported itself is at least as new as its host's table at the agent's end
        for role, rep in reports.items():
            if role in self.role_index and "progress" in rep:
                row = self._status[self.role_index[role]]
                row[STATUS["progress"]] = max(int(row[STATUS["progress"]]), int(rep["progress"]))
                row[STATUS["fault_ns"]] = row[STATUS["fault_ns"]] or int(rep.get("fault_ns", 0))
        if "controller" in self.role_index:
            self._status[self.role_index["controller"]][STATUS["fault_ns"]] = int(
                controller.get("controller_fault_ns") or 0)

    def digests(self) -> np.ndarray:
        return self._digests

    def outputs(self) -> np.ndarray:
        return self._outputs

    def status(self) -> np.ndarray:
        return self._status

    def units_done(self) -> list[int]:
        return [int(self._status[self.role_index[f"combine{s}"]][STATUS["progress"]])
                for s in range(self.cfg.sessions)]

    def steps_done(self) -> int:
        per_step = self.cfg.layers * self.cfg.micro_batch_num
        return min(u // per_step for u in self.units_done())

    def fault_times(self) -> dict[str, int]:
        return {role: int(self._status[i][STATUS["fault_ns"]]) for role, i in self.role_index.items()}
