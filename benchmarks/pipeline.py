"""The pipeline benchmark: same as `afd bench` (logic in afd.bench, output in afd.cli.bench)."""
from __future__ import annotations

import sys

from afd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
