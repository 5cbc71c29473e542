"""The node agent: one detached Ray actor per node that forwards every contract method to the node's local
backend (``bwrap`` by default).

One actor per node, not one per session: a Ray actor is a worker process (~50 MB PSS, ~1 s to start here),
while a session is a placement group holding one slot (~5-15 ms); see docs/ray.md for the figures. The actor is
async, so one slow exec never holds up another session; ``ping`` runs in a concurrency group of its own (its own
event loop), so the driver's liveness probe is answered even while the main loop is busy.

Results cross the wire as JSON-ready dicts, and errors as ``{"error": SandboxError.to_json()}`` values rather
than exceptions, so the driver rebuilds exactly the stockade error the node backend raised, free of Ray's
exception wrappers.

A driver that gives up on a provision (cancelled, timed out, lost the answer) cannot stop the node's provision
from finishing: Ray's cancellation of an actor task comes too late or not at all. Each provision therefore
carries an attempt token, and ``abandon`` tells the node to end whatever that attempt makes, whether it has not
started yet, is running, or has already finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio.to_thread
import ray

from ...backend import ExecChunk, SandboxBackend
from ...errors import LifecycleError, SandboxError, SessionNotFound, Unsupported
from ...models import ExecRequest, ExecResult, FilesystemMount, NetworkPolicy, SandboxSpec
from ._snapstore import SnapshotStore, local_snapshot_dir

__all__ = ["NodeAgent", "agent_name"]


def agent_name(node_backend: str, options: dict[str, Any], node_id: str) -> str:
    """One agent per node, node backend and set of node backend options (drivers with other options, e.g. an
    injected resolver, get an agent of their own; a session is always served by the agent that made it)."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"stockade-agent-{node_backend}-{digest}-{node_id}"


def _raylet_parent() -> int | None:
    """The raylet's pid: Ray workers are its children. None if our parent is something else."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return None
    return parent if argv0.endswith(b"/raylet") or argv0 == b"raylet" else None


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SandboxError):
        return {"error": exc.to_json()}
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {"error": {"code": "sandbox_error", "message": f"node agent failed: {detail}"}}


class _Attempt:
    """One provision attempt, as ``provision`` and ``abandon`` see it (both run on the actor's one event loop,
    so reading and setting these fields between awaits is atomic)."""

    __slots__ = ("abandoned", "finished", "made", "since", "started", "task")

    def __init__(self) -> None:
        self.started = False
        self.abandoned = False
        self.made = False  # finished with a live session that nobody has ended yet
        self.finished = asyncio.Event()
        self.since = time.monotonic()
        self.task: asyncio.Future[dict[str, Any]] | None = None  # held, so the loop cannot drop it half way


# How long an attempt's fate is kept: a driver abandons right after giving up, so an hour is plenty.
ATTEMPT_TTL = 3600.0


class _NodeAgent:
    """Holds one node backend instance and the sessions it manages on this node."""

    def __init__(self, node_backend: str, options: dict[str, Any]) -> None:
        from ...registry import open_backend

        self.node_id = ray.get_runtime_context().get_node_id()
        self.raylet_pid = _raylet_parent()
        self.node_backend = node_backend
        self.problem: str | None = None
        self.backend: SandboxBackend | None = None
        self.attempts: dict[str, _Attempt] = {}
        try:
            self.backend = open_backend(node_backend, **options)
            # Measured once, when the node joins: the driver intersects these over the nodes.
            self.caps = self.backend.capabilities().to_json()
        except Exception as exc:  # reported through info(): the driver keeps such a node out of placement
            self.problem = f"{type(exc).__name__}: {exc}"
            self.caps = {}

    # ------------------------------------------------------------------------------------------ control

    @ray.method(concurrency_group="control")
    async def ping(self) -> dict[str, Any]:
        gone = self._gone()
        return {"gone": gone} if gone else {"ok": self.node_id}

    def _gone(self) -> str | None:
        """Why this node is going away, or None. A raylet that died leaves its workers running for a while
        (they notice later); sessions must not keep answering from a node the cluster is losing."""
        if self.raylet_pid is not None and os.getppid() != self.raylet_pid:
            return f"its raylet (pid {self.raylet_pid}) is gone"
        return None

    async def info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "raylet_pid": self.raylet_pid,
            "node_backend": self.node_backend,
            "capabilities": self.caps,
            "problem": self.problem,
        }

    def _backend(self) -> SandboxBackend:
        if self.backend is None:
            raise LifecycleError(f"node backend {self.node_backend!r} is unavailable on this node: {self.problem}")
        return self.backend

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        gone = self._gone()
        if gone:
            return {"gone": gone}
        try:
            return {"ok": await call()}
        except Exception as exc:
            return _error(exc)

    # ------------------------------------------------------------------------------------ contract calls

    async def provision(self, spec: dict[str, Any], store: str | None, attempt: str | None = None) -> dict[str, Any]:
        async def go() -> Any:
            backend = self._backend()
            parsed = SandboxSpec.parse(spec)
            if parsed.from_snapshot is not None and store is not None:
                await anyio.to_thread.run_sync(self._fetch_snapshot, backend, parsed.from_snapshot, store)
            return (await backend.provision(parsed)).to_json()

        if attempt is None:
            return await self._run(go)
        tracked = self._attempt(attempt)
        if tracked.abandoned or tracked.started:
            return _error(LifecycleError("the driver gave up on this provision before it started; nothing was made"))
        tracked.started = True
        # In a task of its own: Ray cancels this actor task when the driver stops waiting, and the node backend's
        # provision must then run to its end, so that what it made is ended rather than half-built or orphaned.
        tracked.task = asyncio.ensure_future(self._provision_attempt(tracked, go))
        try:
            return await asyncio.shield(tracked.task)
        except asyncio.CancelledError:
            tracked.abandoned = True  # whoever cancelled this gave up on the session; the task ends it
            raise

    async def _provision_attempt(self, tracked: _Attempt, go: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        made = False
        try:
            reply = await self._run(go)
            made = "ok" in reply
            if made and tracked.abandoned:  # the driver gave up while we worked: end what we made
                made = False
                ended = await self._run(lambda: self._end(str(reply["ok"]["id"])))
                reply = ended if "error" in ended else _error(
                    LifecycleError("the driver gave up on this provision; the session it made was ended"))
        finally:
            tracked.made = made
            tracked.finished.set()
        return reply

    async def abandon(self, session_id: str, attempt: str) -> dict[str, Any]:
        """The driver gave up on provision ``attempt`` of ``session_id``: end what it made, or will make. Returns
        once nothing of it runs (an attempt still running is waited for; one not started yet never will)."""
        tracked = self._attempt(attempt)
        tracked.abandoned = True
        if tracked.started:
            await tracked.finished.wait()
            if tracked.made:
                tracked.made = False
                return await self._run(lambda: self._end(session_id))
        return {"ok": None}

    def _attempt(self, attempt: str) -> _Attempt:
        now = time.monotonic()
        for token in [t for t, a in self.attempts.items() if now - a.since > ATTEMPT_TTL]:
            del self.attempts[token]
        return self.attempts.setdefault(attempt, _Attempt())

    async def _end(self, session_id: str) -> None:
        """Terminate a session nobody was handed (one it no longer has is fine)."""
        with contextlib.suppress(SessionNotFound):
            await self._backend().terminate(session_id)

    @staticmethod
    def _fetch_snapshot(backend: SandboxBackend, snapshot_id: str, store: str) -> None:
        local = local_snapshot_dir(backend, snapshot_id)
        if local is None:
            raise Unsupported("ray", "from_snapshot",
                              f"node backend {backend.name!r} keeps no snapshot directory to restore into")
        if local.exists():
            return
        SnapshotStore(store).fetch(snapshot_id, local)  # absent from the store: the backend says "no snapshot"

    async def exec(self, session_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._run(
            lambda: self._exec(session_id, request)
        )

    async def _exec(self, session_id: str, request: dict[str, Any]) -> dict[str, Any]:
        result: ExecResult = await self._backend().exec(session_id, ExecRequest.parse(request))
        return result.to_json()

    @ray.method(num_returns="streaming")
    async def exec_stream(self, session_id: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        gone = self._gone()
        if gone:
            yield {"gone": gone}
            return
        try:
            async for item in self._backend().exec_stream(session_id, ExecRequest.parse(request)):
                if isinstance(item, ExecChunk):
                    yield {"chunk": item.stream, "data": item.data}
                else:
                    yield {"ok": item.to_json()}
        except Exception as exc:
            yield _error(exc)

    async def attach_filesystem(self, session_id: str, mount: dict[str, Any]) -> dict[str, Any]:
        return await self._run(lambda: self._attach(session_id, mount))

    async def _attach(self, session_id: str, mount: dict[str, Any]) -> dict[str, Any]:
        session = await self._backend().attach_filesystem(session_id, FilesystemMount.parse(mount))
        return session.to_json()

    async def apply_network_policy(self, session_id: str, policy: dict[str, Any]) -> dict[str, Any]:
        return await self._run(lambda: self._policy(session_id, policy))

    async def _policy(self, session_id: str, policy: dict[str, Any]) -> dict[str, Any]:
        session = await self._backend().apply_network_policy(session_id, NetworkPolicy.parse(policy))
        return session.to_json()

    async def snapshot(self, session_id: str, store: str | None) -> dict[str, Any]:
        async def go() -> Any:
            backend = self._backend()
            snap = await backend.snapshot(session_id)
            stored = False
            if store is not None:
                local = local_snapshot_dir(backend, snap.snapshot_id)
                if local is None or not local.is_dir():
                    raise Unsupported("ray", "snapshot store",
                                      f"node backend {backend.name!r} keeps no snapshot directory to export")
                await anyio.to_thread.run_sync(SnapshotStore(store).put, snap.snapshot_id, local)
                stored = True
            return {"snapshot": snap.to_json(), "stored": stored}

        return await self._run(go)

    async def resume(self, session_id: str) -> dict[str, Any]:
        return await self._run(lambda: self._session_call("resume", session_id))

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self._run(lambda: self._session_call("get_session", session_id))

    async def _session_call(self, method: str, session_id: str) -> dict[str, Any]:
        session = await getattr(self._backend(), method)(session_id)
        return dict(session.to_json())

    async def terminate(self, session_id: str) -> dict[str, Any]:
        async def go() -> None:
            await self._backend().terminate(session_id)

        return await self._run(go)

    async def list_sessions(self, ids: list[str]) -> dict[str, Any]:
        """The sessions among ``ids`` that this node's backend has (others on the node are not ours)."""

        async def go() -> list[dict[str, Any]]:
            wanted = set(ids)
            out = []
            for session in await self._backend().list_sessions():
                if session.id in wanted:
                    out.append(session.to_json())
            return out

        return await self._run(go)

    async def network_log(self, session_id: str, limit: int | None) -> dict[str, Any]:
        return await self._run(lambda: self._backend().network_log(session_id, limit))

    async def shutdown(self) -> None:
        """Release the node backend (used by tests and ``stockade ray``; sessions stay)."""
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.aclose()


# Options through a dict: Ray's type stubs know only some of ray.remote's keywords.
_OPTIONS: dict[str, Any] = {
    "num_cpus": 0,
    "max_restarts": 0,
    "max_concurrency": 10_000,
    "concurrency_groups": {"control": 4},
}
NodeAgent: Any = ray.remote(**_OPTIONS)(_NodeAgent)
