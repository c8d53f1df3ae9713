"""Check before start: a run that cannot fit the machine, or whose outputs cannot be written, is refused in one line."""
import json
import os
import time

import pytest

from afd import config as config_mod
from afd import control, device, preflight
from afd.cli import main
from afd.errors import ConfigError
from afd.launcher import pipeline as pipeline_mod


@pytest.fixture
def refused(monkeypatch, capsys, tmp_path):
    """Run main(argv); assert exit 2, one error line, nothing started, within 2 s; return (stderr line, stdout)."""
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))
    started = []
    monkeypatch.setattr(pipeline_mod.Pipeline, "start", lambda self: started.append(self) or self)

    def run(*argv):
        before = set(device.created_namespaces)
        t0 = time.monotonic()
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        assert code == 2, (out, err)
        assert time.monotonic() - t0 < 2.0
        errors = [line for line in err.splitlines() if line.startswith("afd: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert not started and set(device.created_namespaces) == before
        assert not control.runs_root().exists() or not any(control.runs_root().iterdir())
        return errors[0], out
    return run


@pytest.mark.parametrize("argv, words", [
    (["--set", "micro_batch_size=1000000"], "micro_batch_size: the run needs about"),
    (["--set", "hidden_size=100000000"], "hidden_size: the run needs"),
    (["--set", "sessions=500"], "sessions: the run would spawn 1502 processes at sessions=500"),
    (["--set", "seed=-1"], "seed: Input should be greater than or equal to 0 (got -1)"),
    (["--trace", "/nonexistent/dir/t.json"], "--trace: directory /nonexistent/dir does not exist"),
    (["--report", "/proc/x.json"], "--report: cannot create files in /proc"),
    (["--plot", "/tmp"], "--plot: /tmp is a directory, not a file"),
    (["--log", "/nonexistent/run.log"], "--log: directory /nonexistent does not exist"),
], ids=["huge-micro-batch", "huge-hidden", "500-sessions", "negative-seed", "trace-dir", "report-proc", "plot-dir",
        "log-dir"])
def test_refused_before_anything_starts(argv, words, refused):
    line, _ = refused("run", *argv)
    assert words in line


def test_a_huge_run_names_what_it_needs_and_what_there_is(refused):
    line, _ = refused("run", "--set", "micro_batch_size=1000000")
    need = preflight.needs(config_mod.load(None, ["micro_batch_size=1000000"]))
    assert f"{need.memory_bytes / (1 << 30):.2f} GiB" in line and "this machine has" in line and "available" in line


def test_campaign_seed_must_not_be_negative(refused):
    line, _ = refused("faults", "campaign", "--seed", "-1")
    assert "--seed: must be >= 0, got -1" in line


def test_check_prints_both_figures_and_refuses_what_does_not_fit(refused, capsys):
    line, out = refused("check", "--set", "sessions=500")
    assert "sessions: the run would spawn 1502 processes" in line
    assert "processes" in out and "1,502" in out and f"limit {preflight.max_processes()}" in out
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    have = preflight.has()
    assert "/dev/shm has" in out and "available" in out
    need = preflight.needs(config_mod.load(None))
    assert f"needs {need.shared_bytes:>14,} B" in out and f"needs {need.memory_bytes:>14,} B" in out
    assert main(["check", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["resources"]
    assert rep["fits"] is True and rep["needs"]["processes"] == 5
    assert rep["has"]["max_processes"] == have.max_processes


@pytest.mark.parametrize("shm, mem, procs, key, words", [
    (1 << 40, 1 << 40, 4, "sessions", "over the limit of 4"),
    (1 << 20, 1 << 40, 64, "micro_batch_size", "more than the 1.0 MiB free in /dev/shm"),
    (1 << 40, 100 << 20, 64, "micro_batch_size", "more than the 100.0 MiB this machine has available"),
])
def test_each_resource_is_checked_and_names_the_largest_key(monkeypatch, shm, mem, procs, key, words):
    monkeypatch.setattr(preflight, "has", lambda: preflight.Has(shm, mem, procs))
    cfg = config_mod.load(None, ["micro_batch_size=4096"])
    with pytest.raises(ConfigError) as exc:
        preflight.check(cfg)
    assert exc.value.field == key and words in str(exc.value)


def test_the_default_run_fits_and_the_estimate_covers_its_shared_memory():
    cfg = config_mod.load(None)
    preflight.check(cfg)
    need = preflight.needs(cfg)
    assert need.shared_bytes == preflight.sizes(cfg)["total_bytes"]
    assert need.memory_bytes > need.shared_bytes + need.processes * preflight.PROCESS_BYTES
    linear = preflight.needs(config_mod.load(None, ["hidden_size=4096"]))
    scale = preflight.needs(config_mod.load(None, ["hidden_size=4096", "expert_kind=scale"]))
    # the linear experts' float64 H x H weights: on the FFN rank and in the reference, per layer and expert
    assert linear.memory_bytes - scale.memory_bytes == 2 * 2 * 5 * 8 * 4096 * 4096


@pytest.mark.parametrize("value, words", [("x", "must be a whole number, got 'x'"), ("0", "must be > 0, got 0")])
def test_max_processes_env(monkeypatch, value, words):
    monkeypatch.setenv("AFD_MAX_PROCESSES", value)
    with pytest.raises(ConfigError, match="AFD_MAX_PROCESSES") as exc:
        preflight.max_processes()
    assert words in str(exc.value)
    monkeypatch.setenv("AFD_MAX_PROCESSES", "3")
    assert preflight.max_processes() == 3
    with pytest.raises(ConfigError, match="over the limit of 3"):
        preflight.check(config_mod.load(None))


def test_check_output_accepts_a_new_or_existing_file_and_leaves_no_probe(tmp_path):
    preflight.check_output("--report", tmp_path / "new.json")
    (tmp_path / "old.json").write_text("{}")
    preflight.check_output("--report", tmp_path / "old.json")
    preflight.check_output("--report", None)
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


@pytest.mark.timeout(120)
def test_an_output_lost_after_the_run_is_one_line_and_the_others_are_written(tmp_path, monkeypatch, capsys):
    """Checked writable before the run, a directory removed during it: one line, exit 1, the trace still written."""
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))
    gone = tmp_path / "gone"
    gone.mkdir()
    from afd.launcher import report as report_mod  # (afd run imports write_report from there when it writes)
    real = report_mod.write_report

    def remove_then_write(result, path, log=None):
        gone.rmdir()
        real(result, path, log)
    monkeypatch.setattr(report_mod, "write_report", remove_then_write)
    code = main(["run", "--quiet", "--steps", "1", "--report", str(gone / "r.json"), "--trace",
                 str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"afd: error: --report: could not write {gone / 'r.json'}: No such file or directory" in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
