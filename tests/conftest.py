"""The suite's guards come from the afd pytest plugin (afd/pytest_plugin.py), loaded by its pytest11 entry point."""

import pytest

from afd.device import Device


@pytest.fixture
def dev():
    """A fresh simulated device namespace, closed (its segments unlinked) after the test."""
    d = Device()
    yield d
    d.close()
