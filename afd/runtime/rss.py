"""A process's resident memory for its final report: the peak, and what is resident now split by kind (MB, 1e6 B)."""
from __future__ import annotations

# /proc/self/status fields -> report keys. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec,
# so a process started by exec would report its parent's peak at the moment it was started whenever that is larger.
_FIELDS = {"VmHWM": "peak_mb", "VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "RssShmem": "shmem_mb"}


def usage() -> dict[str, float]:
    """peak_mb (peak RSS of this process) and, at the call, rss_mb = anon_mb + file_mb + shmem_mb (shmem: the pages
    of shared-memory windows this process touched), private_mb (pages no other process maps: what ending this process
    frees) and pss_mb (each page divided by the processes that map it); {} where /proc is not there. Roles are forked
    from one server (afd.launcher.forkserver.role_context), so most of their anon pages are the server's, shared until
    written: counted whole in each one's RSS, once in the sum of their PSS."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = _mb(value)
    except (OSError, ValueError, IndexError):
        return {}
    try:
        rollup = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    rollup[key] = _mb(value)
        out["pss_mb"] = rollup["Pss"]
        out["private_mb"] = round(rollup["Private_Clean"] + rollup["Private_Dirty"], 2)
    except (OSError, ValueError, IndexError, KeyError):  # (kernels before 4.14 have no smaps_rollup)
        pass
    return out


def _mb(value: str) -> float:
    return round(int(value.split()[0]) * 1024 / 1e6, 2)  # the kernel says kB = KiB
