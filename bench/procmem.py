"""Host memory of a session: the processes it consists of, and their PSS/RSS from ``/proc/<pid>/smaps_rollup``.

PSS (proportional set size) charges each shared page to the processes that map it in equal parts, so summing
PSS over the processes of 200 sessions gives what the 200 sessions cost the host together; RSS counts shared
pages (the interpreter, libc) once per process and overstates a session's cost. Both are reported.

A session's processes are found from one pid the backend exposes (``init_pid`` in its metadata, or the pid of
a container), without knowing the backend:

- every process in that pid's own cgroup (when the session has a cgroup of its own, i.e. not ours);
- every descendant of that pid;
- its ancestors that were created by the provision (started after the batch began) and are not shared with
  another measured session: bubblewrap's outer monitor process, a container's shim. Pid 1, this process and
  long-lived daemons (dockerd, containerd: started before the batch) are never counted.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MemoryUse",
    "boot_ticks_now",
    "cgroup_memory_bytes",
    "mem_available_kib",
    "process_memory",
    "session_processes",
]

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class MemoryUse:
    """Summed memory of a set of processes, in KiB."""

    pss_kib: int = 0
    rss_kib: int = 0
    uss_kib: int = 0
    pids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def add(self, other: MemoryUse) -> None:
        self.pss_kib += other.pss_kib
        self.rss_kib += other.rss_kib
        self.uss_kib += other.uss_kib
        self.pids += other.pids
        self.names += other.names


def boot_ticks_now() -> int:
    """Now, in the clock of ``/proc/<pid>/stat`` start times (ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start ticks) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, starttime field 22.
    return comm, int(rest[1]), int(rest[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    return children


def _cgroup_mounts() -> dict[str, Path]:
    """Controller name (or ``""`` for the v2 tree) -> mount point."""
    mounts: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _source, options = ([*right.split(), "", "", ""])[:3]
            point = Path(left.split()[4].replace("\\040", " "))
            if fstype == "cgroup2":
                mounts.setdefault("", point)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    mounts.setdefault(opt, point)
    return mounts


def _cgroup_of(pid: int) -> dict[str, str]:
    """Controller (``""`` for v2) -> cgroup path of ``pid``."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _id, controllers, path = line.split(":", 2)
            for ctrl in controllers.split(",") if controllers else [""]:
                out[ctrl] = path
    return out


def _session_cgroup_dir(pid: int) -> Path | None:
    """The cgroup directory of ``pid`` when it is not our own (a per-session cgroup), preferring pids/memory."""
    mine, theirs, mounts = _cgroup_of(os.getpid()), _cgroup_of(pid), _cgroup_mounts()
    for ctrl in ("pids", "memory", ""):
        path = theirs.get(ctrl)
        if path is None or ctrl not in mounts or path in ("/", mine.get(ctrl)):
            continue
        directory = mounts[ctrl] / path.lstrip("/")
        if (directory / "cgroup.procs").exists():
            return directory
    return None


def cgroup_memory_bytes(pid: int) -> int | None:
    """Memory charged to ``pid``'s own cgroup (v1 ``memory.usage_in_bytes`` or v2 ``memory.current``)."""
    mine, theirs, mounts = _cgroup_of(os.getpid()), _cgroup_of(pid), _cgroup_mounts()
    for ctrl, name in (("memory", "memory.usage_in_bytes"), ("", "memory.current")):
        path = theirs.get(ctrl)
        if path is None or ctrl not in mounts or path in ("/", mine.get(ctrl)):
            continue
        with contextlib.suppress(OSError, ValueError):
            return int((mounts[ctrl] / path.lstrip("/") / name).read_text())
    return None


def session_processes(pid: int, since_ticks: int, other_roots: Iterable[int] = ()) -> list[int]:
    """The pids of the session that ``pid`` belongs to (see the module docstring)."""
    children = _children_map()
    found: set[int] = set()
    cgroup = _session_cgroup_dir(pid)
    if cgroup is not None:
        with contextlib.suppress(OSError):
            found.update(int(x) for x in (cgroup / "cgroup.procs").read_text().split())
    stack = [pid]
    while stack:
        current = stack.pop()
        found.add(current)
        stack.extend(children.get(current, []))
    # Ancestors created for this session only.
    others = set(other_roots) - {pid}
    me = os.getpid()
    st = _stat(pid)
    while st is not None:
        parent = st[1]
        if parent in (0, 1, me):
            break
        pst = _stat(parent)
        if pst is None or pst[2] < since_ticks or _has_descendant(parent, others, children):
            break
        found.add(parent)
        st = pst
    found.discard(me)
    return sorted(found)


def _has_descendant(pid: int, targets: set[int], children: dict[int, list[int]]) -> bool:
    if not targets:
        return False
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in targets:
            return True
        stack.extend(children.get(current, []))
    return False


def process_memory(pids: Iterable[int]) -> MemoryUse:
    """Summed PSS, RSS and USS (private pages) of ``pids``; vanished processes count zero."""
    use = MemoryUse()
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        values: dict[str, int] = {}
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1])
        st = _stat(pid)
        use.pss_kib += values.get("Pss", 0)
        use.rss_kib += values.get("Rss", 0)
        use.uss_kib += values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
        use.pids.append(pid)
        use.names.append(st[0] if st else "?")
    return use


def mem_available_kib() -> int:
    """``MemAvailable`` of the host (noisy on a shared machine: a cross-check only)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0
