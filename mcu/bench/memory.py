"""Peak resident memory of this process (Linux): ``VmHWM`` from ``/proc/self/status``, reset by writing ``5``
to ``/proc/self/clear_refs``. ``tracemalloc`` does not see framework allocations, so RSS is what we measure;
one configuration per fresh process, because an allocator keeps freed memory and would hide the next peak.
"""

from __future__ import annotations

import resource

__all__ = ["address_space_limit", "available_bytes", "peak_rss_mb", "reset_peak", "rss_mb"]


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_mb() -> float:
    return _status("VmRSS") / 2**20


def peak_rss_mb() -> float:
    return _status("VmHWM") / 2**20


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False if the kernel does not allow it (then peaks include startup)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def address_space_limit(extra_bytes: int) -> None:
    """Let this process map at most ``extra_bytes`` more, so that an oversized allocation raises an error
    (reported as a FAILED row) instead of waking the kernel's OOM killer."""
    if extra_bytes > 0:
        limit = _status("VmSize") + extra_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
