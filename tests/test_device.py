"""Unit tests of afd.device: allocation, views, addressing errors, cross-process attach and ownership."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from afd import device
from afd.device import ADDRESS_BASE, SHM_DIR, Device
from afd.errors import DeviceAddressError

ROOT = Path(__file__).resolve().parents[1]




def _run_child(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `code` as a separate Python program (a fresh interpreter, like a spawned role)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_malloc_view_free(dev):
    a = dev.malloc(4096)
    b = dev.malloc(100)
    assert a.address != 0 and b.address != 0 and a.address != b.address
    assert a.address >= ADDRESS_BASE
    assert a.size == 4096
    v = a.view(np.int32)
    assert v.shape == (1024,) and not v.any()  # fresh memory is zeroed
    v[:] = np.arange(1024)
    again = dev.view(a.address + 8, 8, "<i4")  # an interior address resolves to the same memory
    assert again.tolist() == [2, 3]
    assert a.view("<i4", shape=(2, 4), offset=16).tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert dev.allocation_size(a.address + 100) == 4096 - 100
    assert sorted(dev.owned_segments()) == sorted([a.name, b.name])
    del v, again
    dev.free(a)
    dev.free(b.address)
    assert dev.owned_segments() == []
    assert device.list_segments(dev.namespace) == []


def test_segments_are_private_to_the_user(dev):
    buf = dev.malloc(64)
    mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, buf.name)).st_mode)
    assert mode == 0o600, oct(mode)


def test_free_unlinks_the_segment_and_the_address_dies(dev):
    buf = dev.malloc(64)
    path = os.path.join(SHM_DIR, buf.name)
    assert os.path.exists(path)
    dev.free(buf)
    assert not os.path.exists(path)
    with pytest.raises(DeviceAddressError, match="not allocated"):
        Device(dev.namespace).view(buf.address, 4, field="attention.token_data_buf")


def test_null_address_error_names_the_field(dev):
    with pytest.raises(DeviceAddressError) as exc:
        dev.view(0, 4, field="attention.token_info_buf")
    assert exc.value.field == "attention.token_info_buf"
    assert "null" in exc.value.rule
    assert "attention.token_info_buf" in str(exc.value)


def test_out_of_range_view_names_field_and_bounds(dev):
    buf = dev.malloc(100)
    with pytest.raises(DeviceAddressError) as exc:
        dev.view(buf.address + 96, 8, field="ffn.token_data_buf")
    assert exc.value.field == "ffn.token_data_buf"
    assert "runs past" in exc.value.rule and "100" in exc.value.rule
    dev.view(buf.address + 96, 4)  # the last 4 bytes are fine


@pytest.mark.parametrize("address, words", [(123, "not a device address"),
                                            (ADDRESS_BASE + (1 << 36) * 999, "not allocated")])
def test_bad_addresses_are_errors_not_segfaults(dev, address, words):
    with pytest.raises(DeviceAddressError, match=words) as exc:
        dev.view(address, 4, field="ffn.expert_ids_buf")
    assert exc.value.field == "ffn.expert_ids_buf"


def test_malloc_and_free_argument_errors(dev):
    with pytest.raises(DeviceAddressError, match="> 0"):
        dev.malloc(0)
    buf = dev.malloc(64)
    with pytest.raises(DeviceAddressError, match="base address"):
        dev.free(buf.address + 8)
    with pytest.raises(DeviceAddressError, match="whole number"):
        dev.view(buf.address, 6, "<i4")


def test_close_unlinks_what_this_process_created(dev):
    names = [dev.malloc(32).name for _ in range(3)]
    assert device.list_segments(dev.namespace) == sorted(names)
    dev.close()
    assert device.list_segments(dev.namespace) == []


def test_attacher_does_not_own(dev):
    buf = dev.malloc(32)
    other = Device(dev.namespace)  # same namespace, this process: an attach, not an owner
    other.view(buf.address, 4)[:] = 7
    other.close()
    assert os.path.exists(os.path.join(SHM_DIR, buf.name))
    assert dev.view(buf.address, 4).tolist() == [7, 7, 7, 7]


def test_disown_and_sweep(dev):
    buf = dev.malloc(32)
    dev.disown()
    dev.close()
    assert device.list_segments(dev.namespace) == [buf.name]  # disowned: close left it
    assert device.sweep(dev.namespace) == [buf.name]
    assert device.list_segments(dev.namespace) == []


@pytest.mark.timeout(60)
def test_cross_process_attach_child_writes_parent_reads(dev, tmp_path):
    buf = dev.malloc(4096)
    _run_child("""
        import sys
        import numpy as np
        from afd.device import Device
        d = Device(sys.argv[1])
        v = d.view(int(sys.argv[2]) + 64, 16, "<i4", field="attention.token_info_buf")
        v[:] = [1, 2, 3, 4]
    """, tmp_path, dev.namespace, str(buf.address))
    assert dev.view(buf.address + 64, 16, "<i4").tolist() == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(SHM_DIR, buf.name))


@pytest.mark.timeout(60)
def test_spawned_attacher_does_not_unlink_at_exit(dev, tmp_path):
    """The resource-tracker trap (gh-82300): a multiprocess-spawned child that attaches must not unlink at exit."""
    buf = dev.malloc(64)
    _run_child("""
        import sys
        import multiprocess as mp
        from afd.device import Device

        def attach_and_write(namespace, address):
            d = Device(namespace)
            d.view(address, 4, "<i4")[:] = 42
            d.close()  # even an explicit close must leave the creator's segment alone

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=attach_and_write, args=(sys.argv[1], int(sys.argv[2])))
            p.start()
            p.join(30)
            sys.exit(p.exitcode if p.exitcode is not None else 99)
    """, tmp_path, dev.namespace, str(buf.address))
    # The child and its resource tracker are gone; the segment must still be there with the child's write.
    assert os.path.exists(os.path.join(SHM_DIR, buf.name))
    assert dev.view(buf.address, 4, "<i4").tolist() == [42]
    fresh = Device(dev.namespace)
    assert fresh.view(buf.address, 4, "<i4").tolist() == [42]


_ALLOCATE = "import afd.device as d, os, signal, sys, time; b = d.malloc(4096); print(b.name, flush=True); "


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tail, code", [("pass", 0), ("raise SystemExit(3)", 3), ("1/0", 1),
                                        ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)", -15),
                                        ("os.kill(os.getpid(), signal.SIGHUP); time.sleep(10)", -1)],
                         ids=["exit", "sys.exit", "exception", "SIGTERM", "SIGHUP"])
def test_memory_never_outlives_its_owner(tail, code):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _ALLOCATE + tail], capture_output=True, text=True, timeout=30)
    assert r.returncode == code, r.stderr
    name = r.stdout.strip()
    assert name.startswith("afd-") and name not in device.list_segments()


@pytest.mark.timeout(60)
def test_afd_clean_removes_what_a_sigkilled_owner_left_and_nothing_live():
    import subprocess
    import sys
    live = subprocess.Popen([sys.executable, "-c", _ALLOCATE + "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        live_name = live.stdout.readline().strip()
        dead = subprocess.run([sys.executable, "-c", _ALLOCATE + "os.kill(os.getpid(), signal.SIGKILL)"],
                              capture_output=True, text=True, timeout=30)
        dead_name = dead.stdout.strip()
        assert dead.returncode == -9 and dead_name in device.list_segments()  # SIGKILL: nothing could run
        assert dead_name in device.orphans() and live_name not in device.orphans()
        r = subprocess.run([sys.executable, "-m", "afd", "clean", "--dry-run"], capture_output=True, text=True,
                           timeout=30)
        assert f"would remove segment /dev/shm/{dead_name}" in r.stdout and dead_name in device.list_segments()
        r = subprocess.run([sys.executable, "-m", "afd", "clean"], capture_output=True, text=True, timeout=30)
        assert f"removed segment /dev/shm/{dead_name}" in r.stdout
        assert dead_name not in device.list_segments() and live_name in device.list_segments()
    finally:
        live.terminate()  # SIGTERM: it unlinks its own segment on the way out
        live.wait(10)
    assert live_name not in device.list_segments()
