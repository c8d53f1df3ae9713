"""Property-based fuzzing (hypothesis, seeded): configs, --set strings, fault specs, context dumps and CLI arguments
never give a traceback or a hang, only documented exit codes, and leave nothing in /dev/shm.

Nothing here starts a pipeline: Pipeline.start is replaced by one that raises WouldStart, so an input that is
valid ends there (what a real run does next is the rest of the suite's business)."""
import contextlib
import io
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from afd import config as config_mod
from afd import device, preflight
from afd import faults as faults_mod
from afd.cli import main
from afd.device import SHM_DIR
from afd.errors import AfdError
from afd.launcher import pipeline as pipeline_mod

ROOT = Path(__file__).resolve().parents[1]
SEED = 2026
DOCUMENTED_EXITS = {0, 1, 2, 3, 4}
FIELDS = sorted(config_mod.Config.model_fields)


def fuzz(n: int):
    """Seeded, no example database (CI starts clean anyway), no deadline (a shared machine stalls at times)."""
    return settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))


class WouldStart(BaseException):
    """A valid input reached Pipeline.start (BaseException: no handler on the way may take it for an error)."""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No run starts, runs and torch jobs are looked up under tmp_path; no segment of this test's is left."""
    monkeypatch.setenv("AFD_RUN_DIR", str(tmp_path / "runs"))  # (the torch jobs' registry lives under it too)
    monkeypatch.chdir(tmp_path)  # a fuzzed `-o NAME` writes here

    def no_start(self):
        raise WouldStart()
    monkeypatch.setattr(pipeline_mod.Pipeline, "start", no_start)
    before = set(device.created_namespaces)
    yield
    made = set(device.created_namespaces) - before  # (only the real runs below make any)
    assert [n for n in os.listdir(SHM_DIR) if n.split("-")[1:2] and n.split("-")[1] in made] == []


def _scalar():
    return st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 70000),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["fp16", "bf16", "sync", "async", "linear", "scale", "ipc", "tcp", "spin"]))


def _value():
    return st.recursive(_scalar(), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.one_of(st.text(max_size=8),
                                                                                     st.integers(-2, 9)),
                                                                           inner, max_size=4)), max_leaves=8)


def _load(*args):
    """config.load, which must either give a Config whose numbers are finite or a ConfigError (one line)."""
    try:
        cfg = config_mod.load(*args)
    except AfdError as exc:
        assert "\n" not in str(exc) and str(exc).split(":")[0], exc
        return None
    for name in FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, float):
            assert math.isfinite(v), (name, v)
    return cfg


def _field_value(name: str):
    """A value near what the field takes (so most configs get past the other keys), edges included."""
    default = config_mod.Config.model_fields[name].default
    edges_int = st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 30])
    edges_float = st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-300, 1e300])
    if isinstance(default, bool):
        return st.one_of(st.booleans(), _scalar())
    if isinstance(default, (int, float)):
        near = (st.integers(1, 2 * int(default) + 1) if isinstance(default, int) else
                st.floats(0, 2 * default + 1, allow_nan=False))
        return st.one_of(edges_float, edges_int, near, _scalar(), st.just(default))  # (earlier: drawn more)
    return st.one_of(_value(), st.just(default))


_MAPPING = st.one_of(
    st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: _field_value(k) for k in keys})),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), _value(), max_size=6))


@seed(SEED)
@fuzz(300)
@given(_MAPPING)
def test_config_mappings(mapping):
    cfg = _load(mapping)
    if cfg is not None:
        with contextlib.suppress(AfdError):  # does not fit this machine: a ConfigError too
            preflight.check(cfg)


def _set_string():
    key = st.one_of(st.sampled_from(FIELDS + ["control.transport", "control.port", "device_time.link_gbps",
                                              "hosts", "placement"]), st.text(max_size=8))
    value = st.one_of(st.integers().map(str), st.floats().map(str), st.text(max_size=16),
                      st.sampled_from(["[1, 2", "{a: 1}", "true", "null", "1e309", "-0", "0x10", "[]", "'x'"]))
    return st.one_of(st.tuples(key, st.sampled_from(["=", "==", ":", ""]), value).map("".join), st.text(max_size=30))


@seed(SEED)
@fuzz(200)
@given(st.lists(_set_string(), max_size=3))
def test_set_strings(overrides):
    _load(None, overrides)


EDGES = ["nan", "inf", "-inf", "1e400", "-0", "1_0", "0x1", " 1", "", "all", "micro_batch_id", "polling_index",
         "schedule_mode", "token_info_buf", "npu_ffn_to_attention"]


def _fault_spec():
    """Mostly well-formed specs with edge values where the rules are (the last branch is any text)."""
    kind = st.sampled_from(faults_mod.KINDS)
    target = st.sampled_from(["", ":controller", ":attn0", ":sched0", ":combine0", ":ffn0", ":ffn1", ":rank0", ":rank1",
                              ":rankx", ":"])
    key = st.sampled_from(["step", "layer", "mb", "t", "call", "op", "ms", "slots", "field", "x", ""])
    number = st.one_of(st.sampled_from(EDGES), st.integers(-5, 10 ** 20).map(str), st.floats().map(str))
    part = st.one_of(st.tuples(key, st.just("="), number).map("".join), st.text(max_size=6))
    when = st.lists(part, max_size=3).map(lambda parts: ("@" + ",".join(parts)) if parts else "")
    return st.one_of(st.tuples(kind, target, when).map("".join), st.text(max_size=30))


@seed(SEED)
@fuzz(300)
@given(_fault_spec())
def test_fault_specs(spec):
    roles = config_mod.load(None).role_ids()
    for npu in (False, True):
        try:
            fault = faults_mod.parse(spec, roles, npu=npu)
        except AfdError as exc:
            assert "\n" not in str(exc)
            continue
        for key in ("step", "layer", "mb", "t", "call"):
            v = getattr(fault, key)
            assert v is None or (math.isfinite(v) and v >= 0), (key, v)
        ms = fault.params.get("ms")
        assert ms is None or (math.isfinite(ms) and ms >= 0), ms
        assert faults_mod.parse(fault.spec, roles, npu=npu) == fault  # its spec reads back as itself


def _cli(argv) -> int:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except WouldStart:
            code = 0
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert code in DOCUMENTED_EXITS, (code, text)
    if code == 2:
        errors = [line for line in text.splitlines() if line.startswith("afd: error:")]
        assert len(errors) == 1, text
    return code


@seed(SEED)
@fuzz(150)
@given(st.one_of(st.binary(min_size=1020, max_size=1030), st.binary(max_size=64)), st.booleans())
def test_context_dumps(data, as_json):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ctx.bin")
        with open(path, "wb") as f:
            f.write(data)
        code = _cli(["context", "decode", path] + (["--json"] if as_json else []))
    assert code == (0 if len(data) == 1024 else 2)


FLAGS = ["--set", "--steps", "--fault", "--report", "--log", "--trace", "--plot", "--quiet", "--json", "--strict",
         "--runs", "--seed", "--endpoint", "--wait", "--npu", "-o", "--help", "--", "-x"]
VALUES = ["1", "0", "-1", "x", "sessions=2", "steps=1", "seed=-1", "micro_batch_size=1000000", "kill:ffn0@step=1",
          "delay:ffn0@ms=-1", "/nonexistent/r.json", "/proc/x", "/dev/zero", str(ROOT / "configs" / "minimal.yaml"), "", "=", "@"]


@seed(SEED)
@fuzz(300)
@given(st.sampled_from(["run", "check", "context", "faults", "predict", "stop", "nosuch", ""]),
       st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES), st.sampled_from(["decode", "encode",
                                                                                           "campaign"]),
                          st.text(max_size=8)), max_size=5))
def test_cli_argument_lists(command, rest):
    if command == "predict":
        rest = [a for a in rest if a != "--measure"]  # (measuring runs pipelines in a subprocess of its own)
    _cli([command, *rest] if command else rest)


@seed(SEED)
@fuzz(4)
@given(st.fixed_dictionaries({"sessions": st.integers(1, 2), "ffn_ranks": st.integers(1, 2),
                              "micro_batch_num": st.integers(1, 3), "micro_batch_size": st.integers(1, 16),
                              "top_k": st.integers(1, 3), "layers": st.integers(1, 2),
                              "token_dtype": st.sampled_from(["fp16", "bf16"]), "mode": st.sampled_from(["sync", "async"]),
                              "fuse_scheduler": st.booleans(), "seed": st.integers(0, 2 ** 32)}),
       st.sampled_from(["", "stop@step=1", "kill:ffn0@step=1", "delay:ffn0@step=0,ms=3", "drop-flag:ffn0@step=1",
                        "corrupt:sched0@step=1", "reorder:ffn0@step=1,ms=20", "hang:attn0@step=1"]))
def test_random_valid_runs_really_run_and_end_as_documented(monkeypatch, shape, fault):
    """A few of the valid inputs for real (Pipeline.start restored): an exit code from the documented set, the
    outcome the fault documents, nothing left behind."""
    monkeypatch.setattr(pipeline_mod.Pipeline, "start", _real_start)
    sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items()]
    argv = ["run", "--quiet", "--steps", "2", "--set", "stall_timeout_s=1.5"] + \
        [a for s in sets for a in ("--set", s)] + (["--fault", fault] if fault else [])
    if shape["fuse_scheduler"]:  # (no sched0 then: its scheduler runs inside attn0)
        argv = [a.replace("sched0", "attn0") for a in argv]
    before = set(os.listdir(SHM_DIR))
    code = _cli(argv)
    expected = faults_mod.parse(argv[-1]).documented()[1] if fault else 0
    assert code == expected, (argv, code)
    assert set(os.listdir(SHM_DIR)) - before == set()


_real_start = pipeline_mod.Pipeline.start
