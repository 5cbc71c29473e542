"""On-disk state of landlock sessions and snapshots, so that any process can find a session again by id.

Layout under the state root::

    sessions/<digest>/state.json      the session record, with the supervisor's token (0600); <digest> is a
                                      hash of the session id, so the paths the guest sees do not give it away
    sessions/<digest>/control.sock    the supervisor's socket (0600)
    sessions/<digest>/supervisor.log  the supervisor's stderr
    sessions/<digest>/root/           what the guest may touch, granted in place by Landlock:
                      root/home/      HOME and the default working directory
                      root/tmp/       TMPDIR
                      root/outputs/   /mnt/session/outputs
                      root/memory/    /mnt/memory
                      root/mounts/<n>/  mounts with an empty source (session-owned)
    snapshots/<snapshot id>/          archive.tar.gz + manifest.json (outlive the session; bwrap's format)

A terminate renames ``state.json`` to ``terminating.json`` first, so that exactly one terminate proceeds.

Guest processes never read anything outside ``root/`` (Landlock), so the record and token stay out of reach.
When the host user is root, commands run under a per-session uid: then the directories from the filesystem
root down to ``sessions/<digest>`` must be searchable by others (mode o+x, never o+r), and ``root/`` belongs to
the session's group.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable
from .. import _records as records

__all__ = ["SessionStore", "default_state_root", "process_start_time", "remove_tree"]


def default_state_root() -> Path:
    """``$STOCKADE_STATE_DIR/landlock``, else ``/var/lib/stockade/landlock`` for root, else
    ``$XDG_STATE_HOME/stockade/landlock``."""
    env = os.environ.get("STOCKADE_STATE_DIR")
    if env:
        return Path(env) / "landlock"
    if os.geteuid() == 0:
        return Path("/var/lib/stockade/landlock")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "stockade" / "landlock"


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a live pid from a reused one."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[19])


def remove_tree(path: Path) -> None:
    """Remove ``path`` even where a guest made entries unwritable (chmod 000); never follows symlinks."""

    def make_writable(func: Callable[..., Any], target: str, _exc: Any) -> None:
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    if path.exists() or path.is_symlink():
        # onerror, not onexc: the latter needs Python 3.12 and we support 3.11.
        shutil.rmtree(path, onerror=make_writable)


class SessionStore:
    """Session records and snapshots under ``root``; ``shared`` makes the path searchable by the per-session
    uids (root mode)."""

    def __init__(self, root: Path, *, shared: bool) -> None:
        self.root = root
        self.shared = shared
        self.sessions = root / "sessions"
        self.snapshots = root / "snapshots"
        dir_mode = 0o711 if shared else 0o700
        for path in (root, self.sessions):
            path.mkdir(mode=dir_mode, parents=True, exist_ok=True)
            os.chmod(path, dir_mode)
        self.snapshots.mkdir(mode=0o700, exist_ok=True)
        if shared:
            self._check_searchable(root)

    @staticmethod
    def _check_searchable(root: Path) -> None:
        # The per-session uid must be able to walk to its directories; it needs search (x), never read.
        default_parent = Path("/var/lib/stockade")
        for ancestor in root.resolve().parents:
            mode = ancestor.stat().st_mode
            if mode & stat.S_IXOTH:
                continue
            if ancestor == default_parent:
                os.chmod(ancestor, stat.S_IMODE(mode) | stat.S_IXOTH)  # ours; search only, no listing
                continue
            raise BackendUnavailable(
                "landlock",
                f"as root, commands run under a per-session uid that must be able to reach {root}, but "
                f"{ancestor} is not searchable by others; run 'chmod o+x {ancestor}' or use a state_dir "
                "under a searchable path (e.g. /var/lib/stockade or /var/tmp)",
            )

    def session_dir(self, session_id: str) -> Path:
        # A digest, not the id: every path the guest sees (HOME, TMPDIR, ...) contains this name, and the id is
        # what callers of the service address a session by.
        return self.sessions / hashlib.sha256(session_id.encode()).hexdigest()[:32]

    def create_session_dir(self, session_id: str) -> Path:
        path = self.session_dir(session_id)
        path.mkdir(mode=0o711 if self.shared else 0o700)  # FileExistsError when the id is taken
        return path

    def read(self, session_id: str) -> dict[str, Any] | None:
        return records.read(self.session_dir(session_id) / "state.json")

    def write(self, session_id: str, record: dict[str, Any]) -> None:
        records.write(self.session_dir(session_id) / "state.json", record)

    def ids(self) -> list[str]:
        out = []
        try:
            entries = list(self.sessions.iterdir())
        except OSError:
            return []
        for entry in entries:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                out.append(str(json.loads((entry / "state.json").read_text())["id"]))
        return sorted(out)

    def claim(self, session_id: str) -> bool:
        """Take the session out of the store atomically (the first terminate wins; later ones find nothing)."""
        directory = self.session_dir(session_id)
        try:
            os.rename(directory / "state.json", directory / "terminating.json")
        except FileNotFoundError:
            return False
        return True

    def remove_session(self, session_id: str) -> None:
        remove_tree(self.session_dir(session_id))

    def abandoned(self) -> list[dict[str, Any]]:
        """Records of terminates that were interrupted half-way (``terminating.json`` left behind)."""
        out = []
        for record_file in self.sessions.glob("*/terminating.json"):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(record_file.read_text()))
        return out

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id
