"""A corpus of invalid inputs (configs, context dumps, CLI arguments, fault specs): each exits 2 with one clear line."""
import json
import subprocess
import sys

import pytest

from afd import control, device
from afd.cli import main

CONFIGS = {
    "zero-sessions": "sessions: 0\n",
    "zero-micro-batch-size": "micro_batch_size: 0\n",
    "negative-layers": "layers: -1\n",
    "token-size-not-512": "hidden_size: 100\n",
    "bf16-token-size-not-512": "hidden_size: 384\ntoken_dtype: bf16\n",
    "k1-mismatch": "top_k: 2\nselected_expert_num: 4\n",
    "expert-on-no-rank": "ffn_ranks: 2\nrouted_experts: 2\nplacement: {0: [0], 1: [1]}\n",
    "expert-on-missing-rank": "ffn_ranks: 1\nrouted_experts: 2\nplacement: {0: [0], 1: [3], 2: [0]}\n",
    "unknown-key": "sesions: 2\n",
    "wrong-type": "micro_batch_num: two\n",
    "float-for-int": "micro_batch_size: 4.5\n",
    "bad-dtype": "token_dtype: fp8\n",
    "bad-mode": "mode: sometimes\n",
    "top-k-over-experts": "top_k: 9\nrouted_experts: 4\n",
    "active-over-bs": "micro_batch_size: 4\nactive_tokens: 8\n",
    "strict-hidden": "strict: true\nhidden_size: 512\n",
    "bad-yaml": "sessions: [1, 2\n",
    "not-a-mapping": "- 1\n- 2\n",
    "bad-control": "control: {transport: udp}\n",
    "bad-fault-in-config": "faults: ['explode:ffn0']\n",
}
FAULTS = ["explode", "kill:ffn9", "drop-flag:attn0", "kill:ffn0@step=x", "kill:ffn0@when=1", "delay:ffn0@ms=abc",
          "corrupt:sched0@field=nope", "stop@t=1,step=2", "kill:ffn0@step=-1", "hang:controller", "stop@t=nan",
          "delay:ffn0@ms=inf"]
CLI = [["nosuchcommand"], ["run", "--steps", "abc"], ["run", "--set", "novalue"], ["context", "decode"],
       ["faults", "campaign", "--runs", "0"], ["run", "missing.yaml"], ["run", "--set", "float=1"],
       ["check", "--set", "hang_timeout_s=.inf"]]


@pytest.fixture(autouse=True)
def own_runs_root(tmp_path, monkeypatch):
    """This test's own runs root: "started nothing" is checked there, where no other process (a fake-NPU job of an
    earlier test tidying its registry, another run on the machine) adds or removes entries meanwhile."""
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))


def _run_in_process(argv, capsys):
    before_ns = set(device.created_namespaces)
    before_runs = {p.name for p in control.runs_root().glob("*")} if control.runs_root().exists() else set()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors leave through SystemExit
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("afd: error:")
    assert set(device.created_namespaces) == before_ns  # started nothing
    after_runs = {p.name for p in control.runs_root().glob("*")} if control.runs_root().exists() else set()
    assert after_runs == before_runs
    return err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_config(name, tmp_path, capsys):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIGS[name])
    err = _run_in_process(["run", str(path)], capsys)
    assert ":" in err[len("afd: error:"):]  # names the key, then the rule


@pytest.mark.parametrize("spec", FAULTS)
def test_bad_fault_spec(spec, capsys):
    err = _run_in_process(["run", "--fault", spec], capsys)
    assert "fault" in err


@pytest.mark.parametrize("argv", CLI, ids=[" ".join(a) for a in CLI])
def test_bad_cli_arguments(argv, capsys):
    _run_in_process(argv, capsys)


@pytest.mark.parametrize("content", [b"", b"\x00" * 1023, b"\x00" * 1025], ids=["empty", "1023", "1025"])
def test_bad_context_dump(content, tmp_path, capsys):
    path = tmp_path / "ctx.bin"
    path.write_bytes(content)
    err = _run_in_process(["context", "decode", str(path)], capsys)
    assert "1024" in err


def test_bad_context_fields(tmp_path, capsys):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"common": {"no_such_field": 1}}))
    err = _run_in_process(["context", "encode", str(path), "-o", str(tmp_path / "o.bin")], capsys)
    assert "no_such_field" in err


def test_corpus_is_at_least_30():
    assert len(CONFIGS) + len(FAULTS) + len(CLI) + 4 >= 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["run", "--set", "hidden_size=100"], ["run", "--fault", "kill:nobody"],
                                  ["run", "--steps", "x"]])
def test_bad_input_in_a_real_process(argv):
    proc = subprocess.run([sys.executable, "-m", "afd", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.fixture
def fifo(tmp_path):
    import os
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(20)
@pytest.mark.parametrize("argv, words", [
    (["context", "decode", "/dev/zero"], "must be exactly 1024 bytes, got more than 1024"),
    (["context", "decode", "{fifo}"], "must be exactly 1024 bytes, got 0"),
    (["run", "/dev/zero"], "a config must be at most 4194304 bytes"),
    (["run", "{binary}"], "a config is not UTF-8 text (byte 0xff at offset 4)"),
    (["context", "encode", "{binary}", "-o", "{out}"], "the fields file is not UTF-8 text"),
    (["run", "--fault", "delay:ffn0@step=1,ms=-5"], "ms must be a finite number >= 0, got -5"),
], ids=["decode-dev-zero", "decode-fifo", "config-dev-zero", "config-binary", "fields-binary", "negative-delay"])
def test_files_that_are_not_what_they_should_be_are_one_line_within_a_second(argv, words, fifo, tmp_path, capsys):
    import time
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: 1\xff\xfe\x00")
    argv = [a.format(fifo=fifo, binary=binary, out=tmp_path / "o.bin") for a in argv]
    t0 = time.monotonic()
    err = _run_in_process(argv, capsys)
    assert time.monotonic() - t0 < 2.0
    assert words in err
