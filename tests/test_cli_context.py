"""`afd context decode|encode`: round trips, the printed forms, and every error as one line with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afd.cli import main
from afd.layout import CONTEXT_SIZE, ScheduleContext, field_offsets

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = {
    "common": {"session_num": 1, "micro_batch_num": 2, "micro_batch_size": 48, "selected_expert_num": 9,
               "expert_num": 16, "attn_to_ffn_token_size": 512, "ffn_to_attn_token_size": 512, "schedule_mode": 1},
    "control": {"run_flag": 1},
    "attention": {"token_info_buf": 0x1240_0000_0000_0000, "token_info_buf_size": 3456,
                  "token_data_buf": 0x1241_0000_0000_0000, "micro_batch_id": 1},
    "ffn": {"polling_index": 3, "out_num": 2, "expert_ids_buf": 0x1242_0000_0000_0200},
}


def _write_json(tmp_path: Path, obj, name="fields.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors exit through SystemExit
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _python_afd(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "afd", *argv], capture_output=True, text=True, timeout=60, env=env)


# -- round trips ----------------------------------------------------------------------------------------------

def test_encode_then_decode_json_round_trips(capsys, tmp_path):
    out = tmp_path / "ctx.bin"
    code, _, err = _cli(capsys, "context", "encode", str(_write_json(tmp_path, SAMPLE)), "-o", str(out))
    assert code == 0, err
    assert out.stat().st_size == CONTEXT_SIZE
    code, text, _ = _cli(capsys, "context", "decode", str(out), "--json")
    assert code == 0
    decoded = json.loads(text)
    for area, fields in SAMPLE.items():
        for name, value in fields.items():
            assert decoded[area][name] == value, f"{area}.{name}"
    # decode --json output is itself valid encode input, and gives back the same bytes.
    again = tmp_path / "again.bin"
    assert _cli(capsys, "context", "encode", str(_write_json(tmp_path, text, "d.json")), "-o", str(again))[0] == 0
    assert again.read_bytes() == out.read_bytes()


def test_flat_form_and_hex_strings_encode_the_same_bytes(capsys, tmp_path):
    nested, flat = tmp_path / "n.bin", tmp_path / "f.bin"
    flat_fields = {f"{a}.{k}": (hex(v) if k.endswith("_buf") else v) for a, fs in SAMPLE.items() for k, v in fs.items()}
    assert _cli(capsys, "context", "encode", str(_write_json(tmp_path, SAMPLE)), "-o", str(nested))[0] == 0
    assert _cli(capsys, "context", "encode", str(_write_json(tmp_path, flat_fields, "flat.json")),
                "-o", str(flat))[0] == 0
    assert nested.read_bytes() == flat.read_bytes()


def test_decode_prints_every_field_by_name_with_hex_addresses(capsys, tmp_path):
    ctx = ScheduleContext()
    ctx.set_fields(SAMPLE)
    dump = tmp_path / "ctx.bin"
    dump.write_bytes(ctx.to_bytes())
    code, text, _ = _cli(capsys, "context", "decode", str(dump))
    assert code == 0
    lines = dict(line.split(" = ") for line in text.strip().splitlines())
    assert set(lines) == set(field_offsets())  # every field, nothing else
    assert lines["common.micro_batch_size"] == "48"
    assert lines["attention.token_info_buf"] == "0x1240000000000000"
    assert lines["attention.token_info_buf_size"] == "3456"  # sizes stay decimal
    assert lines["ffn.token_info_buf"] == "0x0"
    assert lines["ffn.expert_ids_buf"] == "0x1242000000000200"
    assert lines["common.schedule_mode"] == "1"


def test_decode_shows_signed_fields_as_signed(capsys, tmp_path):
    ctx = ScheduleContext()
    ctx.control.run_flag = -1
    dump = tmp_path / "ctx.bin"
    dump.write_bytes(ctx.to_bytes())
    code, text, _ = _cli(capsys, "context", "decode", str(dump))
    assert code == 0 and "control.run_flag = -1" in text.splitlines()


@pytest.mark.timeout(60)
def test_round_trip_through_python_dash_m(tmp_path):
    out = tmp_path / "ctx.bin"
    proc = _python_afd("context", "encode", str(_write_json(tmp_path, SAMPLE)), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = _python_afd("context", "decode", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "attention.micro_batch_id = 1" in proc.stdout.splitlines()


# -- errors: one line, exit 2, no traceback ----------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"common": {"bogus": 1}}, ["common.bogus", "unknown field", "session_num"]),
    ({"common.bogus": 1}, ["common.bogus", "unknown field"]),
    ({"bogus": {"session_num": 1}}, ["bogus", "unknown area"]),
    ({"bogus.session_num": 1}, ["bogus.session_num", "unknown area"]),
    ({"session_num": 1}, ["session_num", "area.field"]),
    ({"common": 1}, ["common", "JSON object"]),
    ({"common": {"reserve0": 1}}, ["common.reserve0", "reserved"]),
    ({"common": {"session_num": 1}, "common.session_num": 2}, ["common.session_num", "twice"]),
    ({"common": {"session_num": 1.5}}, ["common.session_num", "integer", "1.5"]),
    ({"common": {"session_num": "abc"}}, ["common.session_num", "integer", "abc"]),
    ({"common": {"session_num": True}}, ["common.session_num", "integer", "true"]),
    ({"common": {"session_num": None}}, ["common.session_num", "integer", "null"]),
    ({"common": {"session_num": [1]}}, ["common.session_num", "integer"]),
    ({"common": {"session_num": {"x": 1}}}, ["common.session_num", "integer"]),
    ({"common": {"session_num": -1}}, ["common.session_num", "-1", "does not fit"]),
    ({"common": {"session_num": 2**32}}, ["common.session_num", str(2**32), "does not fit"]),
    ({"common": {"schedule_mode": 2**31}}, ["common.schedule_mode", "does not fit"]),
    ({"attention": {"token_info_buf": 2**64}}, ["attention.token_info_buf", "does not fit"]),
    ([1, 2], ["top level", "JSON object"]),
])
def test_encode_errors_name_the_field_and_rule(capsys, tmp_path, fields, words):
    out = tmp_path / "ctx.bin"
    code, _, err = _cli(capsys, "context", "encode", str(_write_json(tmp_path, fields)), "-o", str(out))
    _assert_one_line_error(code, err, *words)
    assert not out.exists(), "nothing is written on error"


def test_encode_invalid_json(capsys, tmp_path):
    path = _write_json(tmp_path, '{"common": {"session_num": 1,}}')
    code, _, err = _cli(capsys, "context", "encode", str(path), "-o", str(tmp_path / "x"))
    _assert_one_line_error(code, err, str(path), "invalid JSON", "line 1")


def test_encode_non_utf8(capsys, tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = _cli(capsys, "context", "encode", str(path), "-o", str(tmp_path / "x"))
    _assert_one_line_error(code, err, str(path))


@pytest.mark.parametrize("action", ["decode", "encode"])
def test_missing_input_file(capsys, tmp_path, action):
    missing = tmp_path / "missing"
    argv = ["context", action, str(missing)] + (["-o", str(tmp_path / "x")] if action == "encode" else [])
    code, _, err = _cli(capsys, *argv)
    _assert_one_line_error(code, err, str(missing), "cannot read", "No such file")


def test_unreadable_input_file(capsys, tmp_path):
    # A directory cannot be read as a file (chmod 000 would not stop root).
    code, _, err = _cli(capsys, "context", "decode", str(tmp_path))
    _assert_one_line_error(code, err, str(tmp_path), "cannot read")


def test_unwritable_output(capsys, tmp_path):
    out = tmp_path / "no-such-dir" / "ctx.bin"
    code, _, err = _cli(capsys, "context", "encode", str(_write_json(tmp_path, SAMPLE)), "-o", str(out))
    _assert_one_line_error(code, err, str(out), "cannot write")


@pytest.mark.parametrize("size", [0, 1023, 1025, 4096])
def test_decode_wrong_size(capsys, tmp_path, size):
    dump = tmp_path / "ctx.bin"
    dump.write_bytes(bytes(size))
    code, out, err = _cli(capsys, "context", "decode", str(dump))
    _assert_one_line_error(code, err, str(dump), "exactly 1024 bytes", f"got {size}")
    assert out == ""


def test_encode_requires_output(capsys, tmp_path):
    code, _, err = _cli(capsys, "context", "encode", str(_write_json(tmp_path, SAMPLE)))
    _assert_one_line_error(code, err, "-o")


@pytest.mark.timeout(60)
def test_errors_through_python_dash_m_are_one_line(tmp_path):
    dump = tmp_path / "short.bin"
    dump.write_bytes(bytes(10))
    proc = _python_afd("context", "decode", str(dump))
    _assert_one_line_error(proc.returncode, proc.stderr, "exactly 1024 bytes")
    bad = _write_json(tmp_path, {"ffn": {"out_num": -5}})
    proc = _python_afd("context", "encode", str(bad), "-o", str(tmp_path / "x.bin"))
    _assert_one_line_error(proc.returncode, proc.stderr, "ffn.out_num", "does not fit")
    proc = _python_afd("context", "decode", str(tmp_path / "missing.bin"))
    _assert_one_line_error(proc.returncode, proc.stderr, "missing.bin", "cannot read")
