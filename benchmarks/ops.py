"""Measure the scheduler's scan cost and the combine's speed against their targets (logic in afd.bench.ops)."""
from __future__ import annotations

import argparse
import json
import sys

from afd.bench.ops import format_report, measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    result = measure(quick=args.quick)
    print(json.dumps(result) if args.json else format_report(result))
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
