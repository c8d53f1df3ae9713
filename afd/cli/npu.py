"""`afd npu -- COMMAND ...`: run any command (python, torchrun, pytest) with the fake NPU in place.

In the command and every process it starts, `import torch` installs the fake (AFD_NPU=1 and torch's device-backend
entry point), and `import torch_npu` gives it (a `torch_npu` package first on PYTHONPATH). With --trace, every rank
writes its part of the timeline and this command merges them into one Chrome trace when the command ends.
Exit code: the command's (2 for a bad option or fault spec, 127 when the command cannot be started).
Without --trace the command replaces this process once the options are checked (exec): nothing waits in between,
and its exit status, a death by signal included, is this command's.
"""
from __future__ import annotations

import os
import sys

from ..errors import ConfigError

EXIT_NOT_FOUND = 127


def add_parser(sub) -> None:
    p = sub.add_parser("npu", help="run a command (python, torchrun, pytest) on the fake NPU: afd npu -- CMD ...")
    p.add_argument("--trace", metavar="FILE", help="write one Chrome trace of the whole job to FILE")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="a fault, e.g. drop-flag:rank0@call=2 (repeatable; adds to AFD_NPU_FAULTS)")
    p.add_argument("--stall-timeout", type=float, metavar="S",
                   help="the operators' stall bound in seconds (AFD_NPU_STALL_TIMEOUT_S, default 30)")
    p.add_argument("--soc", metavar="NAME", help="what torch.npu.get_device_name() says (default an A3 die)")
    p.add_argument("command", nargs="+", metavar="COMMAND", help="the command and its arguments (after --)")
    p.set_defaults(handler=main)


def environment(args, base: dict | None = None) -> dict:
    """The command's environment: the fake NPU switched on, the options as AFD_NPU_* variables."""
    from ..npu import ENV, SHIM_DIR
    from ..npu.faults import ENV as FAULTS_ENV
    from ..npu.faults import parse_env
    from ..npu.trace import ENV as TRACE_ENV
    from ..npu.watchdog import STALL_ENV, stall_timeout_s
    env = dict(os.environ if base is None else base)
    env[ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join([SHIM_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.fault:
        env[FAULTS_ENV] = ";".join(filter(None, [env.get(FAULTS_ENV, "")] + list(args.fault)))
    parse_env(env.get(FAULTS_ENV, ""))  # a bad spec is one line and exit 2, before anything starts
    if args.stall_timeout is not None:
        if not args.stall_timeout > 0:
            raise ConfigError("--stall-timeout", f"must be > 0, got {args.stall_timeout}")
        env[STALL_ENV] = str(args.stall_timeout)
    stall_timeout_s(env.get(STALL_ENV, ""))  # the check every rank makes, made here first
    if args.soc:
        env["AFD_NPU_SOC_NAME"] = args.soc
    if args.trace:
        env[TRACE_ENV] = os.path.abspath(args.trace)
    return env


def main(args) -> int:
    from ..npu.trace import ENV as TRACE_ENV
    command = args.command[1:] if args.command and args.command[0] == "--" else args.command
    if not command:
        raise ConfigError("COMMAND", "give the command to run after --, e.g. afd npu -- python script.py")
    env = environment(args)
    trace_out = env.get(TRACE_ENV)
    if not trace_out:
        try:
            os.execvpe(command[0], command, env)
        except OSError as exc:
            return _cannot_start(command, exc)
    return _run_and_merge(command, env, trace_out)


def _cannot_start(command: list[str], exc: OSError) -> int:
    print(f"afd npu: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
    return EXIT_NOT_FOUND


def _run_and_merge(command: list[str], env: dict, trace_out: str) -> int:
    """Run the command as a child (signals forwarded to it), then merge the ranks' trace parts into trace_out."""
    import shutil
    import signal
    import subprocess
    import tempfile

    from ..npu.trace import PARTS_ENV, merge
    out_dir = os.path.dirname(trace_out) or "."
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ConfigError("--trace", f"directory {out_dir!r} does not exist or is not writable")
    parts = env[PARTS_ENV] = tempfile.mkdtemp(prefix="afd-npu-trace-")
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        shutil.rmtree(parts, ignore_errors=True)
        return _cannot_start(command, exc)

    def forward(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        try:
            merge(parts, trace_out)
            print(f"afd npu: trace written to {trace_out}", file=sys.stderr)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    return code if code >= 0 else 128 - code
