"""A blocking provision run in a worker thread, so that no way of cancelling its caller leaves a session behind.

anyio's cancellation waits for the worker thread: the session is handed to the caller, and the cancellation
lands at the caller's next checkpoint (the caller owns the session and ends it). asyncio's own cancellation
(``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``, Ray cancelling an actor task) raises at once while
the thread goes on building a session that nobody will ever be handed; that session is ended here instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..errors import LifecycleError
from ..models import SandboxSession

__all__ = ["provision_in_thread"]

log = logging.getLogger(__name__)


async def provision_in_thread(
    build: Callable[[], SandboxSession], discard: Callable[[str], None]
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


def _discard(discard: Callable[[str], None], session_id: str) -> None:
    try:
        discard(session_id)
    except Exception:  # nobody is waiting for this answer: say it where an operator looks
        log.exception("could not end session %s, whose provision was cancelled", session_id)
