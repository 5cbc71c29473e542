"""The contract every backend implements, documented once here (backends document only where they differ).

The eight operations are those of harn-hostlib's ``SandboxBackend`` trait; the rest (``list_sessions``,
``get_session``, ``exec_stream``, ``network_log``, ``check``) are stockade extensions with default
implementations that either derive from the eight or raise :class:`~stockade.errors.Unsupported`.

Blocking work never runs on the event loop: backends push it to a worker thread (``anyio.to_thread``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from .errors import SessionNotFound, Unsupported
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

__all__ = ["ExecChunk", "SandboxBackend", "SpecGap"]


@dataclass(frozen=True)
class ExecChunk:
    """A piece of output of a streaming exec."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class SpecGap:
    """Something in a spec that a backend would not enforce (see :meth:`SandboxBackend.check`)."""

    field: str
    capability: str
    message: str


class SandboxBackend(abc.ABC):
    """An enforcement backend: makes a :class:`SandboxSpec` real and runs commands under it.

    One instance manages many sessions. Use it as an async context manager (``async with``) so that
    :meth:`aclose` runs; sessions are *not* terminated by closing the backend (they outlive their caller where
    ``capabilities().persistent_sessions`` is true).

    Every method that takes a ``session_id`` raises :class:`SessionNotFound` for an unknown or terminated id.
    """

    name: str = "abstract"
    """Stable backend name, shown in ``SandboxSession.backend``."""

    default_candidate: bool = True
    """False for backends that need options to be useful (a service URL, a cluster address): they are never
    chosen as the default backend, nor run by ``stockade doctor`` without ``--backend``."""

    # ---------------------------------------------------------------------------------------- harn's eight

    @abc.abstractmethod
    def capabilities(self) -> SandboxCapabilities:
        """What this backend enforces on this host.

        Honest: a false flag means the operation raises Unsupported.
        """

    @abc.abstractmethod
    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        """Create a session enforcing ``spec`` and return it in state ``running``.

        Mints an unguessable id when ``spec.session_id`` is absent. Never leaves half a session behind: on any
        failure everything already created is removed before the error propagates.

        Cancelled, it never leaves a session that nobody holds: either the session is handed over anyway (anyio's
        cancellation lands at the caller's next checkpoint, and the caller ends what it was handed) or the
        backend ends it, possibly just after the cancellation returned (asyncio's own cancellation, as
        ``asyncio.wait_for`` uses, does not wait for work already under way in a thread or on another host).

        Raises:
            Unsupported: the spec asks for something this backend cannot enforce (e.g. a host allowlist
                without ``network_policy``, a memory limit without ``memory_limit``).
            InvalidRequest: a mount source does not exist, is a symlink, or the session id is taken.
            LifecycleError: the sandbox failed to start.
        """

    @abc.abstractmethod
    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        """Make ``mount`` visible in the running session without restarting it.

        Raises:
            SessionNotFound, Unsupported (no ``live_mounts``), InvalidRequest (bad source, target taken).
        """

    @abc.abstractmethod
    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        """Replace the session's egress policy. New connections follow it at once; open connections it forbids
        are closed.

        Raises:
            SessionNotFound, Unsupported (policy kind not enforceable here), NetworkPolicyError.
        """

    @abc.abstractmethod
    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        """Run one command and wait for it. A non-zero exit is data (``exit_code``), not an error.

        ``timed_out`` is true when ``request.timeout`` (or the spec's ``limits.wall_time``) fired; the whole
        process tree of that exec is then gone. Captured output is bounded; ``truncated`` says when it was
        cut.
        An exec on a ``suspended`` session resumes it first.

        Raises:
            SessionNotFound, ExecError (the command could not be started, e.g. not found), LifecycleError.
        """

    @abc.abstractmethod
    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        """Capture the session's writable state so that a new session can start from it
        (``SandboxSpec.from_snapshot``). Snapshots outlive the session.

        Raises:
            SessionNotFound, Unsupported (no ``snapshot``).
        """

    @abc.abstractmethod
    async def resume(self, session_id: str) -> SandboxSession:
        """Bring a ``suspended`` session back to ``running``; a running session is returned as is.

        Raises:
            SessionNotFound, Unsupported (no ``resume``), LifecycleError.
        """

    @abc.abstractmethod
    async def terminate(self, session_id: str) -> None:
        """Remove everything the session owned: processes (orphans and daemons too), mounts, namespaces,
        cgroups, network plumbing, temporary files. Snapshots are kept.

        Cancelled, it has either not yet claimed the session (which is untouched: a retry ends it) or goes on
        to its end on its own; never a session claimed for termination but left running.

        Raises:
            SessionNotFound: unknown id, or already terminated (a second terminate raises).
        """

    # ------------------------------------------------------------------------------------------- extensions

    async def get_session(self, session_id: str) -> SandboxSession:
        """The current view of one session. Raises SessionNotFound."""
        for session in await self.list_sessions():
            if session.id == session_id:
                return session
        raise SessionNotFound(session_id)

    async def list_sessions(self) -> list[SandboxSession]:
        """Every live session this backend can find (including those created by other processes)."""
        raise Unsupported(self.name, "list_sessions")

    async def exec_stream(
        self, session_id: str, request: ExecRequest
    ) -> AsyncIterator[ExecChunk | ExecResult]:
        """Run one command, yielding output chunks as they arrive and the :class:`ExecResult` last.

        The default runs :meth:`exec` and yields its output at the end; backends with ``exec_streaming``
        stream.
        """
        result = await self.exec(session_id, request)
        if result.stdout:
            yield ExecChunk("stdout", result.stdout.encode())
        if result.stderr:
            yield ExecChunk("stderr", result.stderr.encode())
        yield result

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The egress gateway's decisions for this session, oldest first (one dict per JSON log line)."""
        raise Unsupported(self.name, "network_log")

    def check(self, spec: SandboxSpec) -> list[SpecGap]:
        """What this backend would not enforce of ``spec`` on this host (empty: everything is enforced).

        ``provision`` refuses a spec with gaps; callers use this to decide beforehand, or to weaken the spec
        explicitly.
        """
        caps = self.capabilities()
        gaps: list[SpecGap] = []

        def need(flag: str, field: str, what: str) -> None:
            if not getattr(caps, flag):
                gaps.append(SpecGap(field, flag, f"{self.name} cannot enforce {what}"))

        policy = spec.network_policy
        if policy.denies_all:
            need("network_deny_all", "network_policy", "a deny-all network policy")
        elif policy.mode == "limited":
            need("network_policy", "network_policy.allowed_hosts", "a per-host egress allowlist")
        else:
            need("network_unrestricted", "network_policy", "unrestricted network access")
        limits = spec.limits
        if limits.memory_mb is not None:
            need("memory_limit", "limits.memory_mb", "a memory limit")
        if limits.pids_max is not None:
            need("pids_limit", "limits.pids_max", "a process-count limit")
        if limits.cpu_count is not None:
            need("cpu_limit", "limits.cpu_count", "a CPU limit")
        if limits.idle_timeout is not None:
            need("suspend_on_idle", "limits.idle_timeout", "suspend on idle")
        if spec.from_snapshot is not None:
            need("snapshot", "from_snapshot", "restoring from a snapshot")
        if spec.mounts:
            need("filesystem_isolation", "mounts", "mounts scoped to a private filesystem view")
        return gaps

    def refuse_gaps(self, spec: SandboxSpec) -> None:
        """Raise :class:`Unsupported` for the first gap :meth:`check` finds (used by ``provision``)."""
        gaps = self.check(spec)
        if gaps:
            gap = gaps[0]
            raise Unsupported(self.name, gap.field, gap.message)

    async def aclose(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        """Release the backend's own resources (connections, threads). Sessions stay."""

    async def __aenter__(self) -> SandboxBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
