"""Heartbeat files for container healthchecks: each role refreshes one while it lives; `python -m afd.health ROLE` checks its age.

Only when AFD_HEALTH_DIR is set (the image sets /tmp/afd-health): the file's mtime is the role's last heartbeat
(the same cadence as its control-plane heartbeat), and its text the role's phase (joining, running, ...). Exit 0 when
the file is younger than --max-age seconds (and the phase is one of --phase, if given), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ENV = "AFD_HEALTH_DIR"


def path(role: str) -> str | None:
    root = os.environ.get(ENV)
    return os.path.join(root, role) if root else None


def beat(role: str, phase: str) -> None:
    """Refresh the role's heartbeat file (cheap; best effort)."""
    p = path(role)
    if p is None:
        return
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp"
        with open(tmp, "w") as f:
            f.write(phase)
        os.replace(tmp, p)
    except OSError:
        pass


def check(role: str, max_age: float, phases: list[str] | None = None) -> tuple[bool, str]:
    p = path(role) or os.path.join("/tmp/afd-health", role)
    try:
        age = time.time() - os.stat(p).st_mtime
        with open(p) as f:
            phase = f.read().strip()
    except OSError:
        return False, f"{role}: no heartbeat file {p}"
    if age > max_age:
        return False, f"{role}: last heartbeat {age:.1f}s ago (phase {phase})"
    if phases and phase not in phases:
        return False, f"{role}: phase {phase}, waiting for {'/'.join(phases)}"
    return True, f"{role}: healthy, heartbeat {age:.1f}s ago (phase {phase})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afd.health", description=__doc__.splitlines()[0])
    parser.add_argument("role", help="role id, e.g. sched0, ffn1, agent-attn, controller")
    parser.add_argument("--max-age", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--phase", action="append", default=[], help="accept only these phases (repeatable)")
    args = parser.parse_args(argv)
    ok, message = check(args.role, args.max_age, args.phase or None)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
