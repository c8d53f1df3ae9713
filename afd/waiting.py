"""The wait policy every polling op runs between scans: spin, then block; housekeeping, stop checks, the stall watchdog.

The ops (afd.ops) poll shared memory and call `idle(waiting)` between scans; this is that `idle`. It is the same
object for a role process (which adds a controller, heartbeats and a doorbell through its callbacks) and for the
torch front-end (which has no controller), so both wait, stop and time out alike.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from .errors import AfdError
from .ops._polling import Stopped, Waiting

# Ops that re-read run_flag themselves: on a stop they return OK (as the real kernels do) instead of being interrupted.
RUN_FLAG_OPS = frozenset({"attention_worker_scheduler_", "ffn_worker_scheduler_"})


class Stall(AfdError):
    """A wait outlived the stall watchdog: what was awaited never arrived. `details` may name what is missing."""

    def __init__(self, who: str, waiting: Waiting, seconds: float, details: list[dict] | None = None):
        self.waiting = waiting
        self.seconds = seconds
        self.details = details
        rule = (f"stalled {seconds:.1f}s waiting for {waiting.what} of micro_batch_id {waiting.micro_batch_id} "
                f"({waiting.ready}/{waiting.needed} ready)")
        texts = [d["text"] for d in details or () if "text" in d]
        if texts:  # what the waiter could name: which flags are missing and who owed them
            rule += "; missing: " + ", ".join(texts[:4]) + (f" ... ({len(texts)} in all)" if len(texts) > 4 else "")
        super().__init__(f"{who}: {waiting.op}", rule)


def _nap(timeout_ms: int) -> None:
    time.sleep(timeout_ms / 1000.0)


class WaitPolicy:
    """`idle(waiting)` for the ops: spin (sched_yield) for `spin_us`, then block in bounded slices; every
    `service_interval_s` run the housekeeping and the stop check; past the stall bound raise Stall.

    Callbacks (all optional):
      block(timeout_ms)    wait for a wake-up (a doorbell) or the timeout; default: sleep, growing from 50 us to 1 ms
      service(now_ns)      housekeeping between slices (heartbeats, control messages); may raise to end the wait
      stop_reason()        a reason string when the wait must end; ops that re-read run_flag (RUN_FLAG_OPS) are left
                           to see run_flag themselves and return OK
      stall_factor(w)      a multiplier of the stall bound for one wait (waits that are consequences get longer)
      on_wait(w)           called when a new wait starts
      explain(w)           what is missing, attached to the Stall as `details`
    """

    def __init__(self, who: str, *, spin_us: float = 50.0, stall_timeout_s: float = 2.0,
                 service_interval_s: float = 0.01, spin_only: bool = False,
                 block: Callable[[int], None] | None = None, service: Callable[[int], None] | None = None,
                 stop_reason: Callable[[], str | None] | None = None,
                 stall_factor: Callable[[Waiting], float] | None = None,
                 on_wait: Callable[[Waiting], None] | None = None,
                 explain: Callable[[Waiting], list[dict] | None] | None = None):
        self.who = who
        self.spin_ns = int(spin_us * 1000)
        self.stall_ns = int(stall_timeout_s * 1e9)
        self.service_ns = max(1, int(service_interval_s * 1e9))
        self.spin_only = spin_only
        self.block = block
        self.service = service
        self.stop_reason = stop_reason
        self.stall_factor = stall_factor
        self.on_wait = on_wait
        self.explain = explain
        self.wait_start = self.wait_last = 0  # perf_counter_ns of the current (or last) wait: busy/wait accounting
        self.what = ""
        self.next_service = 0
        self._nap_ms = 0.05
        self._graced = None  # the wait_start of the wait that had its one extra scan

    def __call__(self, waiting: Waiting) -> None:
        now = self.wait_last = time.perf_counter_ns()  # CLOCK_MONOTONIC on Linux, like the events
        if waiting.iterations <= 1:
            self.wait_start = now
            self.what = waiting.what
            self._nap_ms = 0.05
            if self.on_wait is not None:
                self.on_wait(waiting)
        waited = now - self.wait_start
        if now < self.next_service and (self.spin_only or waited < self.spin_ns):
            os.sched_yield()
            # the wait lasts until here: on a loaded machine a yield hands the core over for a whole time slice,
            # which the op's busy time would otherwise count (ffn_worker_scheduler_ showed ~0.9 ms "busy" a call)
            self.wait_last = time.perf_counter_ns()
            return
        self.next_service = now + self.service_ns // 5
        if self.service is not None:
            self.service(now)
        if self.stop_reason is not None:
            reason = self.stop_reason()
            if reason is not None and waiting.op not in RUN_FLAG_OPS:
                raise Stopped(waiting, reason)
        limit = self.limit_ns(waiting)
        if waited > limit:
            if waiting.flags is not None:  # the op counts only now and then: take the count the report shows
                waiting.ready = int(np.count_nonzero(waiting.flags == 1))
                if waiting.needed and waiting.ready >= waiting.needed and self._graced != self.wait_start:
                    # nothing is missing now: the last stores landed just after the op's last scan. Let it scan
                    # again, once per wait (an op whose condition still fails then stalls at the next call)
                    self._graced = self.wait_start
                    return
            details = self.explain(waiting) if self.explain is not None else None
            raise Stall(self.who, waiting, waited / 1e9, details)
        if not self.spin_only and waited >= self.spin_ns:
            timeout_ms = min(self.service_ns, limit - waited) // 1_000_000 + 1
            if self.block is not None:
                self.block(timeout_ms)
            else:
                _nap(min(timeout_ms, self._nap_ms))
                self._nap_ms = min(1.0, self._nap_ms * 2)
            self.wait_last = time.perf_counter_ns()

    def limit_ns(self, waiting: Waiting) -> int:
        """The stall bound of this wait."""
        factor = self.stall_factor(waiting) if self.stall_factor is not None else 1.0
        return int(self.stall_ns * factor)

    @property
    def waited_ns(self) -> int:
        """Length of the current (or last) wait."""
        return self.wait_last - self.wait_start
