"""What a forked process of a run runs: a role, a host's window agent, or the controller (module-level, so the
start method can find them)."""
from __future__ import annotations

import sys

from .. import exit_cleanup
from ..config import Config
from .forkserver import adopt
from .signals import ignore_stop_signals


def role_entry(launcher: dict, role_id: str, config_json: str, plan: dict | None, endpoint: str, launcher_pid: int,
               run_dir: str, curve_keys: dict | None = None, namespace: str | None = None) -> None:
    """Forked child: run one role, or a host's window agent. Without a plan the role gets it from the controller's
    welcome (multi-host: once every agent reported)."""
    ignore_stop_signals()  # Ctrl-C, SIGTERM, SIGHUP go to the launcher, which stops everyone through run_flag
    try:
        adopt(launcher)
        _run_role(role_id, config_json, plan, endpoint, launcher_pid, run_dir, curve_keys, namespace)
    finally:
        exit_cleanup.run_all()  # (a fork server's child leaves with os._exit, which skips atexit)


def _run_role(role_id, config_json, plan, endpoint, launcher_pid, run_dir, curve_keys, namespace) -> None:
    import importlib

    from ..config import AGENT_PREFIX
    from ..roles import ROLE_MODULES, split_role
    from ..runtime.role import RoleRuntime, run_role

    cfg = Config.model_validate_json(config_json)
    if cfg.strict:  # the ops' hardware limits follow the run's strict mode
        from ..ops import set_strict
        set_strict(True)
    kind = "agent" if role_id.startswith(AGENT_PREFIX) else ROLE_MODULES[split_role(role_id)[0]]
    module = importlib.import_module(f"afd.roles.{kind}")
    rt = RoleRuntime(role_id, endpoint, cfg, plan, launcher_pid=launcher_pid, run_dir=run_dir, curve_keys=curve_keys)
    rt.namespace = namespace  # an agent allocates its host's memory there (so the launcher can sweep it)
    sys.exit(run_role(rt, module.body, getattr(module, "prepare", None)))


def controller_entry(launcher: dict, config_json: str, plan: dict, endpoint: str, pub_endpoint: str,
                     launcher_pid: int) -> None:
    from ..roles import controller

    ignore_stop_signals()
    try:
        adopt(launcher)
        sys.exit(controller.main(Config.model_validate_json(config_json), plan, endpoint, pub_endpoint, launcher_pid))
    finally:
        exit_cleanup.run_all()
