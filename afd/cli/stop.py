"""`afd stop`: ask a running pipeline's controller to stop it (run_flag = 0 in every context, then the wake-up).

Without --endpoint the one pipeline running on this machine is found through its run directory (afd.control.
live_runs()); the run's token from run.json authenticates the request. Exit 0 when the controller acknowledged,
1 when nothing is running or nothing answered, 2 when several pipelines run and --endpoint is needed.
With no pipeline running (or --npu), the torch jobs on the fake NPU are stopped instead: run_flag = 0 in every
schedule context they hold (found through afd.npu.registry), what their stop_schedule() would write.
"""
from __future__ import annotations

import os
import sys
import time

ACK_TIMEOUT_S = 2.0
EXIT_OK, EXIT_NOTHING, EXIT_AMBIGUOUS = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser("stop", help="stop a running pipeline (the one on this machine, or the one at --endpoint)")
    p.add_argument("--endpoint", metavar="E", help="the controller's endpoint, e.g. ipc:///tmp/afd-runs/<ns>/ctl.sock "
                                                   "or tcp://host:port (see the run's run.json)")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="after the acknowledgement, wait this long for a local pipeline to exit (0: do not wait)")
    p.add_argument("--npu", action="store_true",
                   help="stop the torch jobs on the fake NPU (run_flag = 0 in every schedule context of theirs), "
                        "even while a pipeline runs too")
    p.set_defaults(handler=main)


def _describe(run: dict) -> str:
    return f"{run.get('name', '?')} (pid {run.get('pid', '?')}, endpoint {run.get('endpoint', '?')})"


def _err(message: str) -> None:
    print(f"afd stop: {message}", file=sys.stderr)


def request_stop(endpoint: str, token: str | None, timeout_s: float = ACK_TIMEOUT_S,
                 curve: dict | None = None) -> dict | None:
    """Send one stop to the controller at `endpoint`; the "ack" payload, or None when none came in time.
    `curve`: the run's CURVE keys (curve.json of its run directory), needed for a TCP control plane."""
    import zmq

    from .. import control
    ctx = zmq.Context()
    try:
        sock = control.socket(ctx, zmq.DEALER, identity=f"afd-stop-{os.getpid()}".encode())
        control.curve_client(sock, curve)
        sock.connect(endpoint)
        payload = {"reason": f"afd stop (pid {os.getpid()})"}
        if token:
            payload["token"] = token
        sock.send_multipart(control.encode("stop", payload))
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            try:
                kind, reply = control.decode(sock.recv_multipart())
            except control.MalformedMessage:
                continue
            if kind == "ack":
                return reply
        return None
    finally:
        ctx.destroy(linger=0)


def stop_npu_jobs() -> int:
    """run_flag = 0 in every schedule context of every torch job on the fake NPU on this machine."""
    from ..npu import registry
    jobs = registry.jobs()
    if not jobs:
        _err("no afd pipeline and no torch job on the fake NPU is running on this machine")
        return EXIT_NOTHING
    total = 0
    for job in jobs:
        n = registry.stop(job)
        total += n
        rank = f"rank {job['rank']}, " if job.get("rank") is not None else ""
        print(f"afd stop: run_flag = 0 in {n} schedule context(s) of pid {job['pid']} ({rank}fake NPU)")
    return EXIT_OK if total else EXIT_NOTHING


def main(args) -> int:
    from .. import control
    runs = control.live_runs()
    if args.npu or (not runs and not args.endpoint):
        return stop_npu_jobs()
    if args.endpoint:
        endpoint = args.endpoint
        run = next((r for r in runs if r.get("endpoint") == endpoint), None)
    else:
        if not runs:
            _err("no afd pipeline is running on this machine")
            return EXIT_NOTHING
        if len(runs) > 1:
            _err(f"{len(runs)} afd pipelines are running on this machine; pass --endpoint E to pick one:")
            for r in runs:
                print(f"  {r.get('name', '?')}  pid {r.get('pid', '?')}  endpoint {r.get('endpoint', '?')}",
                      file=sys.stderr)
            return EXIT_AMBIGUOUS
        run = runs[0]
        endpoint = run["endpoint"]
    token = run.get("token") if run else None
    # a TCP control plane admits only the run's own CURVE client key (curve.json beside run.json)
    curve = control.read_curve_keys(control.runs_root() / str(run.get("namespace", ""))) if run else None
    if run is None:
        print(f"afd stop: no run on this machine has endpoint {endpoint}; sending the stop without the run's token "
              "(the controller refuses unauthenticated stops, so expect no acknowledgement)", file=sys.stderr)
    ack = request_stop(endpoint, token, ACK_TIMEOUT_S, curve)
    if ack is None:
        why = ("the controller refuses a stop without the run's token" + (
               " (and a TCP control plane admits only the run's CURVE key)" if endpoint.startswith("tcp://") else "")
               if not token else "the pipeline may have ended already or be hung")
        _err(f"no acknowledgement from {endpoint} within {ACK_TIMEOUT_S:g} s ({why})")
        return EXIT_NOTHING
    target = _describe(run) if run else endpoint
    print(f"afd stop: stop acknowledged by the controller of {target} (phase {ack.get('phase', '?')}); "
          "run_flag = 0 in every context")
    if run and args.wait > 0:
        pid = int(run["pid"])
        run_dir = control.runs_root() / str(run.get("namespace", ""))
        launcher = control.LauncherWatch(pid)  # (by start time: a zombie or a reused pid is gone)

        def running() -> bool:  # the launcher removes the run directory once every process is gone
            return not launcher.gone() and run_dir.is_dir()

        end = time.monotonic() + args.wait
        while running() and time.monotonic() < end:
            time.sleep(0.005)  # (a stop is over in well under 0.5 s: 20 ms steps were a tenth of it)
        if running():
            print(f"afd stop: the launcher (pid {pid}) is still running after {args.wait:g} s", file=sys.stderr)
        else:
            print(f"afd stop: the pipeline has exited (launcher pid {pid})")
    return EXIT_OK
