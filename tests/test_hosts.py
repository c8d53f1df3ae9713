"""Two hosts on one machine: one shared-memory namespace per host (owned by its agent), TCP between them. Outputs
equal the reference; kill and stop across hosts end as documented; nothing of either host is left behind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from afd import config as config_mod
from afd import device
from afd.comm import LocalWindow
from afd.comm_remote import AgentLink, LocalRegion, RemoteWindow, WindowServer
from afd.errors import ConfigError, KernelError
from afd.faults import DOCUMENTED
from afd.launcher.pipeline import Pipeline

# The attention session on one host, both FFN ranks on the other: every A2F and F2A write crosses hosts.
TWO_HOSTS = {"name": "t-two-hosts", "sessions": 1, "ffn_ranks": 2, "micro_batch_num": 2, "steps": 3,
             "control": {"transport": "tcp"},
             "hosts": {"attn": {"roles": ["attn0", "sched0", "combine0"]}, "ffn": {"roles": ["ffn0", "ffn1"]}}}
# Each host has a session and an FFN rank: every group mixes local and remote windows.
MIXED = {"name": "t-mixed-hosts", "sessions": 2, "ffn_ranks": 2, "micro_batch_num": 3, "steps": 3,
         "control": {"transport": "tcp"},
         "hosts": {"a": {"roles": ["attn0", "sched0", "combine0", "ffn0"]},
                   "b": {"roles": ["attn1", "sched1", "combine1", "ffn1"]}}}


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))


@pytest.fixture(autouse=True)
def recorded_namespaces(recorded_namespaces):
    """No segment of this test's runs is left (see tests/conftest.py)."""
    return recorded_namespaces


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def run(cfg, faults=(), timeout=60):
    pipeline = Pipeline(cfg, faults=list(faults))
    with pipeline:
        namespaces = dict(pipeline.namespaces)
        assert len(set(namespaces.values())) == len(namespaces) == len(pipeline.cfg.hosts)
        result = pipeline.wait(timeout)
    assert not [r for r, pid in pipeline.pids.items() if _alive(pid)]
    for ns in namespaces.values():
        assert device.list_segments(ns) == []
    assert not pipeline.run_dir.exists()
    return result, namespaces


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cfg", [TWO_HOSTS, MIXED], ids=["attn|ffn", "mixed"])
def test_two_hosts_match_the_reference(cfg):
    result, namespaces = run(cfg)
    assert (result.outcome, result.exit_code) == ("completed", 0), (result.reason, result.failure)
    assert result.outputs_match_reference is True
    c = result.config
    assert result.steps == c.steps and result.compared == c.steps * c.sessions * c.micro_batch_num
    assert result.micro_batch_layers == c.steps * c.layers * c.micro_batch_num * c.sessions
    assert all(r["exit_code"] == 0 for r in result.roles.values()), result.roles
    assert {f"agent-{h}" for h in c.hosts} <= set(result.roles)
    for key, y in result.outputs.items():  # the final hidden states crossed back from each host's memory
        np.testing.assert_array_equal(y, result.reference[key])
    # the F2A flags of the scheduler's hop samples were written by the other host's FFN ranks through its agent
    hop = result.hops_us.get("flag_hop_ns")
    assert hop and hop["n"] >= c.steps * c.layers * c.micro_batch_num * c.sessions


@pytest.mark.timeout(120)
def test_agents_apply_the_other_hosts_writes():
    """The agent of the attention host applied F2A puts and flags from both FFN ranks (and nothing else), the FFN
    host's agent the A2F puts and header flags of attn0; each host's memory is its own namespace."""
    pipeline = Pipeline(TWO_HOSTS)
    with pipeline:
        result = pipeline.wait(60)
        reports = pipeline._controller_result["reports"]
    assert result.outcome == "completed"
    attn, ffn = reports["agent-attn"]["extra"], reports["agent-ffn"]["extra"]
    assert attn["namespace"] != ffn["namespace"]
    writers = lambda applied: {w for w, st in applied.items() if st["puts"]}  # others only rang (connect-time)
    assert writers(attn["applied"]) == {"ffn0", "ffn1"} and writers(ffn["applied"]) == {"attn0"}
    assert all(s["flags"] > 0 and s["bytes"] > 0 for s in attn["applied"].values())
    assert ffn["applied"]["attn0"]["flags"] > 0
    assert attn["refused"] == ffn["refused"] == 0


CASES = [("kill:ffn0@step=1", "ffn0"), ("kill:attn0@step=1,mb=1", "attn0"), ("stop:combine0@step=1,layer=1", None),
         ("stop:controller@step=1", None)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec,role", CASES, ids=[c[0] for c in CASES])
def test_faults_across_hosts_end_as_documented(spec, role):
    # Long enough that the fault always lands first: across hosts the controller learns the step from heartbeats,
    # and a 3-step run could complete before the one that says step 1 arrived.
    result, _ = run({**TWO_HOSTS, "steps": 100}, [spec])
    kind = spec.split(":")[0]
    outcome, code, failure_kind = DOCUMENTED[kind]
    assert (result.outcome, result.exit_code) == (outcome, code), (result.reason, result.failure)
    assert result.faults[0]["fired"]
    if kind == "kill":
        assert result.failure["kind"] == failure_kind and result.failure["role"] == role
        assert role in result.reason
        assert result.in_flight and role in result.in_flight
        assert result.faults[0]["detect_s"] < 1.0
    else:
        assert result.failure is None
        assert all(r["exit_code"] == 0 for r in result.roles.values()), result.roles
    assert result.outputs_match_reference is True  # what completed before the fault equals the reference


@pytest.mark.timeout(60)
def test_stop_from_outside_ends_both_hosts():
    import time
    with Pipeline(TWO_HOSTS, steps=100000) as pipeline:
        end = time.monotonic() + 30
        while pipeline.progress[0] < 8 and time.monotonic() < end:  # running, a few micro-batch layers done
            pipeline._drain(None)
            time.sleep(0.02)
        t0 = time.monotonic()
        pipeline.stop("test")
        result = pipeline.wait(10)
        assert time.monotonic() - t0 < 2.0 + 1.5  # the stop path, then the agents' end
    assert (result.outcome, result.exit_code) == ("stopped", 0)
    assert all(r["exit_code"] == 0 for r in result.roles.values()), result.roles
    assert result.micro_batch_layers > 0 and result.outputs_match_reference is True


# -- the transport in one process ----------------------------------------------------------------------------------
def test_remote_window_applies_in_order_and_reads_back():
    import zmq
    dev = device.Device()
    try:
        buf = dev.malloc(4096)
        region = LocalRegion(dev, buf.address, buf.size)
        rung = []
        server = WindowServer({buf.address: region}, ring=rung.append)
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        link = AgentLink(ctx, f"tcp://127.0.0.1:{port}", None, "writer", "h")
        win = RemoteWindow(link, buf.address, buf.size)
        rows = np.arange(4 * 8, dtype=np.int16).reshape(4, 8)
        win.put_rows(512, 64, np.array([3, 0, 1, 2]), rows)
        win.put_i32(0, np.array([5, 6]), 1)
        dup = np.repeat(np.arange(2 * 8, dtype=np.int16).reshape(2, 8) + 100, [3, 2], axis=0)  # runs of equal rows
        win.put_rows(2048, 32, np.array([4, 0, 2, 1, 3]), dup)  # travels as 2 rows + run lengths
        win.put_i64(1024, np.array([2]), 123456789012)
        link.ring("sched0")
        with pytest.raises(KernelError, match="runs past"):
            win.put_i32(4092, np.array([1]), 1)  # checked by the writer, like a local window
        # the read is answered after every earlier put: serve until the reply went out
        import threading
        done = threading.Event()

        def serve():
            while not done.is_set():
                if router.poll(10):
                    server.handle(router, router.recv_multipart())
        t = threading.Thread(target=serve)
        t.start()
        try:
            flags = win.get_i32(0, 8)
        finally:
            done.set()
            t.join()
        assert flags.tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
        local = LocalWindow(dev, buf.address, buf.size)
        got = local.bytes[512:512 + 4 * 64].reshape(4, 64)[:, :16].copy().view(np.int16)
        np.testing.assert_array_equal(got[[3, 0, 1, 2]], rows)
        assert local.bytes[1024 + 16:1024 + 24].view(np.int64)[0] == 123456789012
        got = local.bytes[2048:2048 + 5 * 32].reshape(5, 32)[:, :16].copy().view(np.int16)
        np.testing.assert_array_equal(got[[4, 0, 2, 1, 3]], dup)
        assert server.stats["writer"]["bytes"] == rows.nbytes + 2 * 16
        assert rung == ["sched0"] and server.stats["writer"]["flags"] == 2 and server.refused == 0
        # a write to memory that is not a window of this host is refused, not applied
        server.handle(router, [b"x", b"I", __import__("struct").pack("<Qq", buf.address + 512, 0),
                               np.zeros(1, np.int64).tobytes(), np.ones(1, "<i4").tobytes()])
        assert server.refused == 1
        ctx.destroy(linger=0)
    finally:
        dev.close()


# -- the hosts section ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hosts,words", [
    ({"a": {"roles": ["attn0", "sched0"]}, "b": {"roles": ["combine0", "ffn0"]}}, ["session 0", "one host"]),
    ({"a": {"roles": ["attn0", "sched0", "combine0", "ffn0"]}, "b": {"roles": ["ffn0"]}}, ["more than one host"]),
    ({"a": {"roles": ["attn0", "sched0", "combine0"]}}, ["ffn0", "no host"]),
    ({"a b": {"roles": ["attn0", "sched0", "combine0", "ffn0"]}}, ["host names"]),
])
def test_bad_hosts_sections(hosts, words):
    with pytest.raises(ConfigError) as err:
        config_mod.load({"hosts": hosts, "control": {"transport": "tcp"}})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_several_hosts_need_tcp():
    with pytest.raises(ConfigError, match="tcp"):
        config_mod.load({k: v for k, v in TWO_HOSTS.items() if k != "control"})


# -- the seal: only the run's key opens a message, once ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["encrypted", "trusted"])
def test_sealed_transport_applies_the_runs_writes_and_refuses_others(mode):
    import threading

    import zmq

    from afd.transport_seal import LinkSealer, transport_key
    keys = {"client_secret": zmq.curve_keypair()[1].decode()}
    dev = device.Device()
    ctx = zmq.Context()
    try:
        buf = dev.malloc(4096)
        rung = []
        server = WindowServer({buf.address: LocalRegion(dev, buf.address, buf.size)}, ring=rung.append,
                              key=transport_key(keys), seal=mode)
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        link = AgentLink(ctx, f"tcp://127.0.0.1:{port}", keys, "writer", "h", seal=mode)
        win = RemoteWindow(link, buf.address, buf.size)
        rows = np.arange(4 * 8, dtype=np.int16).reshape(4, 8)
        src = np.repeat(rows, 2, axis=0)
        win.put_rows_of(512, 64, np.arange(8), rows, np.repeat(np.arange(4), 2))  # travels as 4 rows + runs
        win.put_i32(0, np.array([5, 6]), 1)
        link.ring("sched0")
        sent = []
        sniff = ctx.socket(zmq.ROUTER)  # what an eavesdropper on the wire would see of the rows
        done = threading.Event()

        def serve():
            while not done.is_set():
                if router.poll(10):
                    frames = router.recv_multipart()
                    sent.append(frames)
                    server.handle(router, frames)
        t = threading.Thread(target=serve)
        t.start()
        try:
            assert win.get_i32(0, 8).tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
        finally:
            done.set()
            t.join()
        sniff.close()
        local = LocalWindow(dev, buf.address, buf.size)
        got = local.bytes[512:512 + 8 * 64].reshape(8, 64)[:, :16].copy().view(np.int16)
        np.testing.assert_array_equal(got, src)
        assert rung == ["sched0"] and server.refused == 0
        wire = b"".join(f for frames in sent for f in frames)
        assert (rows[1].tobytes() in wire) == (mode == "trusted")  # rows in clear only on a trusted network
        flag_put = next(frames for frames in sent if frames[1] == b"I")
        # a replay of a message that was applied is refused
        local.bytes[:32] = 0
        server.handle(router, flag_put)
        assert server.refused == 1 and local.i32(0, 8).tolist() == [0] * 8
        # a message sealed with another run's key, or not sealed at all, is refused: nothing written, nobody rung
        other = LinkSealer(transport_key({"client_secret": zmq.curve_keypair()[1].decode()}), mode)
        server.handle(router, [b"x", *other.seal(b"I", flag_put[3:5], np.ones(2, "<i4").tobytes())])
        server.handle(router, [b"x", b"N", b"sched0"])
        server.handle(router, [b"x", b"I", __import__("struct").pack("<Qq", buf.address, 0),
                               np.array([5], np.int64).tobytes(), np.ones(1, "<i4").tobytes()])
        # a sealed message whose bytes were changed on the way does not open
        forged = list(sent[0])
        body = bytearray(forged[-2] if mode == "trusted" else forged[-1])
        body[0] ^= 1
        forged[-2 if mode == "trusted" else -1] = bytes(body)
        forged[2] = forged[2][:16] + (10**6).to_bytes(8, "little") + forged[2][24:]  # (a fresh counter)
        server.handle(router, forged)
        assert server.refused == 5 and rung == ["sched0"] and local.i32(0, 8).tolist() == [0] * 8
    finally:
        ctx.destroy(linger=0)
        dev.close()
