"""afd.waiting: the stall watchdog reports a stall only when something is still missing."""
import numpy as np
import pytest

from afd.ops._polling import Waiting
from afd.waiting import Stall, WaitPolicy


def _policy():
    return WaitPolicy("t", spin_us=0, stall_timeout_s=0.02, service_interval_s=0.005)


def _wait_until(policy, waiting, done):
    """Drive the policy as an op does: scan, then idle, until done() or the policy raises."""
    while not done():
        waiting.iterations += 1
        policy(waiting)


@pytest.mark.timeout(10)
def test_a_wait_whose_flags_all_arrived_at_the_bound_scans_again_instead_of_stalling():
    flags = np.zeros(4, np.int32)
    waiting = Waiting("op", "flags", 0, needed=4, flags=flags)
    policy = _policy()

    def scan():  # the op reads the flags; past the bound the last stores land just after that read
        ready = bool((flags == 1).all())
        if policy.waited_ns > policy.stall_ns:
            flags[:] = 1
        return ready

    _wait_until(policy, waiting, scan)  # no Stall: nothing was missing any more, and the extra scan saw it
    assert policy.waited_ns > policy.stall_ns


@pytest.mark.timeout(10)
def test_a_wait_that_still_misses_a_flag_stalls_and_says_which():
    flags = np.zeros(4, np.int32)
    flags[:3] = 1
    waiting = Waiting("op", "flags", 0, needed=4, flags=flags)
    with pytest.raises(Stall, match=r"\(3/4 ready\)"):
        _wait_until(_policy(), waiting, lambda: False)


@pytest.mark.timeout(10)
def test_the_extra_scan_is_given_once_per_wait():
    flags = np.ones(4, np.int32)  # all there, but the op's own condition never holds: it must still end
    waiting = Waiting("op", "flags", 0, needed=4, flags=flags)
    with pytest.raises(Stall):
        _wait_until(_policy(), waiting, lambda: False)
