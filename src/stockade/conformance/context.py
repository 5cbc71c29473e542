"""What a case works with: verdict helpers, the case registry, options, and :class:`CaseContext`, which talks
to the backend, provisions and always terminates sessions, and owns the host-side canaries of one case.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from ..backend import SandboxBackend
from ..errors import SessionNotFound, Unsupported
from ..models import (
    ExecRequest,
    ExecResult,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
)
from .canaries import HostListener
from .report import Verdict

__all__ = [
    "CaseContext",
    "CaseDef",
    "ConformanceOptions",
    "Finding",
    "GuestTools",
    "OptInSuite",
    "Stop",
    "case",
    "conforms",
    "escaped",
    "missing_capabilities",
    "not_applicable",
    "not_measured",
    "opt_in_suite",
    "opt_in_suites",
    "overrefused",
    "probe_broken",
    "registered_cases",
    "show",
]

DEFAULT_EXEC_TIMEOUT = 30.0
CLEANUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ConformanceOptions:
    """What to run and how.

    ``suites``: top-level prefixes to run (``"lifecycle"``, ``"exec"``, ``"filesystem"``, ``"env"``,
    ``"network"``, ``"limits"``); None runs all of those. Opt-in suites (``"escape"``, alias ``"escapes"``)
    run only when named; a dotted prefix (``"escape.fs"``) selects part of a suite. ``case_filter``:
    substring an id must contain. ``timeout``:
    seconds per case. ``upstream_name`` / ``upstream_address``: a name the backend resolves to a test listener
    and that listener's address (e.g. ``"127.0.0.2"``); without them the egress cases that need an upstream
    report ``not_measured``.
    """

    suites: tuple[str, ...] | None = None
    case_filter: str | None = None
    timeout: float = 60.0
    upstream_name: str | None = None
    upstream_address: str | None = None


# ------------------------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Finding:
    """A case's conclusion before the engine times and records it."""

    verdict: Verdict
    detail: str


def conforms(detail: str) -> Finding:
    return Finding(Verdict.CONFORMS, detail)


def escaped(detail: str) -> Finding:
    return Finding(Verdict.ESCAPED, detail)


def overrefused(detail: str) -> Finding:
    return Finding(Verdict.OVERREFUSED, detail)


def not_measured(detail: str) -> Finding:
    return Finding(Verdict.NOT_MEASURED, detail)


def not_applicable(detail: str) -> Finding:
    return Finding(Verdict.NOT_APPLICABLE, detail)


def probe_broken(detail: str) -> Finding:
    return Finding(Verdict.PROBE_BROKEN, detail)


class Stop(Exception):
    """Raised anywhere inside a case to end it with ``finding`` (helpers use it to bail out early)."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"{finding.verdict.value}: {finding.detail}")
        self.finding = finding


def show(result: ExecResult, limit: int = 300) -> str:
    """A short, single-line description of an exec result for details."""

    def cut(text: str) -> str:
        text = text.strip()
        return repr(text if len(text) <= limit else text[:limit] + "...")

    parts = [f"exit={result.exit_code}"]
    if result.timed_out:
        parts.append("timed_out")
    if result.oom_killed:
        parts.append("oom_killed")
    parts.append(f"stdout={cut(result.stdout)}")
    parts.append(f"stderr={cut(result.stderr)}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------ registry

CaseFn = Callable[["CaseContext"], Awaitable[Finding]]


@dataclass(frozen=True)
class CaseDef:
    id: str
    fn: CaseFn
    doc: str


_CASES: dict[str, CaseDef] = {}


def case(case_id: str) -> Callable[[CaseFn], CaseFn]:
    """Register ``fn`` as the case ``case_id`` (dotted: ``suite.name``)."""
    parts = case_id.split(".")
    if len(parts) < 2 or not all(p and p.replace("_", "").isalnum() and p.islower() for p in parts):
        raise ValueError(f"case id must be dotted lowercase words: {case_id!r}")

    def register(fn: CaseFn) -> CaseFn:
        if case_id in _CASES:
            raise ValueError(f"case {case_id!r} registered twice")
        _CASES[case_id] = CaseDef(case_id, fn, (fn.__doc__ or "").strip())
        return fn

    return register


def registered_cases() -> list[CaseDef]:
    return list(_CASES.values())


@dataclass(frozen=True)
class OptInSuite:
    """A suite that runs only when named (``ConformanceOptions.suites``), never by default: its cases attack
    the backend, take longer, and are reported apart (``stockade doctor --suite escape``)."""

    name: str
    doc: str
    aliases: tuple[str, ...] = ()


_OPT_IN: dict[str, OptInSuite] = {}


def opt_in_suite(name: str, doc: str, aliases: tuple[str, ...] = ()) -> None:
    """Declare the top-level suite ``name`` opt-in; ``aliases`` select it too."""
    if name in _OPT_IN:
        raise ValueError(f"suite {name!r} declared twice")
    _OPT_IN[name] = OptInSuite(name, doc, aliases)


def opt_in_suites() -> list[OptInSuite]:
    return list(_OPT_IN.values())


# ----------------------------------------------------------------------------------------- expectations


def missing_capabilities(caps: SandboxCapabilities, spec: SandboxSpec) -> list[str]:
    """Capability flags ``spec`` needs that ``caps`` lacks: with any, provisioning must raise Unsupported.

    Derived here from the flags rather than from ``backend.check()``, because the suite must not take the
    backend's word for what its own flags imply.
    """
    needed: list[str] = []
    policy = spec.network_policy
    if policy.denies_all:
        needed.append("network_deny_all")
    elif policy.mode == "limited":
        needed.append("network_policy")
    else:
        needed.append("network_unrestricted")
    limits = spec.limits
    if limits.memory_mb is not None:
        needed.append("memory_limit")
    if limits.pids_max is not None:
        needed.append("pids_limit")
    if limits.cpu_count is not None:
        needed.append("cpu_limit")
    if limits.idle_timeout is not None:
        needed.append("suspend_on_idle")
    if spec.from_snapshot is not None:
        needed.append("snapshot")
    if spec.mounts:
        needed.append("filesystem_isolation")
    return [flag for flag in needed if not getattr(caps, flag)]


@dataclass(frozen=True)
class GuestTools:
    """What a probe found in the guest: whether a shell ran at all, and which interpreters exist."""

    alive: bool
    python3: bool
    bash: bool

    @property
    def tcp_client(self) -> str | None:
        return "python3" if self.python3 else "bash" if self.bash else None


# Markers are assembled at run time in the guest so that a backend echoing its command line cannot fake them.
# "Connected" means the host listener's greeting came back: a gateway that accepts locally (a transparent
# proxy) and then refuses must not count as a connection.
_PY_CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)\n"
    "    s.settimeout(8)\n"
    "    greeting = s.recv(64)\n"
    "except OSError as e:\n"
    "    print('stockade-not-connected', e)\n"
    "else:\n"
    "    if greeting.startswith(b'stockade-canary'):\n"
    "        print('stockade-conn' + 'ected')\n"
    "    else:\n"
    "        print('stockade-not-connected: accepted, then closed without the listener greeting', greeting)\n"
    "    s.close()\n"
)
_BASH_CONNECT = (
    'exec 3<>"/dev/tcp/$1/$2" && read -r -t 8 line <&3 && [ "$line" = stockade-canary ] '
    '&& echo "stockade-conn""ected"'
)
CONNECTED_MARKER = "stockade-connected"


@dataclass
class CaseContext:
    """Everything one case touches. The engine calls :meth:`cleanup` after the case, whatever happened."""

    backend: SandboxBackend
    options: ConformanceOptions
    case_id: str
    calls: int = 0
    """Backend operations performed: a case that made none cannot have measured anything."""
    live: dict[str, None] = field(default_factory=dict)
    _caps: SandboxCapabilities | None = None
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------- backend

    @property
    def caps(self) -> SandboxCapabilities:
        if self._caps is None:
            self._caps = self.backend.capabilities()
        return self._caps

    def mount_path(self, session: SandboxSession, target: str) -> str:
        """Where the guest finds the mount at ``target``: the target itself in a private filesystem view; on a
        backend without one (``private_filesystem_view`` false), which grants the source in place, the
        ``host_path`` the session reports for it."""
        if self.caps.private_filesystem_view:
            return target
        for mount in session.mounts:
            if mount.target == target and mount.host_path:
                return mount.host_path
        raise Stop(overrefused(
            f"the backend has no private filesystem view, and session {session.id} reports no host_path for its "
            f"mount at {target}: there is no path at which the guest could reach it"
        ))

    def base_network(self) -> NetworkPolicy:
        """The narrowest network policy the backend claims to enforce, for cases not about the network."""
        if self.caps.network_deny_all or not self.caps.network_unrestricted:
            return NetworkPolicy.deny_all()
        return NetworkPolicy.unrestricted()

    def spec(self, **fields: Any) -> SandboxSpec:
        """A spec for this case: ``fields`` plus the base network policy unless one is given."""
        fields.setdefault("network_policy", self.base_network())
        fields.setdefault("labels", {"stockade.conformance": self.case_id})
        return SandboxSpec(**fields)

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        """Provision and track ``spec``. ``Unsupported`` for a spec the capabilities admit ends the case as
        overrefused; for one they do not admit it propagates (the caller expected it)."""
        self.calls += 1
        try:
            session = await self.backend.provision(spec)
        except Unsupported as exc:
            if not missing_capabilities(self.caps, spec):
                raise Stop(overrefused(f"provision refused a spec its capabilities admit: {exc}")) from exc
            raise
        self.live[session.id] = None
        return session

    @contextlib.asynccontextmanager
    async def session(self, spec: SandboxSpec | None = None, **fields: Any) -> AsyncIterator[SandboxSession]:
        """Provision a session for the block, terminate it afterwards (the engine retries if that fails)."""
        session = await self.provision(spec if spec is not None else self.spec(**fields))
        try:
            yield session
        finally:
            if session.id in self.live:
                with contextlib.suppress(Exception):
                    await self.terminate(session.id)

    async def terminate(self, session_id: str) -> None:
        self.calls += 1
        await self.backend.terminate(session_id)
        self.live.pop(session_id, None)

    async def exec(
        self,
        session_id: str,
        command: str,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        # Forwarded as the request's own timeout, which the backend must enforce: that is under test here.
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,  # noqa: ASYNC109
    ) -> ExecResult:
        self.calls += 1
        request = ExecRequest(
            command=command,
            args=args,
            cwd=cwd,
            env=env or {},
            stdin=stdin,
            timeout=None if timeout is None else timedelta(seconds=timeout),
        )
        return await self.backend.exec(session_id, request)

    async def sh(self, session_id: str, script: str, **kwargs: Any) -> ExecResult:
        """Run ``script`` with ``/bin/sh -c``."""
        return await self.exec(session_id, "/bin/sh", "-c", script, **kwargs)

    async def probe(self, session_id: str, script: str, **kwargs: Any) -> tuple[bool, ExecResult]:
        """Run ``script`` after a liveness marker; returns whether the shell demonstrably ran, and the result.

        A refusal case needs this: "the canary did not show up" means nothing if the guest never ran.
        """
        marker_script, expected = alive_marker()
        result = await self.sh(session_id, f"{marker_script}\n{script}", **kwargs)
        return expected in result.stdout, result

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        self.calls += 1
        return await self.backend.snapshot(session_id)

    async def resume(self, session_id: str) -> SandboxSession:
        self.calls += 1
        return await self.backend.resume(session_id)

    async def list_sessions(self) -> list[SandboxSession]:
        self.calls += 1
        return await self.backend.list_sessions()

    async def expect_unsupported(self, spec: SandboxSpec, what: str) -> Finding:
        """The backend lacks a flag ``spec`` needs: provisioning must raise Unsupported (conforms); a session
        instead means it would run with less confinement than asked for (escaped)."""
        flags = ", ".join(missing_capabilities(self.caps, spec)) or "none"
        try:
            session = await self.provision(spec)
        except Unsupported as exc:
            return conforms(f"capabilities lack {flags}; {what} is refused with Unsupported ({exc})")
        return escaped(
            f"capabilities lack {flags}, yet {what} was provisioned (session {session.id}); "
            "an honest backend raises Unsupported instead of running with less confinement"
        )

    async def guest_tools(self, session_id: str) -> GuestTools:
        alive, result = await self.probe(
            session_id,
            "command -v python3 >/dev/null 2>&1 && echo have-python3\n"
            "command -v bash >/dev/null 2>&1 && echo have-bash\n"
            "true",
        )
        lines = result.stdout.split()
        return GuestTools(alive, "have-python3" in lines, "have-bash" in lines)

    async def tcp_connect(self, session_id: str, tools: GuestTools, host: str, port: int) -> tuple[bool, str]:
        """Try a TCP connection from the guest; returns (connected according to the guest, description)."""
        if tools.python3:
            result = await self.exec(session_id, "python3", "-c", _PY_CONNECT, host, str(port), timeout=20)
        elif tools.bash:
            result = await self.exec(
                session_id, "bash", "-c", _BASH_CONNECT, "bash", host, str(port), timeout=20
            )
        else:
            raise Stop(probe_broken("the guest has neither python3 nor bash, so no TCP client to probe with"))
        return CONNECTED_MARKER in result.stdout, f"{host}:{port} via {tools.tcp_client}: {show(result)}"

    # ------------------------------------------------------------------------------------------ host side

    def host_dir(self, mode: int = 0o755) -> Path:
        """A fresh host directory outside anything a session is given; removed after the case.

        Under /var/tmp when possible: it is not the guest's /tmp on any backend, so a leak cannot be mistaken
        for the guest's own files.
        """
        base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
        path = Path(tempfile.mkdtemp(prefix="stockade-conformance-", dir=base))
        path.chmod(mode)
        self._cleanups.append(lambda: _remove_tree(path))
        return path

    def host_file(self, path: Path, content: str, mode: int = 0o644) -> Path:
        path.write_text(content)
        path.chmod(mode)
        self._cleanups.append(lambda: path.unlink(missing_ok=True))
        return path

    def remove_later(self, path: Path) -> None:
        self._cleanups.append(lambda: path.unlink(missing_ok=True))

    def on_cleanup(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when the case ends, after its sessions are terminated, whatever happened."""
        self._cleanups.append(undo)

    def set_host_env(self, name: str, value: str) -> None:
        """Set a variable in this process (which launches the sandboxes) until the case ends."""
        previous = os.environ.get(name)
        os.environ[name] = value

        def restore() -> None:
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous

        self._cleanups.append(restore)

    def listener(self, address: str, port: int = 0) -> HostListener:
        listener = HostListener(address, port)
        self._cleanups.append(listener.close)
        return listener

    # -------------------------------------------------------------------------------------------- cleanup

    async def cleanup(self) -> list[str]:
        """Terminate every session still live, undo host-side changes; returns what went wrong."""
        problems: list[str] = []
        # Shielded: the case may have been cancelled by its timeout, and its sessions must still go.
        with anyio.CancelScope(shield=True):
            for session_id in list(self.live):
                try:
                    with anyio.fail_after(CLEANUP_TIMEOUT):
                        await self.backend.terminate(session_id)
                except SessionNotFound:
                    problems.append(f"session {session_id} had vanished before cleanup")
                except Exception as exc:
                    problems.append(f"terminate({session_id}) failed: {type(exc).__name__}: {exc}")
                self.live.pop(session_id, None)
        for undo in reversed(self._cleanups):
            try:
                undo()
            except Exception as exc:
                problems.append(f"host cleanup failed: {type(exc).__name__}: {exc}")
        self._cleanups.clear()
        return problems


def alive_marker() -> tuple[str, str]:
    """A shell line whose output proves a shell evaluated it, and that output."""
    a, b = secrets.randbelow(10**6) + 1, secrets.randbelow(10**6) + 1
    return f"echo stockade-alive-$(({a}+{b}))", f"stockade-alive-{a + b}"


def _remove_tree(path: Path) -> None:
    def make_writable(func: Callable[..., Any], target: str, _exc: Any) -> None:
        # A guest may have left read-only entries (chmod probes); make them removable, then retry once.
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
        func(target)

    if path.exists():
        # onerror, not onexc: the latter needs Python 3.12 and we support 3.11.
        shutil.rmtree(path, onerror=make_writable)
