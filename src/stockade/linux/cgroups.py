"""One cgroup per sandbox session, on whatever cgroup layout the host has.

Three layouts exist in the wild and all three are handled:

* **v2** (unified; most current distributions): one directory ``<base>/<parent>/<name>``; the controllers a
  limit needs are enabled in the ``cgroup.subtree_control`` of the base and of our own parent directory.
* **v1** (legacy): one directory per controller hierarchy (memory, pids, cpu, freezer).
* **hybrid** (v1 controllers plus a controller-less cgroup2 mount, usually ``/sys/fs/cgroup/unified``): the v1
  controller directories for limits plus one directory in the v2 tree, because v2's ``cgroup.kill`` and
  ``cgroup.freeze`` act on a whole tree atomically, which the v1 freezer cannot match.

The layout is read from ``/proc/self/mountinfo`` (:func:`detect_layout`), never assumed. The base of the v2
tree is its mount point when we may write there (root), else the highest ancestor of our own cgroup that was
delegated to us. Only directories this module made are ever written to, killed or removed; the one exception
is enabling a controller a requested limit needs in the base's ``cgroup.subtree_control``, without which no
limit could be set at all.

A limit that cannot be enforced is refused up front (:class:`~stockade.errors.BackendUnavailable`), never
silently dropped.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from stockade.errors import BackendUnavailable, InvalidRequest, LifecycleError

__all__ = [
    "CgroupLayout",
    "CgroupLimits",
    "SessionCgroup",
    "detect_layout",
    "reap_stale",
]

_BACKEND = "cgroups"

#: Every controller a v1 hierarchy can carry; other mount options (``rw``, ``name=systemd``, ...) are not.
_V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)
#: The controllers a session uses for limits and accounting, in the order limits are applied.
_LIMIT_CONTROLLERS = ("memory", "pids", "cpu")

_CPU_PERIOD_US = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

Feature = Literal["memory", "pids", "cpu", "freeze", "kill"]


# --------------------------------------------------------------------------------------------- small file I/O


def _write(path: Path, text: str) -> None:
    # One write(2) per value: the kernel parses each write as a whole; a buffered file could split it.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        # ENODEV: the cgroup was removed between open and read.
        if exc.errno == errno.ENODEV:
            return None
        raise


def _keyed(path: Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file such as ``memory.events`` or ``memory.oom_control``."""
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            with contextlib.suppress(ValueError):
                return int(parts[1])
    return None


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidRequest(
            "must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with '.' or '-'",
            field=what,
        )


# ----------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CgroupLayout:
    """What the host offers. ``supports`` answers for *us*: a hierarchy we cannot write to does not count."""

    kind: Literal["v2", "v1", "hybrid", "none"]
    #: Mount point of cgroup2, if any.
    v2_root: Path | None
    #: v1 controller -> mount point (co-mounted controllers share one).
    v1_roots: Mapping[str, Path] = field(hash=False)  # a mapping is unhashable; the layout stays hashable
    #: Controllers our v2 base can hand to its children (its ``cgroup.controllers``).
    v2_controllers: frozenset[str]
    #: Where ``<parent>/<name>`` is made in the v2 tree: the mount point, or a delegated subtree; None if
    #: neither is writable by us.
    v2_base: Path | None = None
    #: Which of ``"freeze"`` / ``"kill"`` the v2 tree has (cgroup.freeze since 5.2, cgroup.kill since 5.14).
    v2_features: frozenset[str] = frozenset()
    #: Whether we may make directories in the v1 hierarchies (v1 has no practical delegation: root only).
    v1_writable: bool = False

    def home(self, controller: str) -> Literal["v2", "v1"] | None:
        """Which hierarchy enforces ``controller`` for a new session, or None if none we can use does."""
        if controller in self.v2_controllers and self.v2_base is not None:
            return "v2"
        if controller in self.v1_roots and self.v1_writable:
            return "v1"
        return None

    def supports(self, what: Feature) -> bool:
        if what in _LIMIT_CONTROLLERS:
            return self.home(what) is not None
        v2_ok = self.v2_base is not None
        if what == "freeze":
            return (v2_ok and "freeze" in self.v2_features) or self.home("freezer") == "v1"
        if what == "kill":
            # Without cgroup.kill, a reliable kill needs a freezer, so nothing forks between scan and kill.
            return (v2_ok and "kill" in self.v2_features) or self.supports("freeze")
        return False

    def describe(self) -> str:
        """One line for ``stockade doctor``."""
        if self.kind == "none":
            return "cgroups: none mounted (no memory/pids/cpu limits, no freeze, no reliable kill)"
        parts = [f"cgroups {self.kind}"]
        if self.v1_roots:
            ctrls = ",".join(sorted(self.v1_roots))
            access = "writable" if self.v1_writable else "read-only for us"
            parts.append(f"v1 {ctrls} ({access})")
        if self.v2_root is not None:
            ctrls = ",".join(sorted(self.v2_controllers)) or "no controllers"
            feats = ",".join(sorted(self.v2_features)) or "no freeze/kill"
            base = (
                f"base {self.v2_base}" if self.v2_base is not None else "not writable, no delegated subtree"
            )
            parts.append(f"v2 at {self.v2_root} ({ctrls}; {feats}; {base})")
        features: tuple[Feature, ...] = ("memory", "pids", "cpu", "freeze", "kill")
        ok = [f for f in features if self.supports(f)]
        missing = [f for f in features if not self.supports(f)]
        parts.append("supports " + (" ".join(ok) or "nothing"))
        if missing:
            parts.append("missing " + " ".join(missing))
        return "; ".join(parts)


def _unescape(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def _parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    """(cgroup2 mount point, {v1 controller: mount point}); later mounts win, as they hide earlier ones."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        mount_point = Path(_unescape(lf[4]))
        if rf[0] == "cgroup2":
            v2 = mount_point
        elif rf[0] == "cgroup":
            for opt in rf[2].split(","):
                if opt in _V1_CONTROLLERS:
                    v1[opt] = mount_point
    return v2, v1


def _own_v2_path(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hier == "0" and ctrls == "":
            return path
    return None


def _writable_dir(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK) and os.access(path / "cgroup.procs", os.W_OK)


def _v2_base(v2_root: Path, own: str | None) -> Path | None:
    if _writable_dir(v2_root):
        return v2_root
    if not own or own == "/":
        return None
    # The highest writable ancestor is the delegation point: moving our children out of our own cgroup needs
    # write access to the common ancestor's cgroup.procs, which is that one.
    current = v2_root
    for part in [p for p in own.split("/") if p]:
        current = current / part
        if current.is_dir() and _writable_dir(current):
            return current
    return None


def _kernel_at_least(major: int, minor: int) -> bool:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) >= (major, minor)


def _v2_features(v2_root: Path, base: Path | None) -> frozenset[str]:
    # The root cgroup has neither file, so look at a non-root cgroup; fall back to the kernel version.
    probe: Path | None = base if base is not None and base != v2_root else None
    if probe is None:
        with contextlib.suppress(OSError):
            probe = next((p for p in v2_root.iterdir() if (p / "cgroup.procs").exists()), None)
    if probe is not None:
        return frozenset(f for f in ("freeze", "kill") if (probe / f"cgroup.{f}").exists())
    found = set()
    if _kernel_at_least(5, 2):
        found.add("freeze")
    if _kernel_at_least(5, 14):
        found.add("kill")
    return frozenset(found)


def detect_layout(*, mountinfo: str | None = None, proc_cgroup: str | None = None) -> CgroupLayout:
    """Read the host's cgroup layout. ``mountinfo`` / ``proc_cgroup`` replace the /proc files (for tests)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2_root, v1 = _parse_mountinfo(mountinfo)
    # A mount that is listed but hidden or gone has no cgroup.procs at its mount point.
    if v2_root is not None and not (v2_root / "cgroup.procs").exists():
        v2_root = None
    v1 = {c: p for c, p in v1.items() if (p / "cgroup.procs").exists()}
    v2_base = _v2_base(v2_root, _own_v2_path(proc_cgroup)) if v2_root is not None else None
    controllers: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    if v2_root is not None:
        text = _read((v2_base or v2_root) / "cgroup.controllers") or ""
        controllers = frozenset(text.split())
        features = _v2_features(v2_root, v2_base)
    kind: Literal["v2", "v1", "hybrid", "none"]
    if v2_root is not None and v1:
        kind = "hybrid"
    elif v2_root is not None:
        kind = "v2"
    elif v1:
        kind = "v1"
    else:
        kind = "none"
    v1_writable = bool(v1) and all(os.access(p, os.W_OK | os.X_OK) for p in set(v1.values()))
    return CgroupLayout(
        kind=kind,
        v2_root=v2_root,
        v1_roots=MappingProxyType(dict(v1)),
        v2_controllers=controllers,
        v2_base=v2_base,
        v2_features=features,
        v1_writable=v1_writable,
    )


# ----------------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class CgroupLimits:
    #: Hard limit; swap is included where the host allows (v2 memory.swap.max=0, v1 memsw).
    memory_bytes: int | None = None
    pids_max: int | None = None
    #: Number of CPUs, e.g. 0.5 or 2, enforced as a quota per 100 ms period.
    cpu_quota: float | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and (
            isinstance(self.memory_bytes, bool) or self.memory_bytes < 4096
        ):
            raise InvalidRequest("must be at least 4096 bytes", field="memory_bytes")
        if self.pids_max is not None and (isinstance(self.pids_max, bool) or self.pids_max < 1):
            raise InvalidRequest("must be at least 1", field="pids_max")
        if self.cpu_quota is not None and not (math.isfinite(self.cpu_quota) and self.cpu_quota >= 0.01):
            # 1 ms per 100 ms period is the kernel's smallest quota.
            raise InvalidRequest("must be a finite number of CPUs, at least 0.01", field="cpu_quota")

    def wanted(self) -> list[str]:
        """The controllers these limits need."""
        values = {"memory": self.memory_bytes, "pids": self.pids_max, "cpu": self.cpu_quota}
        return [c for c in _LIMIT_CONTROLLERS if values[c] is not None]

    def to_json(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "pids_max": self.pids_max, "cpu_quota": self.cpu_quota}


# ---------------------------------------------------------------------------------------------------- session


def _tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, deepest first (the order rmdir needs)."""
    if not top.is_dir():
        return []
    found: list[Path] = []
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        found.append(Path(dirpath))
    return found


@dataclass
class _Made:
    dirs: list[Path] = field(default_factory=list)

    def mkdir(self, path: Path, *, exist_ok: bool) -> None:
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            if not exist_ok:
                raise
            return
        self.dirs.append(path)

    def undo(self) -> None:
        for path in reversed(self.dirs):
            with contextlib.suppress(OSError):
                path.rmdir()


class SessionCgroup:
    """The cgroup(s) of one session: ``<base>/<parent>/<name>`` in every hierarchy it needs."""

    def __init__(
        self,
        name: str,
        parent: str,
        v2_dir: Path | None,
        v1_dirs: Mapping[str, Path],
        limits: CgroupLimits | None = None,
    ) -> None:
        _check_name(name, "name")
        _check_name(parent, "parent")
        self.name = name
        self.parent = parent
        self.v2_dir = v2_dir
        self.v1_dirs: dict[str, Path] = dict(v1_dirs)
        self.limits = limits or CgroupLimits()

    def __repr__(self) -> str:
        return f"SessionCgroup({self.name!r}, paths={[str(p) for p in self.paths]})"

    # ------------------------------------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        name: str,
        limits: CgroupLimits,
        *,
        layout: CgroupLayout | None = None,
        parent: str = "stockade",
    ) -> SessionCgroup:
        _check_name(name, "name")
        _check_name(parent, "parent")
        layout = layout if layout is not None else detect_layout()
        if layout.kind == "none":
            raise BackendUnavailable(
                _BACKEND,
                "no cgroup filesystem is mounted (nothing in /proc/self/mountinfo); mount cgroup2 "
                "at /sys/fs/cgroup",
            )
        for ctrl in limits.wanted():
            if layout.home(ctrl) is None:
                raise BackendUnavailable(_BACKEND, _why_missing(layout, ctrl))
        use_v2 = layout.v2_base is not None
        v1_ctrls = [c for c in _LIMIT_CONTROLLERS if layout.home(c) == "v1"]
        if layout.home("freezer") == "v1" and not (use_v2 and "freeze" in layout.v2_features):
            v1_ctrls.append("freezer")
        if not use_v2 and not v1_ctrls:
            raise BackendUnavailable(_BACKEND, _why_unwritable(layout))

        made = _Made()
        v2_dir: Path | None = None
        v1_dirs: dict[str, Path] = {}
        try:
            if use_v2:
                assert layout.v2_base is not None
                base = layout.v2_base
                v2_wanted = [c for c in limits.wanted() if layout.home(c) == "v2"]
                v2_all = [c for c in _LIMIT_CONTROLLERS if layout.home(c) == "v2"]
                _enable(base, v2_wanted, required=True)

                def prepare_v2(parent_dir: Path) -> None:
                    # Our own parent gets every limit controller the base offers, so accounting works for all.
                    _enable(parent_dir, v2_all, required=False)
                    _enable(parent_dir, v2_wanted, required=True)

                v2_dir = _make_session_dir(made, base / parent, name, prepare_v2)
            for ctrl in v1_ctrls:
                session_dir = layout.v1_roots[ctrl] / parent / name
                if session_dir not in v1_dirs.values():  # co-mounted controllers share one directory
                    _make_session_dir(made, session_dir.parent, name, None)
                v1_dirs[ctrl] = session_dir
            cgroup = cls(name, parent, v2_dir, v1_dirs, limits)
            cgroup._apply_limits()
        except FileExistsError as exc:
            made.undo()
            raise LifecycleError(f"cgroup {exc.filename} already exists; refusing to adopt it") from exc
        except PermissionError as exc:
            made.undo()
            raise BackendUnavailable(
                _BACKEND,
                f"permission denied on {exc.filename}: run as root, or from a delegated cgroup v2 "
                "subtree (e.g. systemd-run --user --scope -p Delegate=yes)",
            ) from exc
        except OSError as exc:
            made.undo()
            raise BackendUnavailable(_BACKEND, f"cannot set up the session cgroup: {exc}") from exc
        except BaseException:
            made.undo()
            raise
        return cgroup

    def _apply_limits(self) -> None:
        lim = self.limits
        if lim.memory_bytes is not None:
            if "memory" in self.v1_dirs:
                d = self.v1_dirs["memory"]
                _write(d / "memory.limit_in_bytes", str(lim.memory_bytes))
                # memsw must not be below the memory limit, hence the order; absent without swap accounting.
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", str(lim.memory_bytes))
            else:
                d = self._v2("memory")
                _write(d / "memory.max", str(lim.memory_bytes))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
            # memory.oom.group stays 0: an OOM kills the offender only, so the exec result can report it.
        if lim.pids_max is not None:
            d = self.v1_dirs.get("pids") or self._v2("pids")
            _write(d / "pids.max", str(lim.pids_max))
        if lim.cpu_quota is not None:
            quota = max(1000, int(lim.cpu_quota * _CPU_PERIOD_US))
            if "cpu" in self.v1_dirs:
                d = self.v1_dirs["cpu"]
                _write(d / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))
            else:
                _write(self._v2("cpu") / "cpu.max", f"{quota} {_CPU_PERIOD_US}")

    def _v2(self, controller: str) -> Path:
        if self.v2_dir is None:
            raise BackendUnavailable(
                _BACKEND, f"the {controller} controller is not available to this session"
            )
        return self.v2_dir

    # ----------------------------------------------------------------------------------------- state file

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "v2": str(self.v2_dir) if self.v2_dir is not None else None,
            "v1": {c: str(p) for c, p in self.v1_dirs.items()},
            "limits": self.limits.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, layout: CgroupLayout | None = None) -> SessionCgroup:
        """Reattach from :meth:`to_json`. Paths must be ``<parent>/<name>`` under a mounted cgroup hierarchy
        of the matching kind, so a tampered state file cannot aim kill() or destroy() at other cgroups."""
        try:
            name, parent = str(data["name"]), str(data["parent"])
            v2_raw = data.get("v2")
            v1_raw = dict(data.get("v1") or {})
            limits = CgroupLimits(**dict(data.get("limits") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"not a session cgroup record: {exc}", field="cgroup") from exc
        _check_name(name, "name")
        _check_name(parent, "parent")
        layout = layout if layout is not None else detect_layout()

        def checked(raw: object, roots: Iterable[Path]) -> Path:
            path = Path(str(raw))
            ok = (
                path.is_absolute()
                and ".." not in path.parts
                and path.name == name
                and path.parent.name == parent
                and any(
                    path.parent.parent == root or path.parent.parent.is_relative_to(root) for root in roots
                )
            )
            if not ok:
                raise InvalidRequest(f"{path} is not a {parent}/{name} cgroup on this host", field="cgroup")
            return path

        v2_dir = None
        if v2_raw is not None:
            v2_dir = checked(v2_raw, [layout.v2_root] if layout.v2_root is not None else [])
        v1_dirs = {}
        for ctrl, raw in v1_raw.items():
            root = layout.v1_roots.get(str(ctrl))
            v1_dirs[str(ctrl)] = checked(raw, [root] if root is not None else [])
        return cls(name, parent, v2_dir, v1_dirs, limits)

    # ----------------------------------------------------------------------------------------- membership

    @property
    def paths(self) -> list[Path]:
        seen: list[Path] = []
        for p in [self.v2_dir, *self.v1_dirs.values()]:
            if p is not None and p not in seen:
                seen.append(p)
        return seen

    def add_pid(self, pid: int) -> None:
        for p in self.paths:
            try:
                _write(p / "cgroup.procs", str(int(pid)))
            except ProcessLookupError as exc:
                raise LifecycleError(f"process {pid} does not exist") from exc
            except OSError as exc:
                raise LifecycleError(f"cannot move process {pid} into {p}: {exc}") from exc

    def preexec_join(self) -> Callable[[], None]:
        # Everything is encoded here, in the parent: between fork and exec the child may only do async-signal-
        # safe-ish work (another thread of the parent may hold the allocator or import lock).
        targets = tuple(os.fsencode(p / "cgroup.procs") for p in self.paths)
        flags = os.O_WRONLY | os.O_CLOEXEC
        zero = b"0"

        def join() -> None:
            for target in targets:
                fd = os.open(target, flags)
                try:
                    os.write(fd, zero)
                finally:
                    os.close(fd)

        return join

    def _all_dirs(self) -> Iterator[Path]:
        for p in self.paths:
            yield from _tree(p)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self._all_dirs():
            text = _read(d / "cgroup.procs")
            if text:
                found.update(int(x) for x in text.split())
        return found

    # -------------------------------------------------------------------------------------------- freezer

    def _freezer(self) -> Literal["v2", "v1"] | None:
        if self.v2_dir is not None and (self.v2_dir / "cgroup.freeze").exists():
            return "v2"
        if "freezer" in self.v1_dirs and (self.v1_dirs["freezer"] / "freezer.state").exists():
            return "v1"
        return None

    def freeze(self, timeout: float = 10.0) -> None:
        kind = self._freezer()
        if kind is None:
            raise LifecycleError(f"cgroup {self.name!r} has no freezer (no cgroup.freeze, no v1 freezer)")
        if kind == "v2":
            assert self.v2_dir is not None
            _write(self.v2_dir / "cgroup.freeze", "1")
        else:
            _write(self.v1_dirs["freezer"] / "freezer.state", "FROZEN")
        # Freezing is asynchronous: a task in an uninterruptible sleep freezes only when it leaves it.
        if not _wait(self.frozen, timeout):
            raise LifecycleError(f"cgroup {self.name!r} did not freeze within {timeout:g}s")

    def thaw(self) -> None:
        kind = self._freezer()
        if kind == "v2":
            assert self.v2_dir is not None
            _write(self.v2_dir / "cgroup.freeze", "0")
        elif kind == "v1":
            _write(self.v1_dirs["freezer"] / "freezer.state", "THAWED")
        else:
            raise LifecycleError(f"cgroup {self.name!r} has no freezer (no cgroup.freeze, no v1 freezer)")

    def frozen(self) -> bool:
        kind = self._freezer()
        if kind == "v2":
            assert self.v2_dir is not None
            return _keyed(self.v2_dir / "cgroup.events", "frozen") == 1
        if kind == "v1":
            return (_read(self.v1_dirs["freezer"] / "freezer.state") or "").strip() == "FROZEN"
        return False

    # ----------------------------------------------------------------------------------------------- kill

    def kill(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        kill_file = self.v2_dir / "cgroup.kill" if self.v2_dir is not None else None
        if kill_file is not None and kill_file.exists():
            while True:
                try:
                    _write(kill_file, "1")
                except (FileNotFoundError, ProcessLookupError):
                    pass  # removed meanwhile: nothing left to kill
                except OSError as exc:
                    if exc.errno != errno.ENODEV:
                        raise LifecycleError(f"cannot kill cgroup {self.name!r}: {exc}") from exc
                if self._wait_empty(min(deadline, time.monotonic() + 0.5)):
                    return
                if time.monotonic() >= deadline:
                    break
        else:
            self._kill_by_signal(deadline)
            if not self.pids():
                return
        raise LifecycleError(
            f"cgroup {self.name!r} still has processes {sorted(self.pids())} after {timeout:g}s of killing"
        )

    def _kill_by_signal(self, deadline: float) -> None:
        # A frozen cgroup cannot fork between our reading cgroup.procs and the SIGKILLs; without a freezer
        # the loop still converges as long as the signals outpace the forks (pids.max helps).
        has_freezer = self._freezer() is not None
        while self.pids() and time.monotonic() < deadline:
            if has_freezer:
                with contextlib.suppress(LifecycleError, OSError):
                    self.freeze(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if has_freezer:
                # v1-frozen tasks only act on the pending SIGKILL once thawed.
                with contextlib.suppress(LifecycleError, OSError):
                    self.thaw()
            self._wait_empty(min(deadline, time.monotonic() + 0.5))

    def _wait_empty(self, until: float) -> bool:
        return _wait(lambda: not self.pids(), max(0.0, until - time.monotonic()))

    # ----------------------------------------------------------------------------------------- accounting

    def _memory(self) -> tuple[Literal["v1", "v2"], Path] | None:
        if "memory" in self.v1_dirs:
            return "v1", self.v1_dirs["memory"]
        if self.v2_dir is not None and (self.v2_dir / "memory.current").exists():
            return "v2", self.v2_dir
        return None

    def oom_kills(self) -> int:
        mem = self._memory()
        if mem is None:
            return 0
        kind, d = mem
        value = (
            _keyed(d / "memory.events", "oom_kill")
            if kind == "v2"
            else _keyed(d / "memory.oom_control", "oom_kill")
        )
        return value or 0

    def memory_current(self) -> int | None:
        mem = self._memory()
        if mem is None:
            return None
        kind, d = mem
        return _int_file(d / ("memory.current" if kind == "v2" else "memory.usage_in_bytes"))

    def memory_peak(self) -> int | None:
        mem = self._memory()
        if mem is None:
            return None
        kind, d = mem
        # memory.peak exists from kernel 5.19 on.
        return _int_file(d / ("memory.peak" if kind == "v2" else "memory.max_usage_in_bytes"))

    # ------------------------------------------------------------------------------------------- teardown

    def destroy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.kill(timeout=timeout)
        if self._freezer() is not None and self.frozen():
            # A v1 cgroup left FROZEN is harmless to rmdir, but a v2 one would freeze any reuse of its name.
            with contextlib.suppress(OSError, LifecycleError):
                self.thaw()
        for d in list(self._all_dirs()):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY right after the last task exited: the kernel releases the css asynchronously.
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise LifecycleError(f"cannot remove cgroup {d}: {exc}") from exc
                    time.sleep(0.01)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    delay = 0.001
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(min(delay, max(0.0, end - time.monotonic())))
        delay = min(delay * 2, 0.05)


def _make_session_dir(
    made: _Made, parent_dir: Path, name: str, prepare: Callable[[Path], None] | None
) -> Path:
    # The shared parent may be removed by a concurrent cleanup between our two mkdirs: make it again.
    for _attempt in range(5):
        made.mkdir(parent_dir, exist_ok=True)
        try:
            if prepare is not None:
                prepare(parent_dir)
            made.mkdir(parent_dir / name, exist_ok=False)
            return parent_dir / name
        except (FileNotFoundError, BackendUnavailable):
            if parent_dir.is_dir():
                raise
    raise LifecycleError(f"{parent_dir} keeps disappearing while a session cgroup is made in it")


def _enable(cgroup: Path, controllers: list[str], *, required: bool) -> None:
    """Make ``controllers`` available to the children of ``cgroup`` (v2 ``cgroup.subtree_control``)."""
    enabled = set((_read(cgroup / "cgroup.subtree_control") or "").split())
    for ctrl in controllers:
        if ctrl in enabled:
            continue
        try:
            _write(cgroup / "cgroup.subtree_control", f"+{ctrl}")
        except OSError as exc:
            if not required:
                continue
            hint = {
                errno.EBUSY: "the cgroup has processes of its own (v2 'no internal processes' rule)",
                errno.EINVAL: "the kernel refused it (for cpu: a realtime task outside the root cgroup?)",
                errno.EACCES: "permission denied",
                errno.EPERM: "permission denied",
                errno.ENOENT: "the controller is not available here",
            }.get(exc.errno or 0, str(exc))
            raise BackendUnavailable(
                _BACKEND, f"cannot enable the {ctrl} controller in {cgroup}/cgroup.subtree_control: {hint}"
            ) from exc


def _why_missing(layout: CgroupLayout, ctrl: str) -> str:
    if ctrl in layout.v2_controllers or ctrl in layout.v1_roots:
        return (
            f"the {ctrl} controller exists but is not writable for uid {os.geteuid()}: run as root, or from "
            "a delegated cgroup v2 subtree (systemd-run --user --scope -p Delegate=yes)"
        )
    if layout.v2_root is not None and not layout.v1_roots:
        return (
            f"the {ctrl} controller is not enabled for our cgroup v2 subtree "
            f"({(layout.v2_base or layout.v2_root)}/cgroup.controllers); enable it in the parent's "
            "cgroup.subtree_control or delegate it"
        )
    return f"no cgroup hierarchy on this host offers the {ctrl} controller ({layout.describe()})"


def _why_unwritable(layout: CgroupLayout) -> str:
    return (
        f"no cgroup hierarchy is writable for uid {os.geteuid()} ({layout.describe()}): run as root, or from "
        "a delegated cgroup v2 subtree (systemd-run --user --scope -p Delegate=yes)"
    )


# ------------------------------------------------------------------------------------------------ garbage


def reap_stale(
    parent: str = "stockade",
    *,
    keep: Callable[[str], bool],
    layout: CgroupLayout | None = None,
) -> list[str]:
    """Kill and remove the session cgroups under ``parent`` for which ``keep(name)`` is false; returns their
    names. For ``stockade gc``: ``keep`` says whether a session record still exists."""
    _check_name(parent, "parent")
    layout = layout if layout is not None else detect_layout()
    v2_parent = layout.v2_base / parent if layout.v2_base is not None else None
    v1_parents = {
        c: layout.v1_roots[c] / parent for c in (*_LIMIT_CONTROLLERS, "freezer") if c in layout.v1_roots
    }
    names: set[str] = set()
    for d in [v2_parent, *v1_parents.values()]:
        if d is not None and d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_dir() and _NAME_RE.match(p.name))
    reaped: list[str] = []
    for name in sorted(names):
        if keep(name):
            continue
        v2_dir = v2_parent / name if v2_parent is not None and (v2_parent / name).is_dir() else None
        v1_dirs = {c: p / name for c, p in v1_parents.items() if (p / name).is_dir()}
        SessionCgroup(name, parent, v2_dir, v1_dirs).destroy()
        reaped.append(name)
    return reaped
