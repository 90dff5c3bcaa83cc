"""What machine and software a result came from (read without importing any framework)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

__all__ = ["PACKAGES", "machine_info", "summary"]

PACKAGES = ("mcu", "numpy", "scipy", "torch", "tensorflow", "tensorflow-cpu", "keras", "baal", "matplotlib")
#: cpuinfo flags that matter for these kernels (the full list is kept in the JSON too)
NOTABLE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
                 "amx_tile", "amx_fp16")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # first processor only
    except OSError:
        pass
    return info


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _gpu() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            return out or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def allocator_env() -> dict[str, str]:
    """glibc ``MALLOC_*`` settings and a preloaded allocator: fresh multi-MB buffers may cost page faults on
    every call with glibc's defaults, which changed timings here by up to 3x (benchmarks/RESULTS.md)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags_notable": [f for f in NOTABLE_FLAGS if f in flags],
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": _ram_gb(),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                                   "TF_NUM_INTEROP_THREADS") if k in os.environ},
        "allocator_env": allocator_env(),
    }


def summary(info: dict[str, Any], backends: dict[str, Any] | None = None) -> list[str]:
    """A few human-readable lines: CPU, cores, RAM, GPU, versions, and the per-backend thread settings."""
    v = {k: val for k, val in info["versions"].items() if val}
    lines = [
        (f"machine  {info['cpu']}, {info['cores_usable']}/{info['cores']} cores, {info['ram_gb']} GB RAM, "
         f"GPU: {info['gpu'] or 'none'}; flags: {' '.join(info['cpu_flags_notable']) or '-'}"),
        f"software python {info['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "malloc   " + (", ".join(f"{k}={val}" for k, val in info.get("allocator_env", {}).items())
                       or "glibc defaults (no MALLOC_* variables, nothing preloaded)"),
    ]
    for name, env in (backends or {}).items():
        lines.append(f"threads  {name}: " + ", ".join(f"{k}={val}" for k, val in env.get("threads", {}).items()))
    return lines
