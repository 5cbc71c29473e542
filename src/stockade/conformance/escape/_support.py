"""What the escape cases share: gating on capabilities, guest probes written in Python that report JSON, and
the usual host canaries.

A probe that needs the guest's ``python3`` first proves the guest runs at all (a backend that refuses every
command must not pass as "nothing leaked"), then reports ``not_measured`` when the guest has no interpreter:
the attack was not made, so nothing is claimed.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ...errors import SandboxError, Unsupported
from ...models import ExecResult, FilesystemAccess, FilesystemMount, SandboxSession, SandboxSpec
from ..context import (
    CaseContext,
    Stop,
    escaped,
    missing_capabilities,
    not_applicable,
    not_measured,
    overrefused,
    probe_broken,
    show,
)

__all__ = [
    "CANARY_TARGET",
    "RW_TARGET",
    "Respawner",
    "alive_after",
    "canary_dir",
    "gated",
    "mount",
    "mounted_paths",
    "need_python",
    "parse",
    "require",
    "run_py",
    "scratch",
    "source",
    "unconfined",
    "wait_until",
]

CANARY_TARGET = "/mnt/escape"
"""Guest path of the read-only canary mount."""
RW_TARGET = "/mnt/escape-rw"
"""Guest path of the read-write mount."""

# Assembled at run time in the guest, so a backend echoing its command line cannot forge a report.
_MARK = "stockade-escape-result "
_PRELUDE = """\
import json, os, sys
def emit(obj):
    sys.stdout.write("stockade-escape-" + "result " + json.dumps(obj) + "\\n")
    sys.stdout.flush()
TMP = os.environ.get("TMPDIR") or "/tmp"
sys.argv = [arg.replace("%TMP%", TMP) for arg in sys.argv]
def host_root():
    # Capabilities in the host's own user namespace: the probe is not confined at all, and a destructive
    # attempt (mount, pivot_root, filling every mount) would hit the host itself.
    try:
        with open("/proc/self/uid_map") as f:
            identity = f.read().split() == ["0", "0", "4294967295"]
        with open("/proc/self/status") as f:
            cap_eff = [line for line in f if line.startswith("CapEff:")][0].split()[1]
        return identity and int(cap_eff, 16) != 0
    except (OSError, IndexError, ValueError):
        return False
def refuse_if_host_root():
    if host_root():
        emit({"host_root": True})
        sys.exit(0)
"""


async def gated(ctx: CaseContext, spec: SandboxSpec, what: str) -> None:
    """:func:`gate` with the refusal measured: raises ``Stop`` (``not_applicable`` or ``escaped``) when the
    capabilities do not cover ``spec``, returns otherwise."""
    flags = missing_capabilities(ctx.caps, spec)
    if not flags:
        return
    try:
        session = await ctx.provision(spec)
    except Unsupported as exc:
        raise Stop(not_applicable(
            f"unsupported: the backend declares no {', '.join(flags)} and refuses {what} ({exc}); the attack "
            "was not run"
        )) from exc
    raise Stop(escaped(
        f"capabilities lack {', '.join(flags)}, yet {what} was provisioned (session {session.id}): it would "
        "run with less confinement than asked for"
    ))


def require(condition: bool, what: str, result: ExecResult | None = None) -> None:
    """End the case as ``probe_broken`` unless ``condition``: the refusal it was about is unmeasured."""
    if not condition:
        tail = f": {show(result)}" if result is not None else ""
        raise Stop(probe_broken(f"{what}, so the refusal is unmeasured{tail}"))


async def alive_after(ctx: CaseContext, session_id: str, what: str) -> None:
    """End the case as ``overrefused`` when the session can no longer run a command after ``what``: a refused
    or failed operation must not take the session down."""
    try:
        result = await ctx.sh(session_id, "echo stockade-still-""alive")
    except SandboxError as exc:
        raise Stop(overrefused(f"the session stopped working after {what}: {type(exc).__name__}: {exc}")) from exc
    if "stockade-still-alive" not in result.stdout:
        raise Stop(overrefused(f"the session stopped running commands after {what}: {show(result)}"))


@dataclass
class Respawner:
    """Runs many exec attempts that are expected to fail to start (bad cwds) on a session that is replaced
    when one of them takes it down, so that a fragile backend still gets every attempt measured. How often
    that happened is reported (``deaths``); ``escape.life.failed_start_keeps_session`` judges it."""

    ctx: CaseContext
    spec: SandboxSpec
    session_id: str
    deaths: int = 0

    async def attempt(self, script: str, cwd: str) -> ExecResult | None:
        """The result, or None when the exec could not start (or the session died and was replaced)."""
        try:
            return await self.ctx.sh(self.session_id, script, cwd=cwd, timeout=None)
        except SandboxError:
            pass
        try:
            alive = "stockade-alive" in (await self.ctx.sh(self.session_id, "echo stockade-alive")).stdout
        except SandboxError:
            alive = False
        if not alive:
            self.deaths += 1
            with contextlib.suppress(SandboxError):
                await self.ctx.terminate(self.session_id)
            self.session_id = (await self.ctx.provision(self.spec)).id
        return None

    def note(self) -> str:
        return f"; the session died {self.deaths} times after a refused cwd" if self.deaths else ""


async def need_python(ctx: CaseContext, session_id: str) -> None:
    tools = await ctx.guest_tools(session_id)
    if not tools.alive:
        raise Stop(probe_broken("the guest did not run a trivial shell command, so nothing was measured"))
    if not tools.python3:
        raise Stop(not_measured("the guest has no python3 to run this probe with; the attack was not made"))


async def run_py(
    ctx: CaseContext,
    session_id: str,
    body: str,
    *args: str,
    timeout: float = 30,  # noqa: ASYNC109 - the request's own timeout, enforced by the backend
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[dict[str, Any], ExecResult]:
    """Run ``body`` (which calls ``emit(obj)`` once) with the guest's python3; returns the emitted object.

    A run that emitted nothing ends the case as ``probe_broken``.
    """
    result = await ctx.exec(
        session_id, "python3", "-I", "-c", _PRELUDE + body, *args, timeout=timeout, stdin=stdin, env=env, cwd=cwd
    )
    found = parse(result)
    if found is None:
        raise Stop(probe_broken(f"the guest probe reported nothing: {show(result)}"))
    return found, result


def unconfined(found: dict[str, Any]) -> None:
    """End the case as ``escaped`` when the probe reported it runs as root with capabilities in the host's
    user namespace (``refuse_if_host_root()`` in the guest): the destructive part was then not attempted."""
    if found.get("host_root"):
        raise Stop(escaped("the guest runs as root with capabilities in the host's own user namespace (it is not "
                           "confined at all); the destructive attempts were skipped for the host's sake"))


def scratch(ctx: CaseContext) -> str:
    """A unique path for a probe's own files, as ``%TMP%/stockade-escape-<random>``: probes given it as an
    argument see ``%TMP%`` replaced by the guest's ``$TMPDIR`` (else /tmp). Should a backend turn out to share
    the host's /tmp, the same name is removed from there after the case."""
    name = f"stockade-escape-{secrets.token_hex(6)}"
    ctx.on_cleanup(lambda: _remove_host_path(Path("/tmp") / name))
    return f"%TMP%/{name}"


def _remove_host_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:  # files, symlinks, and the unix sockets and fifos a probe made there
        path.unlink(missing_ok=True)


def source(body: str) -> str:
    """``body`` with the prelude that defines ``emit``: for probes run with ``ctx.exec`` directly (when a
    missing report is itself the expected outcome, e.g. an OOM kill)."""
    return _PRELUDE + body


def parse(result: ExecResult) -> dict[str, Any] | None:
    """The last object a probe emitted, or None."""
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                value = json.loads(line[len(_MARK):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


class _Paths(dict[str, str]):
    def __missing__(self, target: str) -> str:
        return target  # a mount the session does not report: look for it where the spec put it


async def mounted_paths(ctx: CaseContext, session: SandboxSession) -> dict[str, str]:
    """Where the guest finds each of the session's mounts: its ``target``, or, on a backend without a private
    filesystem view (``private_filesystem_view`` false: it grants the source in place), the ``host_path`` the
    session reports for it (see :meth:`CaseContext.mount_path`)."""
    if ctx.caps.private_filesystem_view:
        return _Paths()
    return _Paths({m.target: m.host_path for m in session.mounts if m.host_path})


def canary_dir(ctx: CaseContext, writable: bool = False) -> tuple[Path, Path, str]:
    """A fresh host directory holding ``canary.txt`` with random content: (directory, file, content).

    Permissions are wide open on purpose: only the sandbox, not host permissions, may stand in the guest's way
    (the guest may run under another uid).
    """
    directory = ctx.host_dir(0o777 if writable else 0o755)
    content = "canary-" + secrets.token_hex(12)
    file = ctx.host_file(directory / "canary.txt", content, 0o666 if writable else 0o644)
    return directory, file, content


def mount(source: Path, target: str, writable: bool = False) -> FilesystemMount:
    access = FilesystemAccess.READ_WRITE if writable else FilesystemAccess.READ_ONLY
    return FilesystemMount(source=str(source), target=target, access=access)


async def wait_until(check: Callable[[], bool], seconds: float, step: float = 0.05) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass; returns its last value. A grace period for the kernel
    to finish a kill or a reap, never a timing assertion."""
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(step)
