"""What a polling op tells its wait policy between scans, and the faithful default policy."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Waiting:
    """The state of one op's poll: what it waits for and how far it got (read by watchdogs)."""

    op: str
    what: str
    micro_batch_id: int = -1
    ready: int = 0
    needed: int = 0
    iterations: int = 0
    flags: np.ndarray | None = field(default=None, repr=False)  # live view of the polled flags


Idle = Callable[[Waiting], None]


def sched_yield(_: Waiting) -> None:
    """The AICPU loop's idle step: give the core away, then scan again."""
    os.sched_yield()


class Stopped(Exception):
    """The poll ended because run_flag dropped to 0 or the wait policy stopped it."""

    def __init__(self, waiting: Waiting | None = None, reason: str = "run_flag is 0"):
        self.waiting = waiting
        self.reason = reason
        where = f"{waiting.op} waiting for {waiting.what}" if waiting is not None else "poll"
        super().__init__(f"{where} stopped: {reason}")
