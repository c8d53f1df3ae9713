"""Config validation: every bad config is one clear line naming the key and the rule, exit code 2, before any
process starts; `afd check` prints the sizes of every rank and the HCCL window-size rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afd import config as config_mod
from afd import device
from afd.cli import main
from afd.errors import ConfigError
from afd.launcher import pipeline as pipeline_mod

ROOT = Path(__file__).resolve().parents[1]

# (name, YAML text, words the one error line must contain)
BAD_CONFIGS = [
    ("zero_sessions", "sessions: 0\n", ["sessions", "greater than 0", "got 0"]),
    ("zero_hidden", "hidden_size: 0\n", ["hidden_size", "greater than 0"]),
    ("zero_micro_batch_num", "micro_batch_num: 0\n", ["micro_batch_num", "greater than 0"]),
    ("token_size_not_512", "hidden_size: 100\n", ["hidden_size", "multiple of 512", "200 bytes"]),
    ("token_size_not_512_bf16", "hidden_size: 384\ntoken_dtype: bf16\n", ["hidden_size", "multiple of 512"]),
    ("k_plus_1_mismatch", "top_k: 2\nselected_expert_num: 4\n", ["selected_expert_num", "top_k + 1 = 3", "got 4"]),
    ("expert_on_no_rank", "ffn_ranks: 2\nrouted_experts: 4\nplacement: {0: [0], 1: [1], 2: [0], 3: [1]}\n",
     ["placement", "expert 4", "no FFN rank"]),
    ("expert_with_empty_ranks", "placement: {0: [0], 1: [0], 2: [], 3: [0], 4: [0]}\n",
     ["placement", "expert 2", "no FFN rank"]),
    ("expert_on_missing_rank", "placement: {0: [0], 1: [0], 2: [0], 3: [0], 4: [3]}\n",
     ["placement", "expert 4", "[3]"]),
    ("unknown_key", "sesions: 2\n", ["sesions", "unknown key", "did you mean sessions"]),
    ("unknown_nested_key", "control: {prt: 1}\n", ["control.prt", "unknown key"]),
    ("wrong_type_string", 'micro_batch_num: "two"\n', ["micro_batch_num", "valid integer", "'two'"]),
    ("wrong_type_float", "micro_batch_num: 2.5\n", ["micro_batch_num", "valid integer", "2.5"]),
    ("wrong_type_bool", "steps: true\n", ["steps", "valid integer"]),
    ("wrong_literal", "mode: fast\n", ["mode", "'sync' or 'async'", "'fast'"]),
    ("wrong_nested_literal", "control: {transport: udp}\n", ["control.transport", "'udp'"]),
    ("placement_not_mapping", "placement: [1, 2]\n", ["placement", "dictionary"]),
    ("negative_size", "micro_batch_size: -8\n", ["micro_batch_size", "greater than 0", "got -8"]),
    ("negative_float", "spin_us: -1\n", ["spin_us", "greater than or equal to 0", "got -1"]),
    ("too_many_micro_batches", "micro_batch_num: 65\n", ["micro_batch_num", "64"]),
    ("active_over_capacity", "active_tokens: 9\n", ["active_tokens", "micro_batch_size (8)", "got 9"]),
    ("top_k_over_experts", "top_k: 5\n", ["top_k", "routed_experts (4)"]),
    ("strict_hidden_size", "strict: true\n", ["hidden_size", "strict mode", "[1024, 8192]"]),
    ("bad_yaml", "sessions: [1\n", ["bad_yaml.yaml", "not valid YAML", "line 2"]),
    ("bad_yaml_mapping", "a: b: c\n", ["not valid YAML", "line 1, column 5"]),
    ("non_mapping_yaml", "- 1\n- 2\n", ["non_mapping_yaml.yaml", "must hold a mapping"]),
    ("scalar_yaml", "42\n", ["must hold a mapping"]),
]
# run through a real `python -m afd run BAD.yaml` (the rest in-process through afd.cli.main)
SUBPROCESS_CASES = {"token_size_not_512", "k_plus_1_mismatch", "expert_on_no_rank", "wrong_type_string",
                    "bad_yaml"}

BAD_SETS = [
    (["--set", "micro_batch_num"], ["--set", "expects key=value", "'micro_batch_num'"]),
    (["--set", "=3"], ["--set", "expects key=value"]),
    (["--set", "hidden_size=abc"], ["hidden_size", "valid integer", "'abc'"]),
    (["--set", "hidden_size=100"], ["hidden_size", "multiple of 512"]),
    (["--set", "sesions=2"], ["sesions", "unknown key"]),
    (["--set", "control.transport=udp"], ["control.transport", "'udp'"]),
    (["--set", "control=3"], ["control", "got 3"]),
    (["--steps", "0"], ["steps", "greater than 0"]),
]


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("AFD_RUN_DIR", str(root))
    return root


@pytest.fixture
def no_start(monkeypatch):
    """Fails the test if a Pipeline got as far as allocating memory or starting a process."""
    started = []
    monkeypatch.setattr(pipeline_mod.Pipeline, "start", lambda self: started.append(self) or self)
    yield started
    assert not started, "a pipeline was started for a bad config"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _one_line_error(code, err: str, words) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("afd: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


def _cli(capsys, *argv: str):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _python_afd(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "afd", *argv], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def _unmapped_new_segments(before: set[str]) -> list[str]:
    """New afd segments mapped by no process: ones a finished command left. (Segments of pipelines other people
    run on this machine meanwhile are mapped by their processes, so they do not count.)"""
    new = set(device.list_segments()) - before
    if not new:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(n for n in new if f"/dev/shm/{n}" in text)
    return sorted(new - mapped)


# -- bad configs: one line, exit 2, nothing started ----------------------------------------------------------

@pytest.mark.parametrize("name,text,words", [pytest.param(*c, id=c[0]) for c in BAD_CONFIGS
                                               if c[0] not in SUBPROCESS_CASES])
def test_bad_config_in_process(capsys, tmp_path, own_runs_root, no_start, name, text, words):
    path = _write(tmp_path, name, text)
    for command in (["run", str(path)], ["check", str(path)]):
        code, out, err = _cli(capsys, *command)
        _one_line_error(code, err, ["config", *words])
        assert "Traceback" not in out
    assert not own_runs_root.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,text,words", [pytest.param(*c, id=c[0]) for c in BAD_CONFIGS
                                               if c[0] in SUBPROCESS_CASES])
def test_bad_config_subprocess_run(tmp_path, own_runs_root, name, text, words):
    path = _write(tmp_path, name, text)
    before = set(device.list_segments())
    proc = _python_afd("run", str(path), "--quiet")
    _one_line_error(proc.returncode, proc.stderr, ["config", *words])
    assert proc.stdout == ""  # no summary: nothing ran
    assert not own_runs_root.exists(), "a run directory appeared"
    assert _unmapped_new_segments(before) == []


def test_missing_file(capsys, tmp_path, no_start):
    code, _, err = _cli(capsys, "run", str(tmp_path / "nope.yaml"))
    _one_line_error(code, err, ["nope.yaml", "cannot be read", "No such file"])


def test_missing_file_subprocess(tmp_path, own_runs_root):
    proc = _python_afd("run", str(tmp_path / "nope.yaml"))
    _one_line_error(proc.returncode, proc.stderr, ["nope.yaml", "cannot be read"])
    assert not own_runs_root.exists()


def test_config_is_a_directory(capsys, tmp_path, no_start):
    code, _, err = _cli(capsys, "check", str(tmp_path))
    _one_line_error(code, err, ["config file", "cannot be read"])


@pytest.mark.parametrize("argv,words", [pytest.param(*c, id=" ".join(c[0])) for c in BAD_SETS])
def test_bad_set(capsys, no_start, own_runs_root, argv, words):
    code, _, err = _cli(capsys, "run", str(ROOT / "configs" / "minimal.yaml"), *argv)
    _one_line_error(code, err, words)
    assert not own_runs_root.exists()


def test_set_into_a_value_that_is_not_a_section(capsys, tmp_path, no_start):
    path = _write(tmp_path, "s", "sessions: 1\n")
    code, _, err = _cli(capsys, "check", str(path), "--set", "sessions.x=1")
    _one_line_error(code, err, ["--set sessions.x", "sessions is not a section"])


def test_load_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        config_mod.load({"micro_batch_size": 0})
    assert info.value.field == "config: micro_batch_size"
    with pytest.raises(ConfigError, match="selected_expert_num"):
        config_mod.load(None, ["top_k=3", "selected_expert_num=3"])


def test_good_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = config_mod.load(path)
        assert cfg.name == path.stem
        assert cfg.token_bytes % 512 == 0
    cfg = config_mod.load(ROOT / "configs" / "deepseek.yaml")
    assert (cfg.micro_batch_size, cfg.top_k, cfg.selected, cfg.hidden_size, cfg.token_dtype) == (48, 8, 9, 7168,
                                                                                                 "bf16")
    assert (cfg.sessions, cfg.ffn_ranks, cfg.micro_batch_num, cfg.expert_kind) == (2, 2, 3, "scale")
    assert config_mod.load(ROOT / "configs" / "masked.yaml").valid_tokens < 8
    assert config_mod.load(ROOT / "configs" / "minimal.yaml", ["micro_batch_num=3"]).micro_batch_num == 3


# -- afd check ---------------------------------------------------------------------------------------------

def test_check_prints_every_size(capsys, no_start):
    code, out, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"))
    assert code == 0, err
    assert err == ""
    cfg = config_mod.load(ROOT / "configs" / "deepseek.yaml")
    assert "config is valid" in out
    for label in ("attention window", "FFN window", "FFN out buffers", "schedule context", "session stream"):
        assert label in out, label
    assert f"{cfg.attention_window_bytes():,} B" in out
    assert f"{cfg.ffn_window_bytes():,} B" in out
    assert f"{cfg.ffn_out_layout().total_bytes:,} B" in out
    assert "HCCL window rule" in out and "holds" in out and "DOES NOT HOLD" not in out


def test_check_json_matches_the_config(capsys, no_start):
    code, out, _ = _cli(capsys, "check", str(ROOT / "configs" / "multi.yaml"), "--json", "--set", "steps=7")
    assert code == 0
    rep = json.loads(out)
    cfg = config_mod.load(ROOT / "configs" / "multi.yaml", ["steps=7"])
    s = rep["sizes"]
    assert rep["config"]["steps"] == 7
    assert s["attention_window"]["total_bytes"] == cfg.attention_window_bytes()
    assert s["ffn_window"]["total_bytes"] == cfg.ffn_window_bytes()
    assert s["ffn_out_buffers"]["total_bytes"] == cfg.ffn_out_layout().total_bytes
    assert s["per_attention_session"]["schedule_context"] == 1024
    assert s["total_bytes"] == (cfg.sessions * s["per_attention_session"]["total"]
                                + cfg.ffn_ranks * s["per_ffn_rank"]["total"] + s["run_wide"]["total"])
    # (M*BS*(K+1)*HS*2 + M*BS*(K+1)*4) // MiB + 1
    m, bs, k1, hs = cfg.micro_batch_num, cfg.micro_batch_size, cfg.selected, cfg.hidden_size
    assert rep["hccl_window"]["needed_mb"] == (m * bs * k1 * hs * 2 + m * bs * k1 * 4) // (1 << 20) + 1
    assert rep["hccl_window"]["holds"] is True
    assert rep["processes"] == cfg.role_ids()


def test_check_sizes_match_what_a_run_allocates():
    """The sizes `afd check` prints are the sizes the launcher allocates."""
    from afd.preflight import sizes
    from afd.runtime.memory import RunMemory
    cfg = config_mod.load(ROOT / "configs" / "multi.yaml")
    dev = device.Device()
    try:
        mem = RunMemory.create(cfg, dev)
        got = sum(os.path.getsize(os.path.join(device.SHM_DIR, n)) for n in dev.owned_segments())
        assert got == sizes(cfg)["total_bytes"]
        assert mem.plan["attention"][0]["window_size"] == cfg.attention_window_bytes()
    finally:
        dev.close()


BIG = ["--set", "micro_batch_size=512", "--set", "top_k=15", "--set", "routed_experts=16"]


def test_check_hccl_rule_broken_is_a_warning(capsys, monkeypatch, no_start):
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    monkeypatch.delenv("AFD_STRICT", raising=False)
    code, out, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"), *BIG)
    assert code == 0
    assert "needs 337 MB, HCCL_BUFFSIZE is 200 MB: DOES NOT HOLD" in out
    assert err.startswith("afd: warning: HCCL_BUFFSIZE: HCCL window rule broken")
    assert len(err.strip().splitlines()) == 1


def test_check_hccl_rule_follows_the_env(capsys, monkeypatch, no_start):
    monkeypatch.setenv("HCCL_BUFFSIZE", "400")
    code, out, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"), *BIG)
    assert code == 0 and err == ""
    assert "needs 337 MB, HCCL_BUFFSIZE is 400 MB: holds" in out
    monkeypatch.setenv("HCCL_BUFFSIZE", "lots")
    code, _, err = _cli(capsys, "check")
    _one_line_error(code, err, ["HCCL_BUFFSIZE", "whole number", "'lots'"])


def test_check_hccl_rule_broken_is_an_error_in_strict_mode(capsys, monkeypatch, no_start):
    # within the strict A3 limits (M == 1, BS <= 512, K <= 16, H <= 8192) the rule needs at most 143 MB, so a
    # smaller HCCL_BUFFSIZE is what breaks it: 1*512*16*7168*2 bytes -> 113 MB
    monkeypatch.setenv("HCCL_BUFFSIZE", "100")
    code, out, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"), *BIG, "--strict",
                          "--set", "micro_batch_num=1")
    assert code == 2
    assert "DOES NOT HOLD" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afd: error: HCCL_BUFFSIZE:"), err
    # strict mode holds with a big enough window and M == 1
    monkeypatch.setenv("HCCL_BUFFSIZE", "400")
    code, out, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"), *BIG, "--strict",
                          "--set", "micro_batch_num=1")
    assert code == 0, err


def test_check_default_config_subprocess(own_runs_root):
    proc = _python_afd("check", env_extra={"HCCL_BUFFSIZE": ""})
    assert proc.returncode == 0, proc.stderr
    assert "(built-in default)" in proc.stdout and "holds" in proc.stdout
    assert not own_runs_root.exists()


def test_check_strict_mode_flags_more_than_one_micro_batch(capsys, monkeypatch, no_start):
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    code, _, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"), "--strict")
    _one_line_error(code, err, ["micro_batch_num", "M == 1 on A3", "got 3"])
    code, _, err = _cli(capsys, "check", str(ROOT / "configs" / "deepseek.yaml"))  # not strict: no complaint
    assert code == 0 and err == ""
