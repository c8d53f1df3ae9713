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
            while doorbell.wait_ring(bell, 100) and time.monotonic() < deadline:  # the warm-up's rings, drained
                pass
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
    fifo = isinstance(bell, doorbell.FifoDoorbell)
    for _ in range(3):  # the same bell, waited on again and again (its poller is kept)
        ringer.ring()
        ringer.ring()
        assert doorbell.wait_ring(bell, 5000) is True
        if fifo:  # (over TCP the second ring may still be on its way when the first wakes the bell)
            assert doorbell.wait_ring(bell, 20) is False  # both rings were drained by the first wake
        else:
            while doorbell.wait_ring(bell, 100):  # the late ring is drained too, then waits block again
                pass


@pytest.mark.timeout(30)
def test_a_full_fifo_is_drained_by_one_wait(tmp_path, zctx):
    bell = doorbell.bind(zctx, f"fifo://{tmp_path}/db.fifo")
    ringer = doorbell.ringer(zctx, bell.endpoint)
    try:
        for _ in range(65536 + 100):  # past the pipe's capacity (64 KiB): the extra rings are dropped
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


@pytest.mark.timeout(30)
def test_a_fifo_whose_ringer_closed_still_blocks(tmp_path, zctx):
    """The last ringer closing the FIFO is no wake-up: later waits block until their timeout."""
    bell = doorbell.bind(zctx, f"fifo://{tmp_path}/db.fifo")
    try:
        ringer = doorbell.ringer(zctx, bell.endpoint)
        ringer.ring()
        ringer.close()
        assert doorbell.wait_ring(bell, 5000) is True  # the ring it left
        t0 = time.monotonic()
        assert doorbell.wait_ring(bell, 100) is False
        assert time.monotonic() - t0 >= 0.09
    finally:
        bell.close()


@pytest.mark.timeout(30)
def test_a_message_arriving_during_the_wait_wakes_it(bell_pair, zctx):
    """A control message that arrives while the wait is blocked wakes it (through the socket's file descriptor)."""
    import threading

    bell, _ = bell_pair
    pull = zctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")

    def send_later():
        push = zctx.socket(zmq.PUSH)  # its own socket: ZeroMQ sockets stay in one thread
        push.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.2)
        push.send(b"late")
        push.close(linger=1000)

    sender = threading.Thread(target=send_later)
    try:
        sender.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0 and not (pull.getsockopt(zmq.EVENTS) & zmq.POLLIN):
            doorbell.wait_ring(bell, 5000, also=(pull,))  # (a wake-up without the message yet: wait again)
        assert time.monotonic() - t0 < 4.0
        assert pull.recv(zmq.NOBLOCK) == b"late"
    finally:
        sender.join(5)
        pull.close(linger=0)


@pytest.mark.timeout(30)
def test_the_ring_that_wakes_a_wait_is_drained_by_the_next(tmp_path, zctx):
    """Rung while the wait is blocked: it wakes (True); its ring is left for the next wait, which returns at once
    (True: the caller scans again), and the one after that blocks until its timeout."""
    import threading

    bell = doorbell.bind(zctx, f"fifo://{tmp_path}/db.fifo")
    ringer = doorbell.ringer(zctx, bell.endpoint)
    late = threading.Timer(0.2, ringer.ring)
    try:
        late.start()
        t0 = time.monotonic()
        assert doorbell.wait_ring(bell, 5000) is True
        assert 0.15 < time.monotonic() - t0 < 4.0
        t0 = time.monotonic()
        assert doorbell.wait_ring(bell, 5000) is True
        assert time.monotonic() - t0 < 1.0
        assert doorbell.wait_ring(bell, 100) is False
    finally:
        late.join(5)
        ringer.close()
        bell.close()
