"""The `afd` command line: one subcommand module each, all errors as one clear line with exit code 2."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from ..errors import AfdError

# subcommand -> module under afd.cli that defines add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "run": "run",
    "stop": "stop",
    "role": "role",
    "check": "check",
    "context": "context",
    "bench": "bench",
    "predict": "predict",
    "faults": "faults",
    "npu": "npu",
    "clean": "clean",
}

EXIT_USAGE = 2


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): config overrides, the same for every subcommand that takes a config."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set micro_batch_num=3")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, no usage dump
        print(f"afd: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of the one argv names (its module alone is imported). A subcommand module
    imports what its handler needs inside the handler, so building a parser stays cheap: `afd --help`, `afd stop`
    and the like start in a blink (numpy, pydantic, zmq, rich ... load only for a command that uses them)."""
    parser = _Parser(prog="afd", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    argv = sys.argv[1:] if argv is None else argv
    named = argv[0] if argv and argv[0] in SUBCOMMANDS else None  # (the top level has no option but -h)
    for name, module in SUBCOMMANDS.items():
        if named and name != named:
            continue
        try:
            mod = importlib.import_module(f"afd.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"afd.cli.{module}":
                raise
            continue  # subcommand not built yet
        mod.add_parser(sub)
    return parser


class _StoppedEarly(Exception):
    """SIGTERM or SIGHUP before a run existed: nothing to stop or clean up."""


def _stop_early(signum, frame):
    raise _StoppedEarly(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and argv is None:  # the command itself (not a test calling main()): a run catches its own later
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop_early)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args) or 0)
    except AfdError as exc:
        print(f"afd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except _StoppedEarly as exc:
        print(f"afd: stopped by {exc} before anything started", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
