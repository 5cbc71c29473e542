"""Session record files, as the local backends keep them in each session's directory.

One JSON file holds a session's record; it is replaced atomically on every write, and renamed to a second
name to claim the session for termination (a rename is atomic, so of two concurrent terminates exactly one
wins). The stores of ``bwrap``, ``docker`` and ``landlock`` differ only in the names of those two files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["claim", "claimed_since", "read", "record_lock", "write"]


def read(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing or unreadable."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def write(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` with ``record`` atomically (a reader sees the old record or the new, never half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def claim(live: Path, claimed: Path, *, again: bool = False) -> dict[str, Any] | None:
    """Rename ``live`` to ``claimed`` and return the record; None when another caller took it first or it
    does not exist. ``again`` re-takes a claim whose terminate never finished."""
    if not again:
        try:
            os.rename(live, claimed)
        except FileNotFoundError:
            return None
        # A rename keeps the provision-time mtime; claimed_since() counts from the claim, so that gc never
        # finishes a terminate that is still running in another process.
        with contextlib.suppress(OSError):
            os.utime(claimed)
    return read(claimed)


def claimed_since(sessions: Path, claimed_name: str, older_than: float = 0.0) -> list[str]:
    """Ids of the sessions under ``sessions`` claimed at least ``older_than`` seconds ago (never finished)."""
    now = time.time()
    out = []
    try:
        entries = list(sessions.iterdir())
    except OSError:
        return []
    for entry in entries:
        with contextlib.suppress(OSError):
            if now - (entry / claimed_name).stat().st_mtime >= older_than:
                out.append(entry.name)
    return sorted(out)


@contextlib.contextmanager
def record_lock(session_dir: Path) -> Iterator[None]:
    """Serialises read-modify-write updates of one session's record (across processes): live mounts, network
    policy changes and gateway restarts each read, change and rewrite it."""
    fd = os.open(session_dir / "record.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
