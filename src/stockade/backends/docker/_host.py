"""Host-side helpers for a local engine: mount-source checks, OOM counters of a container's cgroup, the
session directories handed to the guest uid, and the engine's per-container helper processes."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path

from ...errors import InvalidRequest
from ...models import FilesystemMount

__all__ = ["check_source", "chown_tree", "helper_processes", "kill_and_wait", "oom_kills"]


def check_source(mount: FilesystemMount, index: int) -> None:
    """Refuse sources that do not exist, are symlinks, or are neither directories nor regular files."""
    if not mount.source:
        return
    field = f"mounts.{index}.source"
    try:
        st = os.lstat(mount.source)
    except FileNotFoundError:
        raise InvalidRequest(f"{mount.source!r} does not exist on the host", field=field) from None
    except OSError as exc:
        raise InvalidRequest(f"cannot use {mount.source!r}: {exc.strerror}", field=field) from None
    if os.path.realpath(mount.source) != mount.source:
        raise InvalidRequest(f"{mount.source!r} is or passes through a symlink; give the real path", field=field)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InvalidRequest(f"{mount.source!r} is neither a directory nor a file", field=field)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything below it (no symlinks followed) to the guest's uid."""
    if os.geteuid() != 0:
        return  # a non-root caller owns what it made; the engine maps nothing here
    os.lchown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), uid, gid)


def oom_kills(pid: int) -> int | None:
    """The OOM-kill count of the memory cgroup of host process ``pid`` (v1 or v2), or None if unknown."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2_path: str | None = None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            return _keyed(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control", "oom_kill")
        if hier == "0" and controllers == "":
            v2_path = path
    if v2_path is not None:
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            found = _keyed(root / v2_path.lstrip("/") / "memory.events", "oom_kill")
            if found is not None:
                return found
    return None


def _keyed(path: Path, key: str) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def helper_processes(prefix: str, flag: str, container: str) -> list[int]:
    """Host pids of processes whose program name starts with ``prefix`` and whose argv holds ``flag container``
    (how containerd's shims and Podman's conmon name the container they serve)."""
    want = [flag.encode(), container.encode()]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).startswith(prefix.encode()) and any(
            argv[i : i + 2] == want for i in range(1, len(argv) - 1)
        ):
            found.append(int(entry))
    return found


def kill_and_wait(pids: list[int], wait: float = 5.0) -> None:
    """SIGKILL ``pids`` and wait until each is gone or a zombie (their parent may reap them late)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                stat_line = Path(f"/proc/{pid}/stat").read_bytes()
            except OSError:
                break
            if stat_line[stat_line.rfind(b")") + 2 :].startswith(b"Z"):
                break
            time.sleep(0.002)
