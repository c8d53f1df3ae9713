"""The scaling table alone: the pipeline's rate and its fraction of the copy bound against H and BS; RSS per role."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from afd.bench.scaling import measure_scaling
from afd.cli.bench import rss_table, scaling_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--quick", action="store_true", help="two points, two steps each (a smoke run)")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(measure_scaling(quick=args.quick)))
        return 0
    err = Console(stderr=True)
    with err.status("scaling") as status:
        result = measure_scaling(quick=args.quick, progress=status.update)
    console = Console()
    console.print(scaling_table(result))
    console.print(rss_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
