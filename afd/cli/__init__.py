"""The `afd` command line: one subcommand module each, all errors as one clear line with exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="afd", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"afd.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"afd.cli.{module}":
                raise
            continue  # subcommand not built yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except AfdError as exc:
        print(f"afd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
