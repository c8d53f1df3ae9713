"""`afd clean`: remove what processes killed by SIGKILL left: orphaned /dev/shm segments, stale run directories,
`afd stop` listings of dead torch jobs. Never touches anything a live process uses."""
from __future__ import annotations

import json
import os
import shutil


def add_parser(sub) -> None:
    p = sub.add_parser("clean", help="remove the segments and run directories that SIGKILLed processes left")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(handler=main)


def stale_run_dirs() -> list:
    """Run directories whose launcher is gone (run.json's pid is dead, or there is no run.json and no segment of
    the namespace in use)."""
    from .. import control, device
    root = control.runs_root()
    if not root.is_dir():
        return []
    used = {name.split("-")[1] for name in device.in_use() if name.count("-") >= 2}
    out = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name == "npu":
            continue
        info = path / "run.json"
        try:
            pid = int(json.loads(info.read_text())["pid"])
            os.kill(pid, 0)
            continue  # its launcher lives
        except (OSError, ValueError, KeyError):
            pass
        if path.name not in used:
            out.append(path)
    return out


def main(args) -> int:
    from .. import device
    from ..npu import registry
    segments = device.orphans()
    dirs = stale_run_dirs()
    for name in segments:
        print(f"{'would remove' if args.dry_run else 'removed'} segment /dev/shm/{name}")
        if not args.dry_run:
            try:
                os.unlink(os.path.join(device.SHM_DIR, name))
            except FileNotFoundError:
                pass
    for path in dirs:
        print(f"{'would remove' if args.dry_run else 'removed'} run directory {path}")
        if not args.dry_run:
            shutil.rmtree(path, ignore_errors=True)
    gone = [] if args.dry_run else registry.sweep()
    for pid in gone:
        print(f"removed the afd stop listing of dead pid {pid}")
    if not (segments or dirs or gone):
        print("afd clean: nothing to remove")
    return 0
