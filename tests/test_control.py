"""The control plane's wire format, and that garbage on the wire is dropped and counted, never fatal."""
import os
import random

import pytest
import zmq

from afd import control
from afd.launcher.pipeline import Pipeline


@pytest.mark.parametrize("frames", [
    [], [b"heartbeat"], [b"heartbeat", b"{}", b"extra"], [b"\xff\xfe", b"{}"], [b"nonsense", b"{}"],
    [b"heartbeat", b"not json"], [b"heartbeat", b"[1, 2]"], [b"heartbeat", b"\x80\x81"], [b"stop", b"42"],
])
def test_malformed_frames_are_rejected(frames):
    with pytest.raises(control.MalformedMessage):
        control.decode(frames)


def test_round_trip():
    assert control.decode(control.encode("stop", {"reason": "x"})) == ("stop", {"reason": "x"})


def _garbage(rng: random.Random) -> list[bytes]:
    choice = rng.randrange(8)
    if choice == 0:
        return [os.urandom(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 5))]
    if choice == 1:
        return [b"register", b'{"role": "attn9", "pid": 1, "doorbell": "ipc:///nonexistent"}']
    if choice == 2:
        return [b"heartbeat", b"{}"]  # from an identity that never registered
    if choice == 3:
        return [b"stop", b'{"reason": "forged", "token": "wrong"}']  # unauthenticated: refused
    if choice == 4:
        return [b"role_died", b'{"role": "ffn0", "exitcode": -9}']  # only the launcher may say this
    if choice == 5:
        return [b"report", b'{"outcome": "failed"}']
    if choice == 6:
        return [b"unknown-kind", b"{}"]
    return [b"heartbeat", os.urandom(32)]


@pytest.mark.timeout(120)
def test_fuzzed_controller_and_doorbells_keep_running():
    rng = random.Random(1234)
    with Pipeline({"name": "t-fuzz", "steps": 40}) as pipeline:
        ctx = zmq.Context()
        try:
            socks = []
            for i in range(20):
                ident = rng.choice([b"attn0-imposter", b"", os.urandom(8), f"x{i}".encode()])
                s = control.socket(ctx, zmq.DEALER, **({"identity": ident} if ident else {}))
                s.connect(pipeline.endpoint)
                socks.append(s)
            doorbell = control.socket(ctx, zmq.PUSH, sndhwm=1000)
            doorbell.connect(f"ipc://{pipeline.run_dir}/db-sched0.sock")
            for n in range(3000):
                rng.choice(socks).send_multipart(_garbage(rng), zmq.NOBLOCK)
                if n % 10 == 0:
                    try:
                        doorbell.send(os.urandom(rng.randrange(0, 200)), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
            result = pipeline.wait(timeout=90)
        finally:
            ctx.destroy(linger=0)
    assert result.outcome == "completed", result.reason
    assert result.outputs_match_reference
    assert result.malformed_messages + result.refused_messages >= 1000  # dropped and counted
    assert any("refused a stop" in line for line in result.log)  # the forged stop was refused and logged
