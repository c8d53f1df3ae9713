"""The stage table of `afd bench` alone: each operator of one micro-batch layer, ms, bytes, GB/s, vs numpy's copy."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from afd.bench.stages import measure_stages
from afd.cli.bench import stage_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="fewer micro-batch layers (a smoke run)")
    args = parser.parse_args(argv)
    result = measure_stages(quick=args.quick)
    if args.json:
        print(json.dumps(result))
    else:
        Console().print(stage_table(result["rows"], result["total"], result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
