"""A blocking facade over the async contract, for scripts and the CLI.

``with stockade.sync.open_backend("bwrap") as backend: backend.exec(...)``. Each facade runs one event loop in
a daemon thread (an anyio blocking portal) and forwards calls to it; the methods and their errors are those of
:class:`~stockade.backend.SandboxBackend`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from .backend import SandboxBackend, SpecGap
from .models import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
)
from .registry import open_backend as _open_async

__all__ = ["SyncBackend", "open_backend"]

_T = TypeVar("_T")


def _start_loop_thread() -> tuple[BlockingPortal, threading.Thread]:
    # Not anyio.from_thread.start_blocking_portal: its worker thread is joined at interpreter exit, so a
    # script that forgets close() would hang forever. A daemon thread lets it exit (sessions outlive it).
    ready: queue.Queue[BlockingPortal | BaseException] = queue.Queue()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            ready.put(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve)
        except BaseException as exc:  # reported to the thread that waits on `ready`
            ready.put(exc)

    thread = threading.Thread(target=run, name="stockade-sync", daemon=True)
    thread.start()
    item = ready.get()
    if isinstance(item, BaseException):
        raise item
    return item, thread


class SyncBackend:
    """Blocking twin of a :class:`SandboxBackend`; close it (or use ``with``) to stop its loop thread."""

    def __init__(self, backend: SandboxBackend) -> None:
        self._backend = backend
        self._portal: BlockingPortal | None
        self._portal, self._thread = _start_loop_thread()

    def _call(self, func: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        if self._portal is None:
            raise RuntimeError("this SyncBackend is closed")
        return self._portal.call(func, *args)

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def backend(self) -> SandboxBackend:
        """The async backend underneath."""
        return self._backend

    def capabilities(self) -> SandboxCapabilities:
        return self._backend.capabilities()

    def check(self, spec: SandboxSpec) -> list[SpecGap]:
        return self._backend.check(spec)

    def provision(self, spec: SandboxSpec | None = None) -> SandboxSession:
        return self._call(self._backend.provision, spec or SandboxSpec())

    def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        return self._call(self._backend.attach_filesystem, session_id, mount)

    def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        return self._call(self._backend.apply_network_policy, session_id, policy)

    def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return self._call(self._backend.exec, session_id, request)

    def snapshot(self, session_id: str) -> SandboxSnapshot:
        return self._call(self._backend.snapshot, session_id)

    def resume(self, session_id: str) -> SandboxSession:
        return self._call(self._backend.resume, session_id)

    def terminate(self, session_id: str) -> None:
        self._call(self._backend.terminate, session_id)

    def get_session(self, session_id: str) -> SandboxSession:
        return self._call(self._backend.get_session, session_id)

    def list_sessions(self) -> list[SandboxSession]:
        return self._call(self._backend.list_sessions)

    def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self._call(self._backend.network_log, session_id, limit)

    def close(self) -> None:
        """Close the backend and stop the loop thread. Sessions stay."""
        portal = self._portal
        if portal is None:
            return
        try:
            portal.call(self._backend.aclose)
        finally:
            self._portal = None
            portal.call(portal.stop)
            self._thread.join()

    def __enter__(self) -> SyncBackend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_backend(name: str | None = None, /, **options: Any) -> SyncBackend:
    """Blocking twin of :func:`stockade.open_backend`."""
    return SyncBackend(_open_async(name, **options))
