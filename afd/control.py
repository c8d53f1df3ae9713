"""The ZeroMQ control plane's wire format and socket setup: typed two-frame messages, endpoints, run discovery."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import zmq

# Message kinds. role -> controller: register, heartbeat, done, report, failure; agent -> controller: part (its
# host's memory). controller -> role (pub): start, stop, tick, fault, end (agents may release the memory).
# controller -> role (direct): welcome.
# launcher/afd stop -> controller: stop, inject, role_died, status. controller -> launcher: progress, result.
KINDS = frozenset({"register", "heartbeat", "done", "report", "failure", "welcome", "start", "stop", "tick",
                   "fault", "inject", "role_died", "progress", "result", "status", "status_reply", "ack",
                   "part", "end"})
MAX_PAYLOAD = 64 << 20


class MalformedMessage(ValueError):
    """A message that does not parse: dropped and counted, never fatal."""


def encode(kind: str, payload: dict | None = None) -> list[bytes]:
    return [kind.encode(), json.dumps(payload or {}, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> tuple[str, dict]:
    if len(frames) != 2:
        raise MalformedMessage(f"expected 2 frames, got {len(frames)}")
    try:
        kind = frames[0].decode()
    except UnicodeDecodeError:
        raise MalformedMessage("kind is not text") from None
    if kind not in KINDS:
        raise MalformedMessage(f"unknown kind {kind[:32]!r}")
    if len(frames[1]) > MAX_PAYLOAD:
        raise MalformedMessage("payload too large")
    try:
        payload = json.loads(frames[1])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedMessage("payload is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedMessage("payload is not an object")
    return kind, payload


def socket(ctx: zmq.Context, kind: int, **options) -> zmq.Socket:
    """A socket with linger 0 (so close/term never hang) and the given options."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    return sock


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, resolving tcp port 0 / '*' to the real endpoint."""
    if endpoint.startswith("tcp://") and (endpoint.endswith(":0") or endpoint.endswith(":*")):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


# -- CURVE: a TCP control plane is encrypted and only the run's own client key may connect ---------
def make_curve_keys(run_dir: Path) -> dict:
    """Per-run server and client key pairs, written 0600 into the run directory (z85 text)."""
    keys = {}
    for who in ("server", "client"):
        public, secret = zmq.curve_keypair()
        keys[f"{who}_public"], keys[f"{who}_secret"] = public.decode(), secret.decode()
    path = run_dir / "curve.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return keys


def read_curve_keys(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "curve.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def curve_server(sock: zmq.Socket, keys: dict | None) -> None:
    if keys:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys["server_secret"].encode())
        sock.setsockopt(zmq.ZAP_DOMAIN, b"afd")


def curve_client(sock: zmq.Socket, keys: dict | None) -> None:
    if keys:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server_public"].encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys["client_public"].encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys["client_secret"].encode())


def start_authenticator(ctx: zmq.Context, keys: dict | None):
    """A ZAP handler that admits only the run's client key; refusals are logged by zmq.auth."""
    if not keys:
        return None
    import logging

    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("afd.control.auth"))
    auth.start()
    auth.configure_curve_callback("afd", credentials_provider=_AllowOne(keys["client_public"]))
    return auth


class _AllowOne:
    """zmq.auth credentials provider: exactly one client public key."""

    def __init__(self, public_z85: str):
        self.key = public_z85.encode()  # zmq.auth hands the provider the z85 text of the client key

    def callback(self, domain, key) -> bool:
        import logging
        ok = key == self.key
        if not ok:
            logging.getLogger("afd.control.auth").warning("refused a control connection with an unknown CURVE key")
        return ok


# -- run discovery: `afd stop` with no endpoint finds runs through these directories ----------------
class LauncherWatch:
    """Whether the launcher that started this process is gone: its pid no longer names the process it named at this
    one's start (by start time, so a reused pid does not count). Roles are forked by the launcher's fork server
    (afd.launcher.forkserver.role_context), which lives on while they do, so their parent says nothing about it."""

    def __init__(self, launcher_pid: int | None):
        self.pid = launcher_pid
        self.started = None if launcher_pid is None else _start_time(launcher_pid)

    def gone(self) -> bool:
        if self.pid is None or self.started is _UNKNOWN:
            return False
        now = _start_time(self.pid)
        return self.started is None or (now is not _UNKNOWN and now != self.started)


_UNKNOWN = -1  # a /proc read that failed for another reason than the process being gone


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (OSError, IndexError, ValueError):  # unreadable now (EMFILE, ...): that is no proof it is gone
        return _UNKNOWN
    return None if fields[0] in ("Z", "X") else int(fields[19])


def runs_root() -> Path:
    return Path(os.environ.get("AFD_RUN_DIR") or os.path.join(tempfile.gettempdir(), "afd-runs"))


def make_run_dir(namespace: str) -> Path:
    root = runs_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / namespace
    path.mkdir(mode=0o700)
    return path


def write_run_info(run_dir: Path, info: dict) -> None:
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(run_dir / "run.json")


def live_runs() -> list[dict]:
    """Runs on this machine whose launcher is still alive (stale directories are ignored)."""
    out = []
    root = runs_root()
    if not root.is_dir():
        return out
    for info_file in sorted(root.glob("*/run.json")):
        try:
            info = json.loads(info_file.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue
        out.append(info)
    return out
