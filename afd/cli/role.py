"""`afd role ROLE`: run one role alone and join a controller (containers, several hosts); or run that controller.

Each host runs one `afd role agent --host H` (it owns the host's shared memory and applies the other hosts' window
writes) and its roles (`afd role attn|sched|combine|ffn --rank N`), all pointed at the controller with
`--controller tcp://HOST:PORT --keys FILE`. The controller itself is `afd role controller --config CONFIG
--controller tcp://0.0.0.0:PORT --keys FILE` (it creates FILE, the run's CURVE keys, when it does not exist; it
publishes on PORT+1); it prints the run summary and exits like `afd run` (0 on a completed or stopped run). Roles take
the run's config from the controller's welcome. `afd stop` on the controller's machine (or in its container) stops
the run through run_flag = 0.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from . import add_overrides

ROLES = ("attn", "sched", "combine", "ffn", "controller", "agent")


def add_parser(sub) -> None:
    p = sub.add_parser("role", help="run one role alone and join a controller (or run the controller)")
    p.add_argument("role", choices=ROLES, help="attn, sched, combine, ffn (with --rank), agent (with --host or "
                                               "--rank), controller")
    p.add_argument("--rank", type=int, default=None, metavar="N",
                   help="session (attn/sched/combine) or FFN rank (ffn); for an agent the N-th host")
    p.add_argument("--host", metavar="NAME", help="the host an agent serves (a key of the config's hosts:)")
    p.add_argument("--config", metavar="CONFIG", help="the run's YAML config (the controller's is the run's; a role "
                                                      "checks that it names the role, then takes the controller's)")
    add_overrides(p)
    p.add_argument("--steps", type=int, help="decode steps to run (controller)")
    p.add_argument("--controller", required=True, metavar="E",
                   help="the controller's endpoint: where to connect (roles) or bind (controller), e.g. "
                        "tcp://controller:5555, tcp://0.0.0.0:5555, ipc:///run/afd/ctl.sock")
    p.add_argument("--keys", metavar="FILE", help="the run's CURVE keys (JSON); required for tcp; the controller "
                                                  "creates the file when it does not exist, roles wait for it")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here (controller)")
    p.add_argument("--fault", dest="faults", action="append", default=[], metavar="KIND[:TARGET][@WHEN]",
                   help="inject a fault (controller; repeatable), as in afd run")
    p.set_defaults(handler=main)


def _role_id(args, cfg) -> str:
    from ..config import AGENT_PREFIX
    if args.role == "controller":
        return "controller"
    if args.role == "agent":
        host = args.host
        if host is None:
            if cfg is None or args.rank is None:
                raise ConfigError("afd role agent", "needs --host NAME (or --config and --rank N: the N-th host)")
            hosts = list(cfg.host_map())
            if not 0 <= args.rank < len(hosts):
                raise ConfigError("--rank", f"the config has {len(hosts)} host(s), got {args.rank}")
            host = hosts[args.rank]
        if cfg is not None and host not in cfg.host_map():
            raise ConfigError("--host", f"{host!r} is not a host of the config ({', '.join(cfg.host_map())})")
        return f"{AGENT_PREFIX}{host}"
    if args.rank is None or args.rank < 0:
        raise ConfigError(f"afd role {args.role}", "needs --rank N (N >= 0)")
    role = f"{args.role}{args.rank}"
    if cfg is not None and role not in cfg.role_ids():
        raise ConfigError(f"afd role {args.role} --rank {args.rank}", f"{role} is not a role of the config "
                                                                      f"({', '.join(cfg.role_ids())})")
    return role


def _load_keys(path: str | None, endpoint: str, create: bool, timeout_s: float = 30.0) -> dict | None:
    if not endpoint.startswith("tcp://"):
        return None
    if not path:
        raise ConfigError("--keys", "a tcp control plane is encrypted and authenticated: pass the run's CURVE keys "
                                    "file (the controller creates it)")
    p = Path(path)
    if create and not p.exists():
        import zmq
        keys = {}
        for who in ("server", "client"):
            public, secret = zmq.curve_keypair()
            keys[f"{who}_public"], keys[f"{who}_secret"] = public.decode(), secret.decode()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        os.replace(tmp, p)
    end = time.monotonic() + timeout_s
    while True:
        try:
            keys = json.loads(p.read_text())
            if {"server_public", "client_public", "client_secret"} <= set(keys):
                return keys
        except (OSError, json.JSONDecodeError):
            pass
        if time.monotonic() > end:
            raise ConfigError("--keys", f"{path} did not appear (or is not the run's keys) within {timeout_s:g}s")
        time.sleep(0.1)


def main(args) -> int:
    from .. import config as config_mod
    cfg = None
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    if args.config or args.role == "controller":
        cfg = config_mod.load(args.config, overrides)
    role_id = _role_id(args, cfg)
    if args.role == "controller":
        return run_controller(cfg, args)
    keys = _load_keys(args.keys, args.controller, create=False)
    return run_one(role_id, args.controller, keys)


def run_one(role_id: str, endpoint: str, keys: dict | None) -> int:
    """One role (or agent) in this process, joined to the controller at `endpoint`; its exit code."""
    import importlib

    from .. import control
    from ..config import AGENT_PREFIX
    from ..ops._polling import Stopped
    from ..roles import ROLE_MODULES, split_role
    from ..runtime.role import RoleRuntime, run_role

    kind = "agent" if role_id.startswith(AGENT_PREFIX) else ROLE_MODULES[split_role(role_id)[0]]
    module = importlib.import_module(f"afd.roles.{kind}")
    run_dir = os.path.dirname(control.ipc_path(endpoint)) if endpoint.startswith("ipc://") else None
    rt = RoleRuntime(role_id, endpoint, None, None, run_dir=run_dir, curve_keys=keys)

    def on_term(signum, frame):  # docker stop / Ctrl-C: leave through the stop path, report, exit 0
        if rt.phase == "joining":
            raise Stopped(reason=f"signal {signum} before start")
        rt.stopping, rt.stop_reason, rt.ended = True, rt.stop_reason or f"signal {signum}", True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    code = run_role(rt, module.body, getattr(module, "prepare", None))
    print(f"afd role {role_id}: {rt.phase} (exit {code})", file=sys.stderr)
    return code


def run_controller(cfg, args) -> int:
    """The controller of a run whose roles join on their own: prints the summary, exits like afd run."""
    from rich.console import Console

    from .. import control
    from .. import faults as faults_mod
    from ..device import new_namespace
    from ..launcher.report import write_report
    from ..launcher.reported import ReportedMemory
    from ..launcher.result import build_result
    from ..roles.controller import Controller
    from .run import summary_table

    faults = faults_mod.parse_all(cfg.faults, cfg.role_ids()) + faults_mod.parse_all(args.faults, cfg.role_ids())
    endpoint = args.controller
    keys = _load_keys(args.keys, endpoint, create=True)
    if endpoint.startswith("tcp://"):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        if not port.isdigit() or int(port) == 0:
            raise ConfigError("--controller", f"needs a fixed port (roles must know it), got {endpoint}")
        pub = f"tcp://{host}:{int(port) + 1}"
    elif endpoint.startswith("ipc://"):
        pub = endpoint[:-len(".sock")] + "-pub.sock" if endpoint.endswith(".sock") else endpoint + "-pub"
        os.makedirs(os.path.dirname(control.ipc_path(endpoint)), exist_ok=True)
    else:
        raise ConfigError("--controller", f"must be tcp://HOST:PORT or ipc://PATH, got {endpoint}")
    run_id = new_namespace()
    run_dir = control.make_run_dir(run_id)  # afd stop finds the run here (run.json, curve.json)
    t0 = time.monotonic()
    try:
        if keys:
            fd = os.open(run_dir / "curve.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(keys, f)
        plan = {"run": run_id, "roles": cfg.role_ids(), "agents": cfg.agent_ids(), "token": os.urandom(16).hex(),
                "faults": [f.to_dict() for f in faults], "curve": keys}
        controller = Controller(cfg, plan, endpoint, pub, None)
        local = controller.endpoint.replace("0.0.0.0", "127.0.0.1").replace("//*:", "//127.0.0.1:")
        control.write_run_info(run_dir, {"pid": os.getpid(), "endpoint": local, "namespace": run_id,
                                         "name": cfg.name, "token": plan["token"], "roles": {}})
        os.chmod(run_dir / "run.json", 0o600)
        print(f"afd role controller: run {cfg.name} ({run_id}) at {controller.endpoint}, waiting for "
              f"{len(controller.expected)} roles: {', '.join(controller.expected)}", file=sys.stderr, flush=True)

        def on_term(signum, frame):
            controller.begin_stop("stopped", f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        try:
            controller.run()
        finally:
            controller.close()
        payload = getattr(controller, "result_payload", None)
    finally:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
    reports = (payload or {}).get("reports", {})
    codes = {"controller": 0}
    for role in controller.expected:
        outcome = reports.get(role, {}).get("outcome")
        codes[role] = {"completed": 0, "stopped": 0, "orphaned": 3, "failed": 1}.get(outcome)
    mem = controller.mem or ReportedMemory(cfg, payload)
    result = build_result(cfg, mem, payload, None, codes, time.monotonic() - t0, faults)
    if args.report:
        write_report(result, args.report)
    Console(width=120).print(summary_table(result))
    if isinstance(mem, ReportedMemory):
        for host, info in sorted(mem.hosts.items()):
            applied = info.get("applied") or {}
            writes = {w: st for w, st in applied.items() if st.get("puts")}
            print(f"host {host}: memory namespace {info.get('namespace')}; its agent applied "
                  + (", ".join(f"{st['puts']} puts ({st['flags']} flags, {st['bytes']} bytes) from {w}"
                               for w, st in sorted(writes.items())) or "no remote writes")
                  + (f"; refused {info['refused']}" if info.get("refused") else ""))
    match = result.outputs_match_reference
    print(f"outcome: {result.outcome} (exit {result.exit_code}): {result.reason}")
    print("outputs match reference: " + ("not checked" if match is None else "yes" if match else "NO")
          + f" ({result.compared} compared)", flush=True)
    return result.exit_code
