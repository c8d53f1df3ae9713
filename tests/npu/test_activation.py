"""Putting the fake in place: `afd npu -- CMD` (and every process it starts), install(), the pytest option; and
nothing shadowed without being asked."""
import subprocess
import sys
import textwrap

import pytest
import torch_npu

AFD = [sys.executable, "-m", "afd"]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.timeout(120)
def test_afd_npu_runs_a_command_and_every_process_it_starts_on_the_fake():
    child = "import torch, torch_npu; print(torch.npu.get_device_name(), torch.zeros(1, device='npu:1').device)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True); " \
           f"import torch; print(torch.npu.device_count(), torch.npu.is_available())"
    r = run(AFD + ["npu", "--soc", "Ascend910_9391", "--", sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Ascend910_9391 npu:1", "8 True"]


@pytest.mark.timeout(120)
def test_without_afd_npu_nothing_is_shadowed():
    r = run([sys.executable, "-c", "import torch; print(hasattr(torch, 'npu'))\nimport torch_npu"])
    assert r.stdout.strip() == "False"
    assert "ModuleNotFoundError: No module named 'torch_npu'" in r.stderr


@pytest.mark.timeout(60)
def test_exit_codes_and_bad_options():
    assert run(AFD + ["npu", "--", sys.executable, "-c", "import sys; sys.exit(7)"]).returncode == 7
    r = run(AFD + ["npu", "--", "no-such-command-here"])
    assert r.returncode == 127 and r.stderr.strip() == "afd npu: cannot start 'no-such-command-here': " \
                                                       "No such file or directory"
    r = run(AFD + ["npu", "--fault", "drop-flag:ffn0@call=1", "--", sys.executable, "-c", "pass"])
    assert r.returncode == 2
    assert r.stderr.strip() == "afd: error: AFD_NPU_FAULTS: fault 'drop-flag:ffn0@call=1': target must be rank<N> " \
                               "(a torchrun rank), got 'ffn0'"
    r = run(AFD + ["npu", "--stall-timeout", "0", "--", sys.executable, "-c", "pass"])
    assert r.returncode == 2 and "--stall-timeout: must be > 0, got 0.0" in r.stderr


@pytest.mark.timeout(120)
def test_the_pytest_option_installs_the_fake_before_test_modules_import_torch_npu(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import torch
        import torch_npu  # at import time, before any fixture

        def test_combine_exists():
            assert torch.zeros(2, device="npu").device.type == "npu"
            assert callable(torch_npu.npu_attention_worker_combine)
    """))
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--afd-npu", str(tmp_path)],
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout


def test_install_is_idempotent_and_the_module_says_what_it_lacks():
    import afd.npu
    afd.npu.install()
    assert afd.npu.installed() and torch_npu.__version__ == "2.14.0"
    with pytest.raises(AttributeError, match="torch_npu.npu_fused_infer_attention_score: the fake NPU"):
        torch_npu.npu_fused_infer_attention_score
