"""Doorbells: a ring wakes the waiter, a drain empties every pending ring, no ring times out."""
import os
import time

import pytest
import zmq

from afd.runtime import doorbell


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(params=["fifo", "zmq"])
def bell_pair(request, tmp_path, zctx):
    endpoint = f"fifo://{tmp_path}/db.fifo" if request.param == "fifo" else "tcp://127.0.0.1:0"
    bell = doorbell.bind(zctx, endpoint)
    ringer = doorbell.ringer(zctx, bell.endpoint)
    deadline = time.monotonic() + 10
    while request.param == "zmq":  # a ring before the PUSH connection lands is dropped: ring until one arrives
        ringer.ring()
        if doorbell.wait_ring(bell, 50) or time.monotonic() > deadline:
            break
    yield bell, ringer
    ringer.close()
    bell.close()


@pytest.mark.timeout(30)
def test_no_ring_times_out(bell_pair):
    bell, _ = bell_pair
    t0 = time.monotonic()
    assert doorbell.wait_ring(bell, 50) is False
    assert time.monotonic() - t0 >= 0.04


@pytest.mark.timeout(30)
def test_a_ring_wakes_and_the_drain_takes_every_pending_ring(bell_pair):
    bell, ringer = bell_pair
    for _ in range(3):  # the same bell, waited on again and again (its poller is kept)
        ringer.ring()
        ringer.ring()
        assert doorbell.wait_ring(bell, 5000) is True
        assert doorbell.wait_ring(bell, 20) is False  # both rings were drained by the first wake


@pytest.mark.timeout(30)
def test_a_full_fifo_is_drained_in_one_wake(tmp_path, zctx):
    bell = doorbell.bind(zctx, f"fifo://{tmp_path}/db.fifo")
    ringer = doorbell.ringer(zctx, bell.endpoint)
    try:
        for _ in range(doorbell._PIPE_BYTES + 100):  # past the pipe's capacity: the extra rings are dropped
            ringer.ring()
        assert doorbell.wait_ring(bell, 5000) is True
        with pytest.raises(BlockingIOError):
            os.read(bell.fd, 1)
    finally:
        ringer.close()
        bell.close()
    assert not os.path.exists(f"{tmp_path}/db.fifo")


@pytest.mark.timeout(30)
def test_a_socket_waited_on_beside_the_bell_wakes_it_without_a_ring(bell_pair, zctx):
    bell, _ = bell_pair
    pull = zctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = zctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send(b"control")
        t0 = time.monotonic()
        assert doorbell.wait_ring(bell, 5000, also=(pull,)) is False  # woken by the socket, not the bell
        assert time.monotonic() - t0 < 4.0
        assert pull.recv(zmq.NOBLOCK) == b"control"
    finally:
        push.close(linger=0)
        pull.close(linger=0)
