"""The snapshots taken through a service, kept as JSON lines so that they outlive the service process.

The contract has no way to list a backend's snapshots; the service lists those it took itself.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..errors import InvalidRequest
from ..models import SandboxSnapshot

__all__ = ["SnapshotJournal"]


class SnapshotJournal:
    """Append-only record of snapshots; in memory only when ``path`` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._memory: list[SandboxSnapshot] = []
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def add(self, snapshot: SandboxSnapshot) -> None:
        if self._path is None:
            self._memory.append(snapshot)
            return
        line = json.dumps(snapshot.to_json()) + "\n"
        with self._lock:
            # One write of one line with O_APPEND: a crash leaves at worst a torn last line, skipped on reading.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def list(self, session_id: str | None = None) -> list[SandboxSnapshot]:
        if self._path is None:
            found = list(self._memory)
        else:
            found = []
            try:
                text = self._path.read_text()
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                try:
                    found.append(SandboxSnapshot.parse(line))
                except InvalidRequest:
                    continue  # a torn line from a crash mid-append
        return [s for s in found if session_id is None or s.session_id == session_id]
