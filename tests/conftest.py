"""Suite-wide guards: no test may leave an afd shared-memory segment behind."""
import pytest

from afd import device


@pytest.fixture(autouse=True)
def no_leftover_segments():
    """Fail a test that leaves segments in a namespace this process allocated in during the test.

    Only this process's namespaces are judged (and swept), so suites running side by side on one
    machine never remove each other's live segments. Runs launched as subprocesses are checked
    by their own tests.
    """
    before = set(device.created_namespaces)
    yield
    mine = set(device.created_namespaces) - before
    leaked = sorted(name for ns in mine for name in device.list_segments(ns))
    if leaked:
        for ns in mine:
            device.sweep(ns)
        pytest.fail(f"test left shared-memory segments behind: {leaked}")
