"""On-disk state of bwrap sessions and snapshots, so that any process can find a session again by id.

Layout under the state root (0700)::

    sessions/<id>/state.json      the session record (written atomically)
    sessions/<id>/agent.sock      the agent's socket (host side only; the guest never sees it)
    sessions/<id>/outputs/        /mnt/session/outputs
    sessions/<id>/memory/         /mnt/memory
    sessions/<id>/mounts/<n>/     mounts with an empty source (session-owned)
    sessions/<id>/overlay-work/   work directories of the overlays that present the writable ones above
    snapshots/<snapshot id>/      archive.tar.zst + manifest.json (outlive the session)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from .. import _records as records

__all__ = ["OVERLAY_WORK", "SessionStore", "default_state_root", "process_start_time"]

OVERLAY_WORK = "overlay-work"
"""The directory of a session's state dir that holds the work directories of its read-write overlays."""


def default_state_root() -> Path:
    """``$STOCKADE_STATE_DIR``, else ``/var/lib/stockade`` for root, else ``$XDG_STATE_HOME/stockade``."""
    env = os.environ.get("STOCKADE_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/stockade")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "stockade"


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a live pid from a reused one.

    None when there is no such process, or only its zombie (it has exited; nothing runs there any more).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


POOL_PREFIX = "stockade-pool-"  # ids of warm-pool sandboxes (see _pool)


class SessionStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sessions = root / "sessions"
        self.snapshots = root / "snapshots"
        for path in (root, self.sessions, self.snapshots):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def session_dir(self, session_id: str) -> Path:
        return self.sessions / session_id

    def create_session_dir(self, session_id: str) -> Path:
        path = self.session_dir(session_id)
        path.mkdir(mode=0o700)  # FileExistsError when the id is taken
        return path

    def read(self, session_id: str) -> dict[str, Any] | None:
        return records.read(self.session_dir(session_id) / "state.json")

    def write(self, session_id: str, record: dict[str, Any]) -> None:
        records.write(self.session_dir(session_id) / "state.json", record)

    def claim(self, session_id: str, *, again: bool = False) -> dict[str, Any] | None:
        """Take the session for termination (atomically: a rename), returning its record; None when another
        caller took it first or it does not exist. ``again`` re-takes one whose terminate never finished."""
        sdir = self.session_dir(session_id)
        return records.claim(sdir / "state.json", sdir / "state.terminating", again=again)

    def terminating_ids(self, older_than: float = 0.0) -> list[str]:
        """Sessions whose terminate began at least ``older_than`` seconds ago and never finished."""
        return records.claimed_since(self.sessions, "state.terminating", older_than)

    def ids(self) -> list[str]:
        """Ids of sessions (warm-pool sandboxes, which are nobody's session yet, excluded)."""
        return [i for i in self._all_ids() if not i.startswith(POOL_PREFIX)]

    def pool_ids(self) -> list[str]:
        return [i for i in self._all_ids() if i.startswith(POOL_PREFIX)]

    def _all_ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.sessions.iterdir() if (p / "state.json").exists())
        except OSError:
            return []

    def remove_session(self, session_id: str) -> None:
        sdir = self.session_dir(session_id)
        # overlayfs leaves its work directories mode 0 (owned by the caller, who can open them up again); without
        # that an unprivileged caller's rmtree could not enter them.
        for work in sdir.glob(f"{OVERLAY_WORK}/*/work"):
            with contextlib.suppress(OSError):
                if not work.is_symlink():
                    work.chmod(0o700)
        # rmtree never follows symlinks, and nothing is mounted under a session dir on the host side.
        shutil.rmtree(sdir, ignore_errors=True)

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id
