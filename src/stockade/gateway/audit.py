"""The gateway's audit log: one JSON object per line, per connection attempt and per DNS answer.

Fields: ``time`` (RFC 3339 UTC), ``session``, ``kind`` ("connect" | "dns"), ``via`` ("http" | "connect" |
"socks5" | "transparent" | "dns"), ``name``, ``port``, ``address``, ``protocol`` ("tcp" | "udp"), ``decision``
("allowed" | "refused"), ``rule`` (when allowed) or ``reason`` (when refused), ``bytes_up``, ``bytes_down``,
``duration_ms``; optionally ``closed`` (why an allowed connection was cut, e.g. "policy_update:...") and
``error`` (an upstream failure after an allowed decision).

A connect line is written once, when the connection ends or is refused, so its byte counts are final.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "read", "rfc3339_now"]


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only JSON-lines log; with ``path=None`` it keeps only the recent entries in memory."""

    def __init__(self, path: Path | None, *, keep: int = 1000) -> None:
        self.path = path
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: each single write() of a line lands whole at the end, even with concurrent writers.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry.setdefault("time", rfc3339_now())
        line = (json.dumps(entry, separators=(",", ":"), sort_keys=False) + "\n").encode()
        with self._lock:
            self.recent.append(entry)
            if self._fd is not None:
                os.write(self._fd, line)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        if self.path is not None:
            return read(self.path, limit)
        items = list(self.recent)
        return items[-limit:] if limit is not None else items


def read(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The entries of a log file, oldest first; with ``limit``, only the last ``limit`` of them.

    Lines that do not parse (a write cut short by a crash) are skipped.
    """
    if limit is not None and limit <= 0:
        return []
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return []
    out: deque[dict[str, Any]] = deque(maxlen=limit)
    with fh:
        for raw in fh:
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
    return list(out)
