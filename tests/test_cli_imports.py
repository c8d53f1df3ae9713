"""The quick commands import only what they use (issue 20: they start in a blink): what each one leaves in
sys.modules, in a fresh interpreter. Not timed (afd bench times them); a heavy import creeping back in fails here."""
import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "numba", "zmq", "pydantic", "yaml", "ml_dtypes", "rich", "torch")
PROBE = """
import contextlib, io, json, sys
from afd.cli import main
heavy = json.loads(sys.argv[2])
sys.argv = ["afd"] + json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def loaded(argv: list[str], tmp_path) -> dict:
    env = {k: v for k, v in __import__("os").environ.items() if k != "AFD_NPU"}
    env["AFD_RUN_DIR"] = str(tmp_path / "runs")  # `afd stop` finds nothing to stop (nobody else's job either)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv, code, allowed", [
    (["--help"], 0, ()),
    (["run", "--help"], 0, ()),
    (["bench", "--help"], 0, ()),
    (["stop"], 1, ("numpy", "zmq")),  # the run directory (control) and the fake NPU's listings (their layout)
    (["context", "decode", "DUMP"], 0, ("numpy",)),
    (["check"], 0, ("numpy", "pydantic", "yaml", "ml_dtypes")),  # the config itself
])
def test_a_quick_command_imports_only_what_it_uses(argv, code, allowed, tmp_path):
    dump = tmp_path / "context.bin"
    dump.write_bytes(bytes(1024))
    r = loaded([str(dump) if a == "DUMP" else a for a in argv], tmp_path)
    assert r["code"] == code
    assert set(r["heavy"]) <= set(allowed), f"afd {' '.join(argv)} imported {sorted(set(r['heavy']) - set(allowed))}"


def test_the_package_and_the_npu_entry_point_import_nothing_heavy():
    """`import torch` imports afd.npu (torch's device-backend entry point) in every torch process."""
    probe = f"import sys, afd, afd.npu; print([m for m in {HEAVY!r} if m in sys.modules])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "AFD_NPU"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "[]"
