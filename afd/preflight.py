"""What a run needs before its first process starts (output paths, shared memory, RAM, processes) against what the
machine has: a run that cannot fit is refused with one line naming the key, not started to fail later."""
from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass

from .device import SHM_DIR
from .errors import ConfigError
from .layout import CONTEXT_SIZE
from .runtime.memory import STATUS_FIELDS, SessionStreamLayout

# One role process: the interpreter with numpy, pyzmq, pydantic and the kernels loaded (measured 40-50 MB RSS).
PROCESS_BYTES = 50 << 20
# Private working memory per element of the run's token data A*M*BS*(K+1)*H: the experts' float64 and the
# attention's float32 temporaries, the inputs and the launcher's reference check (measured 9 B at BS=20000;
# 12 keeps a margin). The linear experts' weights come on top (float64 H x H per layer and expert, cached).
WORKING_BYTES_PER_ELEMENT = 12
# Every role is its own Python interpreter (about 0.5 s of CPU to start): past this many a 2-core machine does
# not even start them within start_timeout_s. AFD_MAX_PROCESSES raises (or lowers) it.
DEFAULT_MAX_PROCESSES = 64
# The keys a run's size grows with, in the order they are named when several are raised (the largest ratio
# against its default is named first).
SIZE_KEYS = ("micro_batch_size", "hidden_size", "sessions", "micro_batch_num", "top_k", "layers", "routed_experts",
             "ffn_ranks", "steps")


@dataclass(frozen=True)
class Needs:
    shared_bytes: int  # /dev/shm segments: windows, contexts, streams, status table, digests, outputs
    memory_bytes: int  # RAM in all: the shared bytes plus every process's private memory
    processes: int  # processes the launcher spawns (roles, controller, agents)


@dataclass(frozen=True)
class Has:
    shm_free_bytes: int
    memory_available_bytes: int
    max_processes: int


def sizes(cfg) -> dict:
    """Every allocation a run of `cfg` makes, per attention session, per FFN rank and run-wide (bytes)."""
    c = cfg
    attn = c.attention_layout()
    ffn = c.ffn_layout()
    out = c.ffn_out_layout()
    stream = SessionStreamLayout(c.ffn_ranks, c.micro_batch_num, c.micro_batch_size, c.top_k, c.hidden_size,
                                 c.itemsize)
    per_session = {
        "attention_window": c.attention_window_bytes(),
        "schedule_context": CONTEXT_SIZE,
        "session_stream": stream.total_bytes,
    }
    per_ffn = {
        "ffn_window": c.ffn_window_bytes(),
        "ffn_out_buffers": out.total_bytes,
        "schedule_context": CONTEXT_SIZE,
    }
    n_roles = len(c.role_ids())
    run_wide = {
        "status_table": 8 * len(STATUS_FIELDS) * n_roles,
        "digests": 8 * c.steps * c.sessions * c.micro_batch_num,
        "outputs": c.sessions * c.micro_batch_num * c.micro_batch_size * c.token_bytes,
    }
    total = (c.sessions * sum(per_session.values()) + c.ffn_ranks * sum(per_ffn.values())
             + sum(run_wide.values()))
    return {
        "attention_window": {"flags_bytes": attn.info_bytes, "data_offset": attn.data_offset,
                             "data_bytes": attn.data_bytes, "slot_bytes": attn.slot_bytes,
                             "total_bytes": c.attention_window_bytes()},
        "ffn_window": {"records_bytes": ffn.info_bytes, "record_bytes": ffn.record_bytes,
                       "data_offset": ffn.data_offset, "data_bytes": ffn.data_bytes,
                       "total_bytes": c.ffn_window_bytes()},
        "ffn_out_buffers": {**{k: v for k, v in out.offsets.items()}, "ids_bytes": out.ids_bytes,
                            "expert_ids_bytes": out.expert_ids_bytes, "total_bytes": out.total_bytes},
        "session_stream": {"counters_bytes": stream.f2a_offset, "f2a_last_flag_offset": stream.f2a_offset,
                           "scales_offset": stream.scales_offset, "expert_ids_offset": stream.ids_offset,
                           "y_offset": stream.y_offset, "total_bytes": stream.total_bytes},
        "per_attention_session": {**per_session, "total": sum(per_session.values())},
        "per_ffn_rank": {**per_ffn, "total": sum(per_ffn.values())},
        "run_wide": {**run_wide, "total": sum(run_wide.values())},
        "total_bytes": total,
    }


def needs(cfg) -> Needs:
    c = cfg
    shared = sizes(c)["total_bytes"]
    processes = len(c.role_ids()) + len(c.agent_ids() if c.multi_host else [])
    elements = c.sessions * c.micro_batch_num * c.micro_batch_size * c.selected * c.hidden_size
    private = (processes + 1) * PROCESS_BYTES + WORKING_BYTES_PER_ELEMENT * elements
    if c.expert_kind == "linear":
        weight = 8 * c.hidden_size * c.hidden_size
        experts = c.routed_experts + 1
        placed = experts if c.placement is None else sum(len(r) for r in c.placement.values())
        private += c.layers * weight * (placed + (experts if c.check_reference else 0))
    return Needs(shared, shared + private, processes)


def max_processes() -> int:
    raw = os.environ.get("AFD_MAX_PROCESSES")
    limit = DEFAULT_MAX_PROCESSES
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            raise ConfigError("AFD_MAX_PROCESSES", f"must be a whole number, got {raw!r}") from None
        if limit <= 0:
            raise ConfigError("AFD_MAX_PROCESSES", f"must be > 0, got {limit}")
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and os.getuid() != 0:  # (the kernel does not apply it to root)
        limit = min(limit, max(1, soft - _processes_of_user()))
    return limit


def _processes_of_user() -> int:
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += os.stat(f"/proc/{pid}").st_uid == uid
            except OSError:
                pass
    return n


def memory_available() -> int:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def shm_free(path: str = SHM_DIR) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def has() -> Has:
    return Has(shm_free(), memory_available(), max_processes())


def figures(cfg) -> dict:
    """Both sides, for afd check and the report."""
    return {"needs": asdict(needs(cfg)), "has": asdict(has())}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _culprit(cfg, keys=SIZE_KEYS) -> str:
    """The size key raised most above its default: the one to name (and likely to lower)."""
    from .config import Config
    fields = Config.model_fields
    ratio = {k: getattr(cfg, k) / max(1, fields[k].default) for k in keys}
    return max(keys, key=lambda k: ratio[k])


def check(cfg, need: Needs | None = None, have: Has | None = None) -> None:
    """ConfigError when the run cannot fit this machine: processes, shared memory, RAM (figures computed
    here unless given)."""
    need, have = need or needs(cfg), have or has()
    c = cfg
    shape = (f"A={c.sessions} F={c.ffn_ranks} M={c.micro_batch_num} BS={c.micro_batch_size} K+1={c.selected} "
             f"H={c.hidden_size}")
    if need.processes > have.max_processes:
        key = _culprit(cfg, ("sessions", "ffn_ranks"))
        raise ConfigError(key, f"the run would spawn {need.processes} processes at {key}={getattr(cfg, key)} "
                               f"(1 controller, {len(c.role_ids()) - 1 - c.ffn_ranks} session roles, {c.ffn_ranks} "
                               f"FFN rank(s)), over the limit of {have.max_processes} (AFD_MAX_PROCESSES, default "
                               f"{DEFAULT_MAX_PROCESSES})")
    if need.shared_bytes > have.shm_free_bytes:
        key = _culprit(cfg)
        raise ConfigError(key, f"the run needs {_gib(need.shared_bytes)} of shared memory at {key}="
                               f"{getattr(cfg, key)} ({shape}), more than the {_gib(have.shm_free_bytes)} free in "
                               f"{SHM_DIR}")
    if need.memory_bytes > have.memory_available_bytes:
        key = _culprit(cfg)
        raise ConfigError(key, f"the run needs about {_gib(need.memory_bytes)} of memory ({_gib(need.shared_bytes)} "
                               f"of it shared) at {key}={getattr(cfg, key)} ({shape}), more than the "
                               f"{_gib(have.memory_available_bytes)} this machine has available")


def check_output(flag: str, path) -> None:
    """ConfigError unless `path` can be written: its directory exists and takes a new file (tried, then removed),
    and it is not a directory itself. Checked before the run so its end cannot lose the report."""
    if path is None:
        return
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(flag, f"{path} is a directory, not a file")
    if not os.path.isdir(parent):
        raise ConfigError(flag, f"directory {parent} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ConfigError(flag, f"{path} is not writable")
        return
    probe = os.path.join(parent, f".afd-write-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(flag, f"cannot create files in {parent}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
