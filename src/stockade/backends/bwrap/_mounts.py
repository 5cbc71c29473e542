"""Live mounts for bwrap sessions: ``attach_filesystem`` on a running sandbox.

The work in the sandbox's mount namespace is done by :mod:`stockade.linux.mounts` (new mount API in a helper
process; its docstring explains the steps). This module decides what may be attached where, and records what
was attached in the session's state, so that ``list``, ``get_session``, ``snapshot`` and ``terminate`` see it.

Rules on top of the contract's (absolute, ``..``-free targets; a source that exists, is a directory or a regular
file and is not, and does not pass through, a symlink):

- the target must not be, contain, or sit inside another mount of the session (canonical, spec or live), nor
  lie in the guest's system view (``/usr``, ``/etc``, the merged-usr links, ``/proc``, ``/dev``, ``/sys``,
  ``/run/stockade``, ``/tmp`` itself); inside ``/tmp`` is fine;
- the target is resolved inside the guest without following symlinks, so a symlink the guest planted refuses
  the attach instead of redirecting it;
- an empty ``source`` makes a fresh session-owned directory (captured by snapshots, like one in the spec).

The same helper places a session's read-only directory mounts at provision (:func:`attach_at_start`):
bubblewrap's ``--ro-bind`` is a plain bind, through which a host daemon's unix socket in the directory answers
the guest and ``/proc/self/mountinfo`` shows the source's host path; the helper presents such a directory as a
sealed overlay instead (see :mod:`stockade.linux.mounts`). A read-only directory attached live is sealed too.

Nothing is mounted on the host: when the sandbox's mount namespace goes away (``terminate``, or the sandbox
dying), its live mounts go with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Any

from ...errors import InvalidRequest, LifecycleError, SessionNotFound, Unsupported
from ...linux import mounts as kernel
from ...models import FilesystemAccess, FilesystemMount
from .._records import record_lock
from ._launch import GuestMount
from ._store import OVERLAY_WORK, SessionStore, process_start_time

__all__ = ["SYSTEM_PATHS", "attach_at_start", "attach_live", "check_target", "live_mounts_reason", "sealable"]

SYSTEM_PATHS = (
    "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/proc", "/dev", "/sys", "/run/stockade",
)
"""Guest paths a live mount may neither replace nor enter."""
_EXACT_MOUNT_POINTS = ("/", "/tmp")
"""Mount points of the guest's own view: nothing may be stacked on them (paths below are fine)."""


def live_mounts_reason() -> str | None:
    """None when live mounts work here (root or not), else why not."""
    if not kernel.new_mount_api_available():
        return "the kernel lacks the new mount API (open_tree, move_mount, mount_setattr, openat2: Linux 5.12+)"
    return None


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_target(record: dict[str, Any], target: str) -> None:
    """Refuse a target that collides with the session's mounts or the guest's system view."""
    if target in _EXACT_MOUNT_POINTS:
        raise InvalidRequest(f"{target!r} is a mount point of the guest's own view; mount below it",
                             field="mount.target")
    for system in SYSTEM_PATHS:
        if _inside(target, system):
            raise InvalidRequest(f"{target!r} is inside the guest's system view ({system})", field="mount.target")
    for mount in record["mounts"]:
        existing = mount["target"]
        if _inside(target, existing):
            what = "already mounted" if target == existing else f"inside the mount at {existing!r}"
            raise InvalidRequest(f"{target!r} is {what}; choose a target outside the session's mounts",
                                 field="mount.target")
        if _inside(existing, target):
            raise InvalidRequest(f"{target!r} would hide the mount at {existing!r}", field="mount.target")


def _namespace_fds(record: dict[str, Any]) -> tuple[int, int]:
    """(owner user namespace, mount namespace) of the session's sandbox, checked to belong to it."""
    pid = int(record["init_pid"])
    try:
        mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LifecycleError(f"session {record['id']!r} is not running; terminate it") from exc
    try:
        # Opened first, checked after: while the pid still carries the recorded start time, the namespace
        # opened above is the sandbox's (a recycled pid would carry another one).
        if process_start_time(pid) != record.get("init_start"):
            raise LifecycleError(f"session {record['id']!r} is not running; terminate it")
        owner = kernel.ns_owner(mnt)
    except BaseException:
        os.close(mnt)
        raise
    return owner, mnt


def owned_mount(sdir: Path, directory: Path, target: str, access: FilesystemAccess) -> GuestMount:
    """A mount of ``directory``, a directory the session owns under ``sdir``; writable ones get a work dir."""
    if access is FilesystemAccess.READ_ONLY:
        return GuestMount(str(directory), target, access)
    work = sdir / OVERLAY_WORK / str(directory.relative_to(sdir)).replace("/", "-")
    work.mkdir(parents=True)
    return GuestMount(str(directory), target, access, str(work))


def sealable(mount: GuestMount) -> bool:
    """Whether provision places ``mount`` through the helper, sealed, rather than through bubblewrap."""
    return mount.access is FilesystemAccess.READ_ONLY and os.path.isdir(mount.host_path)


def via_helper(mount: GuestMount) -> bool:
    """Whether provision places ``mount`` through the mount helper (sealed or as a private upper layer)."""
    return live_mounts_reason() is None and (sealable(mount) or mount.workdir is not None)


def attach_at_start(session_id: str, init_pid: int, mounts: list[GuestMount]) -> list[str]:
    """Attach ``mounts`` (in order) in the freshly started sandbox of ``init_pid``; the targets left unsealed.

    Raises what :func:`attach_live` raises for the same failures; the caller tears the half-built session down.
    """
    record = {"id": session_id, "init_pid": init_pid, "init_start": process_start_time(init_pid)}
    requests = [kernel.MountRequest(m.host_path, m.target, m.access is FilesystemAccess.READ_ONLY, m.workdir)
                for m in mounts]
    owner, mnt = _namespace_fds(record)
    try:
        results = kernel.run_attach_all_helper(owner, mnt, requests)
    except kernel.AttachFailed as exc:
        failed = next((m for m in mounts if m.target == exc.target), mounts[0])
        raise _fail(exc, FilesystemMount(source=failed.host_path, target=failed.target, access=failed.access),
                    failed.host_path) from exc
    finally:
        os.close(owner)
        os.close(mnt)
    return [r.target for r, m in zip(results, mounts, strict=True) if via_helper(m) and not r.sealed]


def _fail(exc: kernel.AttachFailed, mount: FilesystemMount, source: str) -> Exception:
    if exc.stage == "source":
        if exc.errno == errno.ELOOP:
            return InvalidRequest(f"{source!r} is or passes through a symlink; give the real path",
                                  field="mount.source")
        return InvalidRequest(f"cannot use {source!r}: {exc.message}", field="mount.source")
    if exc.stage == "target":
        if exc.errno == errno.ELOOP:
            return InvalidRequest(
                f"{mount.target!r} passes through a symlink inside the guest; a mount is never placed through one",
                field="mount.target",
            )
        return InvalidRequest(f"cannot mount at {mount.target!r}: {exc.message}", field="mount.target")
    if exc.errno == errno.ENOSYS:
        return Unsupported("bwrap", "attach_filesystem", f"the kernel refused the new mount API: {exc.message}")
    return LifecycleError(f"attaching {mount.target!r} failed ({exc.stage}): {exc.message}")


def attach_live(store: SessionStore, session_id: str, mount: FilesystemMount) -> dict[str, Any]:
    """Attach ``mount`` to the running session and return its updated record (already written).

    The caller has checked that a non-empty source exists, is a directory or file and is no symlink.
    """
    sdir = store.session_dir(session_id)
    with record_lock(sdir):
        record = store.read(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        check_target(record, mount.target)
        source = mount.source
        owned_dir: Path | None = None
        workdir: str | None = None
        if not source:
            owned_dir = sdir / "mounts" / f"live-{secrets.token_hex(4)}"
            owned_dir.mkdir(parents=True)
            source = str(owned_dir)
            workdir = owned_mount(sdir, owned_dir, mount.target, mount.access).workdir
        readonly = mount.access is FilesystemAccess.READ_ONLY
        try:
            owner, mnt = _namespace_fds(record)
            try:
                result = kernel.run_attach_helper(owner, mnt, source, mount.target, readonly, workdir=workdir)
            except kernel.AttachFailed as exc:
                raise _fail(exc, mount, source) from exc
            finally:
                os.close(owner)
                os.close(mnt)
        except BaseException:
            if owned_dir is not None:
                with contextlib.suppress(OSError):
                    owned_dir.rmdir()
            raise
        record["mounts"].append({"target": mount.target, "access": mount.access.value, "host_path": source})
        record.setdefault("live_mounts", []).append(mount.target)
        if (workdir is not None or (readonly and os.path.isdir(source))) and not result.sealed:
            record.setdefault("unsealed_mounts", []).append(mount.target)
        if owned_dir is not None:
            record.setdefault("owned_mounts", []).append(mount.target)
        # The recorded spec is what a snapshot's manifest carries: with the live mount in it, a fork from that
        # snapshot can ask for the same mounts (and gets a session-owned one's files back).
        record["spec"]["mounts"] = [*record["spec"].get("mounts", []), mount.to_json()]
        store.write(session_id, record)
        return record

