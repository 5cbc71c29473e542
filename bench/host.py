"""The conditions a run was measured under: machine, kernel, versions, and how busy the host was."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["background_load", "describe_host", "loadavg", "tool_version"]


def _first(path: str, prefix: str, sep: str = ":") -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(sep, 1)[1].strip().strip('"')
    return None


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


def background_load(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` while this process sleeps: what others run meanwhile."""
    total0, idle0 = _cpu_times()
    time.sleep(seconds)
    total1, idle1 = _cpu_times()
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def tool_version(argv: list[str]) -> str | None:
    """First line of a tool's version output, or None when it is not installed."""
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=30, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _virtualisation() -> str | None:
    for path in ("/sys/class/dmi/id/product_name", "/sys/class/dmi/id/sys_vendor"):
        with contextlib.suppress(OSError):
            value = Path(path).read_text().strip()
            if value:
                return value
    if "hypervisor" in (_first("/proc/cpuinfo", "flags") or ""):
        return "a virtual machine (hypervisor flag set)"
    return None


def describe_host() -> dict[str, Any]:
    """Machine, kernel and software versions (the peers' versions are added by the peers)."""
    mem_kib = int((_first("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    return {
        "os": _first("/etc/os-release", "PRETTY_NAME=", "=") or platform.platform(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "virtualisation": _virtualisation(),
        "python": platform.python_version(),
        "euid": os.geteuid(),
        "bwrap": tool_version(["bwrap", "--version"]),
        "runsc": tool_version(["runsc", "--version"]),
    }
