"""Run a script under `afd npu -- torchrun` and read back each rank's exit code and output (the pytest fixture).

One torchrun per node (static rendezvous on loopback for several nodes: each node is its own shared-memory
namespace, as on separate machines). `--tee 3` prefixes every line of a rank's output with `[default<local
rank>]:`; torchrun's failure summary gives the exit code of each rank that failed. Every job runs in a session of
its own, so whatever it started can be found and ended afterwards.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import procfs

_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")
_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_ROOT_CAUSE = re.compile(r"^\s*Root Cause")
_TRACEBACK = "Traceback (most recent call last):"
_ANNOUNCE = re.compile(r"^\[afd npu [^\]]*\] ")  # afd.npu.watchdog.announce: said the moment it happened
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Exit|Interrupt|Gone|Stall|Stopped|Orphaned)(:|$)")
FIRST_ERROR_LINES = 40  # of one rank's first error in a failure message


@dataclass
class RankResult:
    exit_code: int | None  # None: unknown (torchrun failed before reporting this rank)
    output: str

    def first_error(self) -> str:
        """This rank's own first error: what afd npu announced first, then its first traceback up to the
        exception and its message (or, without a traceback, the first exception line); "" if it shows none."""
        lines = self.output.splitlines()
        out: list[str] = []
        for i, line in enumerate(lines):
            if _ANNOUNCE.match(line) and not out:
                out.append(line)
            elif line.startswith(_TRACEBACK) or _ERROR_LINE.match(line):
                out += _error_block(lines, i)
                break
        if len(out) > FIRST_ERROR_LINES:
            out = out[:FIRST_ERROR_LINES // 2] + ["  ..."] + out[-FIRST_ERROR_LINES // 2:]
        return "\n".join(out)


def _error_block(lines: list[str], start: int) -> list[str]:
    """The traceback (or bare exception line) at `start`: up to its exception line, with the message lines that
    follow it (until a blank line or another traceback)."""
    i = start + 1 if lines[start].startswith(_TRACEBACK) else start
    while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
        i += 1  # the frames (indented)
    end = i + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith(_TRACEBACK) and \
            end - i < FIRST_ERROR_LINES:
        end += 1
    return lines[start:end]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


@dataclass
class TorchrunResult:
    returncode: int
    ranks: dict[int, RankResult]
    output: str
    timed_out: bool = False
    seconds: float = 0.0
    nodes: list[str] = field(default_factory=list)
    root_causes: list[int] = field(default_factory=list)  # the ranks torchrun names as the first observed failure

    def rank(self, r: int) -> RankResult:
        return self.ranks[r]

    def failure(self, tail: int = 3000) -> str:
        """Why the job failed, for an assertion message: each failing rank's own first error, the rank torchrun
        names as the root cause first, then the last `tail` characters of the whole output."""
        failing = [r for r in sorted(self.ranks) if self.ranks[r].exit_code not in (0, None)]
        unknown = [r for r in sorted(self.ranks) if self.ranks[r].exit_code is None and self.ranks[r].first_error()]
        order = [r for r in self.root_causes if r in self.ranks]
        order += [r for r in failing + unknown if r not in order]
        head = [f"torchrun job {'timed out' if self.timed_out else 'failed'} after {self.seconds:.1f} s "
                f"(exit code {self.returncode})"]
        for r in order:
            rank = self.ranks[r]
            cause = " (torchrun's root cause)" if r in self.root_causes else ""
            error = rank.first_error()
            head.append(f"--- rank {r}{cause}, {_exit_text(rank.exit_code)}: "
                        + (f"its first error:\n{error}" if error else "no error in its output"))
        return "\n".join(head) + f"\n--- the last {tail} characters of the output:\n" + self.output[-tail:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """The live processes of session sid (zombies have exited already)."""
    return [p.pid for p in procfs.session(sid) if p.state != "Z"]


class TorchrunJob:
    def __init__(self, script: str, args: list[str], nproc: int = 2, nnodes: int = 1, env: dict | None = None,
                 work_dir: Path | None = None, afd_options: list[str] | None = None):
        self.script, self.args, self.nproc, self.nnodes = script, args, nproc, nnodes
        self.env = {**os.environ, **(env or {})}
        self.work_dir = Path(work_dir) if work_dir else None
        self.afd_options = afd_options or []
        self.procs: list[subprocess.Popen] = []

    def commands(self) -> list[list[str]]:
        base = [sys.executable, "-m", "afd", "npu", *self.afd_options, "--", sys.executable, "-m",
                "torch.distributed.run", "--tee", "3", "--nproc-per-node", str(self.nproc)]
        if self.nnodes == 1:
            return [base + ["--standalone", self.script, *self.args]]
        port = free_port()
        return [base + ["--nnodes", str(self.nnodes), "--node-rank", str(i), "--master-addr", "127.0.0.1",
                        "--master-port", str(port), self.script, *self.args] for i in range(self.nnodes)]

    def run(self, timeout: float = 180.0) -> TorchrunResult:
        t0 = time.monotonic()
        if self.work_dir:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        outs = []
        for cmd in self.commands():
            f = open(self.work_dir / f"node{len(outs)}.log", "w+") if self.work_dir else subprocess.PIPE
            outs.append(f)
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                               start_new_session=True))
        timed_out = False
        deadline = t0 + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill()
                codes.append(proc.wait(10))
        texts = []
        for f, proc in zip(outs, self.procs):
            if f is subprocess.PIPE:
                texts.append(proc.stdout.read())
            else:
                f.seek(0)
                texts.append(f.read())
                f.close()
        ranks, roots = {}, []
        for node, (text, code) in enumerate(zip(texts, codes)):
            ranks.update(self._parse(node, text, code, roots))
        rc = next((c for c in codes if c != 0), 0)
        return TorchrunResult(rc, ranks, "\n".join(texts), timed_out, time.monotonic() - t0, texts, roots)

    def _parse(self, node: int, text: str, code: int, roots: list[int]) -> dict[int, RankResult]:
        """Each rank's lines and exit code from one node's output; the root-cause ranks torchrun names go to
        `roots`."""
        lines: dict[int, list[str]] = {i: [] for i in range(self.nproc)}
        exit_codes: dict[int, int | None] = {i: (0 if code == 0 else None) for i in range(self.nproc)}
        pending, root_next = None, False
        for line in text.splitlines():
            m = _LINE.match(line)
            if m:
                local = int(m.group(1))
                lines.setdefault(local, []).append(m.group(2))
                continue
            if _ROOT_CAUSE.match(line):
                root_next = True
                continue
            m = _FAILED_RANK.match(line)
            if m:
                pending = int(m.group(2))
                if root_next:
                    roots.append(node * self.nproc + pending)
                    root_next = False
                continue
            m = _EXITCODE.match(line)
            if m and pending is not None:
                exit_codes[pending] = int(m.group(1))
                pending = None
        return {node * self.nproc + local: RankResult(exit_codes.get(local), "\n".join(lines.get(local, [])))
                for local in lines}

    def _kill(self) -> None:
        for proc in self.procs:
            for pid in _session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> list[int]:
        """End whatever the job left (its sessions' processes); the pids that were still there."""
        left = [pid for proc in self.procs for pid in _session_members(proc.pid)]
        if left:
            self._kill()
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(10)
        return left
