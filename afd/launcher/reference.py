"""The reference check of a run's outputs: what the single-process model computes for the units the run wrote.

The launcher never computes it itself: the model's attention runs a numba kernel, and importing numba and loading
the kernels cost the launcher 0.5-1 s at the end of every run. A process forked from the fork server
(afd.launcher.forkserver) has both loaded already, so the launcher asks one (Checker, forked when the run starts)
and only compares."""
from __future__ import annotations

import time

# A stopped or failed run can have run for hours: only its newest units are checked, as many as fit this much of
# the checker's time (at least one), so the launcher exits promptly; a completed run is checked in full.
REFERENCE_BUDGET_S = 0.05


def reference(config_json: str, units, budget_s: float | None, finals: bool) -> dict:
    """Digests of `units` (an array of rows step, session, micro_batch) in their order until budget_s has passed (at
    least one; all when None), and, when `finals`, the final step's output of every (session, micro_batch)."""
    from ..config import Config
    from ..model import Model, digest

    cfg = Config.model_validate_json(config_json)
    model = Model(cfg)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    last = cfg.steps - 1
    digests, outputs = [], {}
    for t, s, m in units.tolist():
        y = model.forward(t, s, m)
        digests.append(digest(y))
        if finals and t == last:
            outputs[(s, m)] = y
        if deadline is not None and time.monotonic() > deadline:
            break
    if finals:
        outputs.update({(s, m): model.forward(last, s, m) for s in range(cfg.sessions)
                        for m in range(cfg.micro_batch_num) if (s, m) not in outputs})
    return {"digests": digests, "finals": outputs}


def _checker_entry(launcher: dict, conn) -> None:
    """Forked at the run's start: wait for the one request (or for the launcher's end: EOF), answer it, leave."""
    from .forkserver import adopt
    from .signals import ignore_stop_signals

    ignore_stop_signals()
    adopt(launcher)
    try:
        request = conn.recv()
    except (EOFError, OSError):
        return
    conn.send(reference(*request))
    conn.close()


class Checker:
    """The run's reference checker: a process forked from the fork server when the run starts (so the end of the run
    does not wait for a fork), idle until asked. `checker(config_json, units, budget_s, finals)` is reference() there;
    a checker that fails or runs out of time raises. close() ends and reaps it however far it got."""

    def __init__(self, ctx, launcher: dict):
        from .signals import blocked_stop_signals

        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_checker_entry, args=(launcher, child), name="reference", daemon=False)
        with blocked_stop_signals():
            self.proc.start()
        child.close()

    def __call__(self, config_json: str, units, budget_s: float | None, finals: bool,
                 timeout_s: float = 600.0) -> dict:
        try:
            self.conn.send((config_json, units, budget_s, finals))
            if not self.conn.poll(timeout_s):
                raise TimeoutError(f"the reference check took more than {timeout_s:g} s")
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(1.0)
            raise RuntimeError(f"the reference check failed (exit code {self.proc.exitcode})") from None

    def close(self) -> None:
        self.conn.close()  # an idle checker reads EOF and leaves
        self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc.close()
