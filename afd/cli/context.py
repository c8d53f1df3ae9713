"""`afd context decode|encode`: a 1024-byte ScheduleContext dump to named fields and back."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import AfdError
from ..inputs import CONFIG_CAP, read_capped, read_text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("context", help="decode or encode a 1024-byte ScheduleContext dump",
                              description=__doc__)
    sub = p.add_subparsers(dest="context_command", metavar="ACTION", parser_class=type(p))
    sub.required = True
    d = sub.add_parser("decode", help="print every field of a context dump by name")
    d.add_argument("file", metavar="FILE", help="a 1024-byte context dump")
    d.add_argument("--json", action="store_true", help="print a nested JSON object instead of area.field lines")
    d.set_defaults(handler=decode)
    e = sub.add_parser("encode", help="write a context dump from JSON fields")
    e.add_argument("fields", metavar="FIELDS.json",
                   help='nested {"common": {"session_num": 1}} or flat {"common.session_num": 1}; '
                        'integers, or "0x..." strings for addresses')
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the 1024 bytes")
    e.set_defaults(handler=encode)


def _is_address(name: str) -> bool:
    return name.endswith("_buf")  # token_info_buf, layer_ids_buf, ...: device addresses; *_buf_size are not


def _read(path: str, what: str, cap: int) -> bytes:
    return read_capped(path, cap, what)  # at most cap + 1 bytes: /dev/zero or a FIFO is an error, not a hang


def decode(args: argparse.Namespace) -> int:
    from ..layout import CONTEXT_SIZE, ScheduleContext  # (numpy: not for `afd --help`)
    data = _read(args.file, "the context dump", CONTEXT_SIZE)
    if len(data) != CONTEXT_SIZE:
        got = str(len(data))
        if len(data) > CONTEXT_SIZE:  # read only this far: a regular file's size says the rest, a device's cannot
            got = str(os.path.getsize(args.file)) if os.path.isfile(args.file) else f"more than {CONTEXT_SIZE}"
        raise AfdError(args.file, f"a context dump must be exactly {CONTEXT_SIZE} bytes, got {got}")
    fields = ScheduleContext.from_bytes(data).as_dict()
    if args.json:
        text = json.dumps(fields, indent=2)
    else:
        text = "\n".join(f"{area}.{name} = {value:#x}" if _is_address(name) else f"{area}.{name} = {value}"
                         for area, values in fields.items() for name, value in values.items())
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `afd context decode ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _integer(name: str, value) -> int:
    """JSON integers, or hex/decimal strings (decode prints addresses in hex); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AfdError(name, f"must be an integer, got {json.dumps(value)}")
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise AfdError(name, f"must be an integer (or a 0x... string), got {json.dumps(value)}") from None
    return value


def _flatten(obj) -> dict[str, int]:
    """Nested and/or flat JSON fields as {'area.field': int}, naming the first bad key or value."""
    from ..layout import AREAS, SCHEDULE_CONTEXT_DTYPE, field_offsets
    if not isinstance(obj, dict):
        raise AfdError("FIELDS.json", f"the top level must be a JSON object, got {type(obj).__name__}")
    known = field_offsets()
    flat: dict[str, int] = {}

    def put(key: str, value) -> None:
        if key not in known:
            area, _, name = key.partition(".")
            if area not in AREAS:
                raise AfdError(key, f"unknown area; the context has {', '.join(AREAS)}")
            if name in SCHEDULE_CONTEXT_DTYPE.fields[area][0].names:
                raise AfdError(key, "reserved bytes are not encodable (they stay 0)")
            names = [k.partition(".")[2] for k in known if k.startswith(area + ".")]
            raise AfdError(key, f"unknown field; {area} has {', '.join(names)}")
        if key in flat:
            raise AfdError(key, "given twice (nested and flat)")
        flat[key] = _integer(key, value)

    for key, value in obj.items():
        if isinstance(value, dict):
            if key not in AREAS:
                raise AfdError(key, f"unknown area; the context has {', '.join(AREAS)}")
            for name, v in value.items():
                put(f"{key}.{name}", v)
        elif "." not in key and key in AREAS:
            raise AfdError(key, f"an area must map to a JSON object of fields, got {json.dumps(value)}")
        elif "." not in key:
            raise AfdError(key, f"unknown field; use area.field (area in {', '.join(AREAS)}) or nest it under its area")
        else:
            put(key, value)
    return flat


def encode(args: argparse.Namespace) -> int:
    from ..layout import ScheduleContext
    text = read_text(args.fields, CONFIG_CAP, "the fields file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AfdError(args.fields, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    ctx = ScheduleContext()
    ctx.set_fields(_flatten(obj))  # range errors name the field and its type's bounds
    try:
        Path(args.output).write_bytes(ctx.to_bytes())
    except OSError as exc:
        raise AfdError(args.output, f"cannot write the context dump: {exc.strerror or exc}") from None
    return 0


if __name__ == "__main__":  # pragma: no cover - `afd context ...` is the entry point
    from . import main

    sys.exit(main(["context", *sys.argv[1:]]))
