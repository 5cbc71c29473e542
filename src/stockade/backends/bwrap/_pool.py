"""A warm pool of pre-started bwrap sandboxes, so that ``provision`` need not wait for one to boot.

Most of a provision is bubblewrap and the agent's interpreter starting (~100 ms here). A pooled sandbox was
started ahead of time with the plainest spec (deny-all, no extra mounts, default limits); claiming it renames
its state directory to the new session id and records the real spec, which takes a few milliseconds. Only
specs that such a sandbox can serve exactly are taken from the pool (see :func:`poolable`): everything fixed at
start (mounts and their modes, ``/tmp`` size, cgroup limits, a snapshot's files) must be the default. Egress is
added after the claim, as ``apply_network_policy`` does for any running session.

Pool entries live in the state directory under ids starting with :data:`POOL_PREFIX`, which the store does
not list as sessions. Each records the process that owns it: ``aclose()`` terminates them, and ``gc()`` of
any process reaps entries whose owner is gone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from ...models import SandboxSpec
from ._store import POOL_PREFIX, SessionStore, process_start_time

__all__ = ["POOL_PREFIX", "WarmPool", "owner_alive", "poolable"]


def poolable(spec: SandboxSpec) -> bool:
    """Whether a sandbox started with the default spec serves ``spec`` exactly."""
    limits = spec.limits
    return (
        not spec.mounts
        and spec.from_snapshot is None
        and spec.image is None
        and not spec.memory_writable
        and limits.memory_mb is None
        and limits.cpu_count is None
        and limits.pids_max is None
        and limits.tmp_mb is None
        and limits.idle_timeout is None
    )


def owner_alive(record: dict[str, Any]) -> bool:
    owner = record.get("pool_owner") or {}
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return process_start_time(pid) == owner.get("start")


class WarmPool:
    """Keeps up to ``size`` idle sandboxes ready; thread-safe.

    ``start_one(pool_id)`` boots one sandbox under that id (the backend's own provisioning, blocking);
    ``discard(pool_id)`` terminates one that can no longer be used.
    """

    def __init__(
        self,
        size: int,
        store: SessionStore,
        start_one: Callable[[str], None],
        discard: Callable[[str], object],
    ) -> None:
        self.size = size
        self.store = store
        self._start_one = start_one
        self._discard = discard
        self._ready: list[str] = []
        self._lock = threading.Lock()
        self._filler: threading.Thread | None = None
        self._closed = False

    @staticmethod
    def owner() -> dict[str, Any]:
        return {"pid": os.getpid(), "start": process_start_time(os.getpid())}

    def take(self) -> str | None:
        """The id of a ready sandbox (now the caller's), or None when none is ready; starts a refill."""
        with self._lock:
            pool_id = self._ready.pop() if self._ready else None
        self.refill()
        return pool_id

    def give_back(self, pool_id: str) -> None:
        with self._lock:
            self._ready.append(pool_id)

    def fill(self) -> None:
        """Start sandboxes until ``size`` are ready (blocking)."""
        while not self._closed:
            with self._lock:
                if len(self._ready) >= self.size:
                    return
            pool_id = POOL_PREFIX + secrets.token_hex(12)
            try:
                self._start_one(pool_id)
            except Exception:
                return  # the next take() tries again; provision without the pool still works
            with self._lock:
                if self._closed:
                    closed = True
                else:
                    closed = False
                    self._ready.append(pool_id)
            if closed:
                self._discard(pool_id)
                return

    def refill(self) -> None:
        """Top the pool up in a background thread (one at a time)."""
        with self._lock:
            if self._closed or (self._filler is not None and self._filler.is_alive()):
                return
            self._filler = threading.Thread(target=self.fill, name="stockade-bwrap-pool", daemon=True)
            self._filler.start()

    def close(self) -> None:
        """Stop refilling and terminate every ready sandbox."""
        with self._lock:
            self._closed = True
            filler = self._filler
        if filler is not None:
            filler.join(timeout=30)
        with self._lock:
            ready, self._ready = self._ready, []
        for pool_id in ready:
            with contextlib.suppress(Exception):
                self._discard(pool_id)
