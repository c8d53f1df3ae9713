"""No process outlives its parent: after `afd stop`, a SIGTERM or a SIGKILL of the launcher, the fork server has reaped
every role it forked (none is handed to init as a zombie), and the launcher's process group empties. A helper makes
itself the child subreaper, so whatever is orphaned comes to it (not to init) and is seen: after a stop or a SIGTERM
nothing is (the launcher reaped the fork server, the resource tracker and the reaper before it exited); after a
SIGKILL only the launcher's own children are, never a role."""
import json
import os
import subprocess
import sys

import pytest

HELPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
from afd import control
from afd.bench.stop import group, wait_running

how = sys.argv[1]
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
proc = subprocess.Popen([sys.executable, "-m", "afd", "run", "--quiet", "--steps", "100000000"],
                        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 60
run = None
while run is None and time.monotonic() < deadline:
    run = next((r for r in control.live_runs() if r.get("pid") == proc.pid), None)
    time.sleep(0.02)
wait_running(run, deadline - time.monotonic())
if how == "stop":
    subprocess.run([sys.executable, "-m", "afd", "stop"], stdout=subprocess.DEVNULL, timeout=30)
else:
    os.kill(proc.pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
proc.wait(30)
left_at_exit = group(proc.pid)
orphans = []  # what came to this subreaper: a process whose parent was gone before it
end = time.monotonic() + 10
while time.monotonic() < end:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pid = 0
    if pid:
        orphans.append(pid)
    elif not group(proc.pid):
        break
    else:
        time.sleep(0.005)
print(json.dumps({"code": proc.returncode, "roles": run["roles"], "left_at_exit": left_at_exit, "orphans": orphans,
                  "left": group(proc.pid)}))
"""


def _end_run(how: str, tmp_path) -> dict:
    """Start `afd run` under the helper, end it by `how` (stop, term, kill); what the helper saw."""
    proc = subprocess.run([sys.executable, "-c", HELPER, how], capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, AFD_RUN_DIR=str(tmp_path / "runs")))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["stop", "term"])
def test_after_a_stop_or_a_sigterm_the_launcher_leaves_no_process_behind(how, tmp_path):
    r = _end_run(how, tmp_path)
    assert r["code"] == 0
    assert r["left_at_exit"] == []  # its group was empty when it exited: nothing left running, no zombie
    assert r["orphans"] == []  # and nothing was handed on to a subreaper (or init)


@pytest.mark.timeout(120)
def test_after_a_launcher_sigkill_the_fork_server_reaps_every_role(tmp_path):
    r = _end_run("kill", tmp_path)
    assert r["code"] == -9
    roles = set(r["roles"].values())
    assert roles and not roles & set(r["orphans"])  # the server reaped them: none was orphaned, not even a zombie
    assert r["orphans"]  # (the launcher's own children were: the fork server, the resource tracker, the reaper)
    assert r["left"] == []  # and the group emptied: every role left once the launcher was gone
