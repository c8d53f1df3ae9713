"""`afd stop` from another shell finds a torch job's schedule contexts and ends its spinning operators with OK."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from afd.npu import registry
from afd.npu.launch import TorchrunJob

HERE = Path(__file__).parent


@pytest.mark.timeout(180)
def test_afd_stop_ends_every_spin_of_a_torchrun_job(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))
    job = TorchrunJob(str(HERE / "scripts" / "spin_until_stopped.py"), [], nproc=2,
                      env={"AFD_NPU_STALL_TIMEOUT_S": "120"})
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("result", job.run(150)))
    t.start()
    try:
        deadline = time.monotonic() + 90
        while len(registry.jobs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(registry.jobs()) == 2, "both ranks list their schedule context"
        time.sleep(1.0)  # both are in their spin by now
        r = subprocess.run([sys.executable, "-m", "afd", "stop"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("run_flag = 0 in 1 schedule context(s) of pid") == 2
        t.join(60)
        result = box["result"]
    finally:
        job.cleanup()
    assert result.returncode == 0, result.output[-3000:]
    for rank in (0, 1):
        assert "stopped: True" in result.ranks[rank].output
    assert "ended by run_flag = 0" in result.output
    assert registry.jobs() == [] and not list((tmp_path / "runs" / "npu").glob("*.json"))
