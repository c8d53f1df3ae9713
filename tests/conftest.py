"""Suite-wide guards: no test may leave an afd shared-memory segment behind."""
import pytest

from afd import device


@pytest.fixture(autouse=True)
def no_leftover_segments():
    before = set(device.list_segments())
    yield
    leaked = sorted(set(device.list_segments()) - before)
    if leaked:
        for name in leaked:  # clean up so one leak does not fail every later test
            device.sweep(name[len(device.SEGMENT_PREFIX):].rsplit("-", 1)[0])
        pytest.fail(f"test left shared-memory segments behind: {leaked}")
