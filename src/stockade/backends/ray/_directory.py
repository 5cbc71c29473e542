"""The cluster's session directory: one detached actor on the head node that records where each session lives.

It is what lets any driver (another process, a restarted one) find a session by id, tell a lost session from an
unknown one, keep a spread group's sessions apart, and find a session's latest snapshot. It holds small JSON
records only; the sessions themselves live on the nodes. It lives as long as the head node does (as do the
cluster's placement groups).
"""

from __future__ import annotations

from typing import Any

import ray

__all__ = ["DIRECTORY_NAME", "Directory"]

DIRECTORY_NAME = "stockade-directory"


class _Directory:
    """Session id -> record (``node_id``, ``node_ip``, ``spec``, ``pg``, ``lost``, ``snapshot``) and snapshot id
    -> record (``session_id``, ``node_id``, ``stored``). Methods are async so that calls never queue behind each
    other for long; each runs to completion without awaiting, so every method is atomic."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.snapshots: dict[str, dict[str, Any]] = {}

    async def reserve(self, session_id: str, record: dict[str, Any], replace: bool = False) -> bool:
        """Claim ``session_id``; False when it is taken (and ``replace`` is not set)."""
        if session_id in self.sessions and not replace:
            return False
        self.sessions[session_id] = dict(record)
        return True

    async def update(self, session_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        record = self.sessions.get(session_id)
        if record is None:
            return None
        record.update(fields)
        return dict(record)

    async def claim(self, session_id: str) -> dict[str, Any] | None:
        """Take ``session_id`` for termination: its record for the first caller; None when it is unknown or
        another caller claimed it first (so of two concurrent terminates one ends the session and the other is
        told it is gone). A session still being placed (no node yet) is returned unclaimed."""
        record = self.sessions.get(session_id)
        if record is None or record.get("terminating"):
            return None
        if record.get("node_id") or record.get("lost"):
            record["terminating"] = True
        return dict(record)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        record = self.sessions.get(session_id)
        return dict(record) if record is not None else None

    async def remove(self, session_id: str, attempt: str | None = None) -> dict[str, Any] | None:
        """Forget ``session_id``; with ``attempt``, only if that provision attempt still owns the record (a failed
        provision must not remove the record of a later one that reused the id)."""
        record = self.sessions.get(session_id)
        if record is None or (attempt is not None and record.get("attempt") != attempt):
            return None
        return self.sessions.pop(session_id)

    async def all(self) -> dict[str, dict[str, Any]]:
        return {sid: dict(rec) for sid, rec in self.sessions.items()}

    async def group_nodes(self, group: str) -> list[str]:
        """Nodes holding a live (not lost) session of spread group ``group``."""
        return sorted({
            rec["node_id"]
            for rec in self.sessions.values()
            if rec.get("spread") == group and not rec.get("lost") and rec.get("node_id")
        })

    async def mark_node_lost(self, node_id: str, reason: str) -> list[str]:
        """Mark every session of ``node_id`` lost; returns their ids."""
        ids = []
        for session_id, rec in self.sessions.items():
            if rec.get("node_id") == node_id and not rec.get("lost"):
                rec["lost"] = reason
                ids.append(session_id)
        return ids

    async def put_snapshot(self, snapshot_id: str, record: dict[str, Any]) -> None:
        self.snapshots[snapshot_id] = dict(record)
        session = self.sessions.get(record.get("session_id", ""))
        if session is not None:
            session["snapshot"] = snapshot_id

    async def get_snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        record = self.snapshots.get(snapshot_id)
        return dict(record) if record is not None else None

    async def ping(self) -> bool:
        return True


# Options through a dict: Ray's type stubs know only some of ray.remote's keywords.
_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1000}
Directory: Any = ray.remote(**_OPTIONS)(_Directory)
