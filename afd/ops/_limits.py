"""Hardware limits of the real ops (checked only in strict mode) and the HCCL window-size rule."""
from __future__ import annotations

import os
from contextlib import contextmanager

MIB = 1 << 20
DEFAULT_HCCL_BUFFSIZE_MB = 200  # HCCL_BUFFSIZE default, in MB

_strict: bool | None = None  # None: follow the AFD_STRICT environment variable


def strict() -> bool:
    """True when ops enforce the A3 hardware limits (H, HS, BS, K ranges, M == 1 for F2A, HCCL window size)."""
    if _strict is not None:
        return _strict
    return os.environ.get("AFD_STRICT", "0") not in ("", "0")


def set_strict(on: bool | None) -> None:
    """Force strict mode on or off; None goes back to the AFD_STRICT environment variable."""
    global _strict
    _strict = None if on is None else bool(on)


@contextmanager
def strict_mode(on: bool = True):
    """Strict mode (or not) inside the block, restoring the previous setting after."""
    global _strict
    before = _strict
    _strict = bool(on)
    try:
        yield
    finally:
        _strict = before


def hccl_buffsize_mb() -> int:
    """The HCCL window size in MB: env HCCL_BUFFSIZE or the default 200."""
    value = os.environ.get("HCCL_BUFFSIZE", "")
    return int(value) if value.strip() else DEFAULT_HCCL_BUFFSIZE_MB


def hccl_window_mb_needed(M: int, BS: int, K1: int, HS: int, itemsize: int) -> int:
    """MB of HCCL window the F2A tiling asks for: (data + flags) // MiB + 1."""
    return (M * BS * K1 * HS * itemsize + M * BS * K1 * 4) // MIB + 1
