"""Host-side state of container sessions, so any process can find a session again by id.

Layout under the state root (0700)::

    sessions/<key>/record.json     the session record (written atomically)
    sessions/<key>/record.terminating  the record once a terminate has claimed the session
    sessions/<key>/outputs/        bound at /mnt/session/outputs
    sessions/<key>/memory/         bound at /mnt/memory
    sessions/<key>/mounts/<n>/     mounts with an empty source (session-owned)
    sessions/<key>/sealed/<hash>/  podman: a read-only directory of the spec, mounted sealed here on the host
    snapshots/<snapshot id>/      manifest.json, files.tar.gz, checkpoint/ (outlive the session)
    exec-init                     the engine's init, execute-only, that wraps each exec (runc)
    seccomp-exec-<hash>           the static seccomp loader that wraps each exec (gVisor), and
    seccomp-<hash>.bpf            the filter it loads
    empty                         an empty read-only file, bound over gVisor's /dev/fuse and /dev/net/tun

``<key>`` is a one-way function of the session id (:func:`session_key`), not the id: the engine shows each
bind's host path inside the container (``/proc/self/mountinfo``), and the id is the handle that controls the
session, so it must not be readable there.

The container itself carries the labels ``stockade.session`` and ``stockade.state``, so containers left behind
by a crashed process are found by label (:meth:`DockerBackend.gc`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ...linux import mounts
from .. import _records as records

__all__ = ["Store", "default_state_root", "install_file", "session_key"]


def session_key(session_id: str) -> str:
    """The name of a session's directory: derived from its id, from which the id cannot be recovered."""
    return hashlib.sha256(b"stockade-session-dir\0" + session_id.encode()).hexdigest()[:32]


def install_file(dest: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``dest`` with ``mode`` atomically (a temporary file beside it, renamed over it), so a
    concurrent reader or a container bind sees the old file or the new one, never half of it."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def default_state_root(engine: str) -> Path:
    """``$STOCKADE_STATE_DIR/<engine>``, else ``/var/lib/stockade/<engine>`` for root, else under XDG state."""
    env = os.environ.get("STOCKADE_STATE_DIR")
    if env:
        return Path(env) / engine
    if os.geteuid() == 0:
        return Path("/var/lib/stockade") / engine
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "stockade" / engine


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sessions = root / "sessions"
        self.snapshots = root / "snapshots"
        for path in (root, self.sessions, self.snapshots):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def session_dir(self, session_id: str) -> Path:
        return self.sessions / session_key(session_id)

    def _id_in(self, path: Path) -> str | None:
        """The id of the session whose record is ``path`` (checked against the directory it sits in)."""
        record = records.read(path)
        sid = record.get("id") if record is not None else None
        return sid if isinstance(sid, str) and self.session_dir(sid) == path.parent else None

    def create_session_dir(self, session_id: str) -> Path:
        path = self.session_dir(session_id)
        path.mkdir(mode=0o711)  # FileExistsError when the id is taken; 0711: the guest uid must traverse it
        return path

    def read(self, session_id: str) -> dict[str, Any] | None:
        return records.read(self.session_dir(session_id) / "record.json")

    def write(self, session_id: str, record: dict[str, Any]) -> None:
        records.write(self.session_dir(session_id) / "record.json", record)

    def claim(self, session_id: str, *, again: bool = False) -> dict[str, Any] | None:
        """Take the session for termination (atomically: a rename), returning its record; None when another
        caller took it first or it does not exist. ``again`` re-takes one whose terminate never finished."""
        sdir = self.session_dir(session_id)
        return records.claim(sdir / "record.json", sdir / "record.terminating", again=again)

    def session_terminating(self, session_id: str) -> bool:
        return (self.session_dir(session_id) / "record.terminating").exists()

    def terminating_ids(self, older_than: float = 0.0) -> list[str]:
        """Sessions whose terminate began at least ``older_than`` seconds ago and never finished."""
        keys = records.claimed_since(self.sessions, "record.terminating", older_than)
        return sorted(sid for key in keys if (sid := self._id_in(self.sessions / key / "record.terminating")))

    def ids(self) -> list[str]:
        try:
            return sorted(sid for p in self.sessions.iterdir() if (sid := self._id_in(p / "record.json")))
        except OSError:
            return []

    def sealed_dir(self, session_id: str, target: str) -> Path:
        """Where the read-only directory the guest sees at ``target`` is mounted sealed on the host (podman)."""
        return self.session_dir(session_id) / "sealed" / hashlib.sha256(target.encode()).hexdigest()[:16]

    def remove_session(self, session_id: str) -> None:
        sealed = self.session_dir(session_id) / "sealed"
        # Unmounted first: rmtree would descend into a mount (read-only, so it would only fail, but never leave
        # a mount behind a removed session).
        with contextlib.suppress(OSError):
            for point in sealed.iterdir():
                mounts.detach(str(point))
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id
