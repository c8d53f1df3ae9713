"""A run's files: the JSON report and the run log beside it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .result import Result


def write_report(result: Result, path: str | os.PathLike, log_path: str | os.PathLike | None = None) -> None:
    """The JSON report, and the run log beside it (FILE.log unless a log path is given)."""
    Path(path).write_text(json.dumps(result.report(), indent=2, default=_json_default))
    write_log(result, log_path or f"{path}.log")


def write_log(result: Result, path: str | os.PathLike) -> None:
    lines = list(result.log) + [f"outcome: {result.outcome} (exit {result.exit_code}): {result.reason}"]
    if result.failure:
        lines.append(f"failure: {json.dumps(result.failure, default=_json_default)}")
    for role, info in result.roles.items():
        lines.append(f"{role}: exit {info['exit_code']} {info['outcome']}"
                     + (f" - {info['error'].get('message', '')}" if info.get("error") else ""))
    Path(path).write_text("\n".join(lines) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)
