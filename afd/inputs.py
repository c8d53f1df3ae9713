"""Reading the files a user hands in: capped, never blocking on a FIFO or a device, text that must be UTF-8.

A config or a context dump can name anything: a FIFO nobody writes to, /dev/zero, a huge file, a binary. Each is
read with a cap and a deadline, and comes out as bytes, text or one clear error naming the file and the rule.
"""
from __future__ import annotations

import errno
import os
import select
import time

from .errors import AfdError

READ_DEADLINE_S = 2.0
CONFIG_CAP = 4 << 20  # a config is a few kB; 4 MB is beyond any real one


class InputError(AfdError, ValueError):
    """A file handed in cannot be read as asked (size, type, encoding)."""


def read_capped(path, cap: int, what: str, deadline_s: float = READ_DEADLINE_S) -> bytes:
    """At most cap + 1 bytes of path (so the caller can tell "more than cap"), within deadline_s for a FIFO or a
    device; an unreadable file is an InputError naming it."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer must not block the open
    except OSError as exc:
        raise InputError(name, f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        if os.path.isdir(name):
            raise InputError(name, f"cannot read {what}: it is a directory")
        chunks, got = [], 0
        end = time.monotonic() + deadline_s
        while got <= cap:
            try:
                chunk = os.read(fd, min(1 << 20, cap + 1 - got))
            except BlockingIOError:
                left = end - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise InputError(name, f"cannot read {what}: nothing arrived within {deadline_s:g} s "
                                           "(a FIFO or device that is not written to?)") from None
                continue
            except OSError as exc:
                if exc.errno == errno.EISDIR:
                    raise InputError(name, f"cannot read {what}: it is a directory") from None
                raise InputError(name, f"cannot read {what}: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path, cap: int, what: str) -> str:
    """A UTF-8 text file of at most cap bytes."""
    data = read_capped(path, cap, what)
    if len(data) > cap:
        raise InputError(os.fspath(path), f"{what} must be at most {cap} bytes, this one is larger")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(os.fspath(path), f"{what} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                                          f"{exc.start})") from None
