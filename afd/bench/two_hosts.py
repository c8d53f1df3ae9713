"""Where the two-host pipeline's time goes: the remote window transport's parts per micro-batch layer, in the run."""
# The pipeline of afd.bench.pipeline across two hosts on this machine (TWO_HOSTS: the attention session on one, the
# FFN rank on the other), with the writers' links (afd.comm_remote.AgentLink) and the agents (WindowServer) timing
# their parts and reporting them. Per micro-batch layer, summed over both directions (A2F rows + F2A rows, flags):
# - serialise: the writer building a put's frames (gathering the rows, run lengths, headers);
# - seal / open: AES-GCM at the writer / at the agent (encrypted, or GMAC only on a trusted network);
# - send: the writer's send call (the stream wire: the kernel copies the body into the socket, waiting only when the
#   agent is a whole socket buffer behind);
# - transfer: a rows message's send time (in its seal) to the agent having received and opened it: TCP, the wait behind the
#   agent's earlier messages, the open (one clock: both hosts are this machine);
# - apply: the agent copying rows and flags into its host's windows (and answering reads);
# - backpressure reads: A2F's reads of the FFN header across hosts (a round trip behind the link's earlier puts);
# - doorbell: the agent ringing a local role for a remote writer; the hop: the last F2A flag stamp to the scheduler's
#   return, beside the one-host pipeline's in the same afd bench run.
from __future__ import annotations

import time

from .pipeline import SHAPE, TWO_HOSTS, bench_config

_LINK = ("serialize_ns", "seal_ns", "send_ns", "get_ns")
_AGENT = ("open_ns", "apply_ns", "transfer_ns", "ring_ns")


def measure_two_hosts(steps: int, wait: str = "default", check_reference: bool = True, trusted_network: bool = False,
                      attempts: int = 2) -> dict:
    """One two-host pipeline run and its transport breakdown (ms per micro-batch layer)."""
    from ..launcher.pipeline import Pipeline

    control = {**TWO_HOSTS["control"], "trusted_network": trusted_network}
    for attempt in range(attempts):
        t0 = time.monotonic()
        pipeline = Pipeline(bench_config(steps, wait=wait, check_reference=check_reference,
                                         **{**TWO_HOSTS, "control": control}))
        with pipeline:
            result = pipeline.wait()
            reports = (getattr(pipeline, "_controller_result", None) or {}).get("reports", {})
        if result.outcome == "completed":
            break
    units = max(1, result.micro_batch_layers)
    link = dict.fromkeys(_LINK, 0)
    agent = dict.fromkeys(_AGENT, 0)
    row_messages = busy_ns = refused = 0
    for rep in reports.values():
        extra = rep.get("extra") or {}
        for stats in (extra.get("links") or {}).values():
            for k in _LINK:
                link[k] += stats.get(k, 0)
        for stats in (extra.get("applied") or {}).values():
            for k in _AGENT:
                agent[k] += stats.get(k, 0)
            row_messages += stats.get("row_messages", 0)
        busy_ns += extra.get("busy_ns", 0)
        refused += extra.get("refused", 0) or 0
    ms = lambda ns: ns / 1e6 / units
    hop = result.hops_us.get("flag_hop_ns") or {}
    return {"hosts": 2, "seal": "trusted" if trusted_network else "encrypted", "outcome": result.outcome,
            "reason": result.reason, "attempts": attempt + 1, "micro_batch_layers": result.micro_batch_layers,
            "run_s": result.run_s, "wall_s": time.monotonic() - t0,
            "micro_batch_layers_per_s": result.micro_batch_layers_per_s,
            "outputs_match_reference": result.outputs_match_reference if result.compared else None,
            "hop_us_p50": hop.get("p50"), "hop_us_p99": hop.get("p99"), "hop_n": hop.get("n", 0),
            "put_to_store_us_p50": (result.hops_us.get("f2a_put_to_store_ns") or {}).get("p50"),
            "refused": refused,
            "breakdown_ms_per_micro_batch_layer": {
                "serialise": ms(link["serialize_ns"]), "seal": ms(link["seal_ns"]), "open": ms(agent["open_ns"]),
                "send": ms(link["send_ns"]), "transfer": ms(agent["transfer_ns"]), "apply": ms(agent["apply_ns"]),
                "backpressure_reads": ms(link["get_ns"]), "doorbell": ms(agent["ring_ns"]),
                "agents_busy": ms(busy_ns),
                "period": 1e3 / result.micro_batch_layers_per_s if result.micro_batch_layers_per_s else None},
            "row_messages_per_micro_batch_layer": row_messages / units}


# -- the transport alone: one micro-batch layer's window writes through a link to a WindowServer ---------------------
_WAYS = {  # name: (wire, seal): the stream wire is what the agents serve; ZeroMQ, what links were before (and the
    # fake NPU's windows still are)
    "curve": ("zmq", "curve"), "zmq_encrypted": ("zmq", "encrypted"), "zmq_none": ("zmq", None),
    "encrypted": ("stream", "encrypted"), "trusted": ("stream", "trusted"), "none": ("stream", None)}


def measure_transport(repeats: int = 20) -> dict:
    """ms per micro-batch layer's writes across hosts (A2F: 48 token rows into 432 slots, F2A: 432 rows, each with
    its flags, then a read that returns once the server applied them all), over TCP on this machine, the server in a
    thread of this process, side by side: the stream wire encrypted (the default), trusted (rows in clear, GMAC) and
    without keys; ZeroMQ with libzmq's CURVE on the socket (every link before issue 21), with AES-GCM seals, and
    without keys (the fake NPU's windows)."""
    import threading

    import numpy as np
    import zmq

    from .. import comm_stream, control, device
    from ..comm_remote import AgentLink, LocalRegion, RemoteWindow, StreamServer, WindowServer
    from ..transport_seal import transport_key

    bs, k1, h = SHAPE["micro_batch_size"], SHAPE["top_k"] + 1, SHAPE["hidden_size"]
    n, width = bs * k1, h * 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1 << 16, (bs, h), dtype=np.uint16)
    y = rng.integers(0, 1 << 16, (n, h), dtype=np.uint16)
    keys = {"client_secret": zmq.curve_keypair()[1].decode()}
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    curve = {"server_public": server_pub.decode(), "server_secret": server_sec.decode(),
             "client_public": client_pub.decode(), "client_secret": client_sec.decode()}
    out = {}
    dev = device.Device()
    try:
        buf = dev.malloc(4096 + 2 * n * width)
        for way, (wire, seal) in _WAYS.items():
            ctx = zmq.Context()
            auth = None
            sealed = seal in ("encrypted", "trusted")
            server = WindowServer({buf.address: LocalRegion(dev, buf.address, buf.size)},
                                  key=transport_key(keys) if sealed else None, seal=seal if sealed else "encrypted")
            done = threading.Event()
            if wire == "stream":
                poller = zmq.Poller()
                stream = StreamServer(server, comm_stream.listen("127.0.0.1"), poller)
                endpoint = f"{comm_stream.SCHEME}127.0.0.1:{stream.listener.getsockname()[1]}"

                def serve():
                    while not done.is_set():
                        for fd, _ in poller.poll(10):
                            stream.serve(fd)
            else:
                router = control.socket(ctx, zmq.ROUTER, rcvhwm=100000)
                if seal == "curve":
                    auth = control.start_authenticator(ctx, curve)
                    control.curve_server(router, curve)
                endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

                def serve():
                    while not done.is_set():
                        if router.poll(10):
                            server.handle(router, router.recv_multipart(copy=False))
            link = AgentLink(ctx, endpoint, curve if seal == "curve" else keys if sealed else None, "bench", "b",
                             seal=seal or "encrypted")
            win = RemoteWindow(link, buf.address, buf.size)
            t = threading.Thread(target=serve)
            t.start()
            slots = np.arange(n, dtype=np.int64)
            times = []
            try:
                for _ in range(repeats + 2):
                    t0 = time.perf_counter()
                    win.put_rows_of(4096, width, slots, tokens, np.repeat(np.arange(bs), k1))  # A2F
                    win.put_i32(0, slots, 1)
                    win.put_rows_of(4096 + n * width, width, slots, y, slots)  # F2A
                    win.put_i32(0, slots, 1)
                    win.get_i32(0, 1)
                    times.append(time.perf_counter() - t0)
            finally:
                done.set()
                t.join()
                link.close()
                if wire == "stream":
                    stream.close()
                if auth is not None:
                    auth.stop()
                ctx.destroy(linger=0)
            out[way] = {"ms": float(np.median(times[2:])) * 1e3, "refused": server.refused,
                        "seal_ms": link.seal_ns / 1e6 / len(times), "open_ms": sum(
                            st["open_ns"] for st in server.stats.values()) / 1e6 / len(times)}
        del buf
    finally:
        dev.close()
    base = out["encrypted"]["ms"]
    return {"bytes": (bs + n) * width, **out,
            "curve_vs_encrypted": out["curve"]["ms"] / base, "trusted_vs_encrypted": out["trusted"]["ms"] / base,
            "none_vs_encrypted": out["none"]["ms"] / base}
