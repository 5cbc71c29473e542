"""What a backend does so that cancelling its caller leaves nothing behind: no session that nobody holds, no
session claimed for termination and never ended.

anyio's cancellation waits for a worker thread (``anyio.to_thread.run_sync``) and lands at the caller's next
checkpoint, and its shielded scopes hold it off. asyncio's own cancellation (``task.cancel()``,
``asyncio.wait_for``, ``asyncio.timeout``, Ray cancelling an actor task) does neither: it raises at once, while
a worker thread goes on, and it goes through anyio's shields. So a multi-step operation that must not stop half
way runs either as one worker-thread call (which then always runs to its end) or through :func:`run_to_end`;
and a provision runs through :func:`provision_in_thread`, which ends a session built for a caller that left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ..errors import LifecycleError
from ..models import SandboxSession

__all__ = ["provision_in_thread", "run_to_end"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_RUNNING: set[asyncio.Task[Any]] = set()  # held, so that the loop cannot drop a task the caller left


async def provision_in_thread(
    build: Callable[[], SandboxSession], discard: Callable[[str], object]
) -> SandboxSession:
    """``build()`` in a worker thread. If the caller stops waiting before the session is handed over,
    ``discard(session_id)`` ends it: in the worker thread once the build is over, or here if it already was."""
    lock = threading.Lock()
    handed: list[SandboxSession] = []
    gave_up = threading.Event()

    def run() -> SandboxSession:
        session = build()
        with lock:
            if not gave_up.is_set():
                handed.append(session)
                return session
        _discard(discard, session.id)
        raise LifecycleError(f"the caller stopped waiting for session {session.id!r}; it was ended")  # unseen

    try:
        return await anyio.to_thread.run_sync(run)
    except BaseException:
        with lock:
            gave_up.set()
            orphan = handed[0] if handed else None
        if orphan is not None:  # built just before the caller was cancelled: the thread already handed it over
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_discard, discard, orphan.id)
        raise


def _discard(discard: Callable[[str], object], session_id: str) -> None:
    try:
        discard(session_id)
    except Exception:  # nobody is waiting for this answer: say it where an operator looks
        log.exception("could not end session %s, whose provision was cancelled", session_id)


async def run_to_end(operation: Callable[[], Awaitable[_T]]) -> _T:
    """``await operation()``, which goes on to its end even if the caller is cancelled (the caller then sees its
    cancellation at once, and the operation finishes on its own). For steps that must not stop half way, such
    as a terminate that has claimed its session."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio): its cancellation is anyio's, which a shield holds off
        with anyio.CancelScope(shield=True):
            return await operation()

    async def call() -> _T:
        return await operation()

    task = asyncio.ensure_future(call())
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return await asyncio.shield(task)
