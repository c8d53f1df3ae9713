"""The suite's guards come from the afd pytest plugin (afd/pytest_plugin.py), loaded by its pytest11 entry point."""

import pytest

from afd.device import Device


@pytest.fixture
def dev():
    """A fresh simulated device namespace, closed (its segments unlinked) after the test."""
    d = Device()
    yield d
    d.close()


@pytest.fixture
def recorded_namespaces(monkeypatch):
    """Every namespace the launcher hands out during the test (the run's, and each host's) must be empty
    afterwards; a test may also append namespaces of runs it launched in a subprocess. Other pipelines running
    on the machine meanwhile do not count."""
    import afd.launcher.pipeline as pipeline_mod
    from afd import device

    ours: list[str] = []

    def recording() -> str:
        ns = device.new_namespace()
        ours.append(ns)
        return ns

    monkeypatch.setattr(pipeline_mod, "new_namespace", recording)
    yield ours
    leaked = [name for ns in ours for name in device.list_segments(ns)]
    for ns in ours:
        device.sweep(ns)
    if leaked:
        pytest.fail(f"test left shared-memory segments behind: {leaked}")
