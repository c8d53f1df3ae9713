"""A process's resident memory for its final report: the peak, and what is resident now split by kind (MB, 1e6 B)."""
from __future__ import annotations

# /proc/self/status fields -> report keys. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec,
# so a spawned role would report the launcher's peak at the moment it was spawned whenever that is the larger.
_FIELDS = {"VmHWM": "peak_mb", "VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "RssShmem": "shmem_mb"}


def usage() -> dict[str, float]:
    """peak_mb (peak RSS of this process) and, at the call, rss_mb = anon_mb + file_mb + shmem_mb (shmem: the pages
    of shared-memory windows this process touched); {} where /proc is not there."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = round(int(value.split()[0]) * 1024 / 1e6, 2)  # the kernel says kB = KiB
    except (OSError, ValueError, IndexError):
        return {}
    return out
