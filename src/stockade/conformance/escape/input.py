"""Invalid input at every entry point: raw session ids through the Python API (path traversal into the
backend's state), the CLI's flags, and the HTTP service (bad specs, bad ids, bad exec requests, file paths that
lead out of the session). Every refusal is a typed error or a 4xx, nothing is provisioned, nothing runs, and
no host path outside the backend's own appears.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ...errors import InvalidRequest, SandboxError, SessionNotFound, Unsupported
from ...models import ExecRequest, FilesystemMount, NetworkPolicy
from ..context import CaseContext, Finding, case, conforms, escaped, not_measured, probe_broken
from ._support import canary_dir

__all__: list[str] = []


def _bad_ids(marker: Path) -> list[str]:
    traversal = "../" * 12 + str(marker).lstrip("/")
    return ["", ".", "..", traversal, "../" + marker.name, "a/b", "x\n", "x\0y", "-rf", "a" * 200, "/etc",
            "..%2f..", " leading"]


async def _drain(iterator: Any) -> None:
    async for _item in iterator:
        pass


@case("escape.input.session_ids")
async def session_ids(ctx: CaseContext) -> Finding:
    """Malformed session ids (empty, '.', '..', traversals to a host path, '/', newline, NUL, 200 characters)
    given to every operation raise InvalidRequest or SessionNotFound, and nothing appears at the path a
    traversal named."""
    marker = Path("/var/tmp") / f"stockade-escape-id-{secrets.token_hex(6)}"
    ctx.on_cleanup(lambda: _remove(marker))
    backend = ctx.backend
    mount = FilesystemMount(source=str(ctx.host_dir()), target="/mnt/escape-id")
    ops: dict[str, Callable[[str], Awaitable[Any]]] = {
        "exec": lambda sid: backend.exec(sid, ExecRequest(command="true")),
        "exec_stream": lambda sid: _drain(backend.exec_stream(sid, ExecRequest(command="true"))),
        "terminate": backend.terminate,
        "snapshot": backend.snapshot,
        "resume": backend.resume,
        "get_session": backend.get_session,
        "attach_filesystem": lambda sid: backend.attach_filesystem(sid, mount),
        "apply_network_policy": lambda sid: backend.apply_network_policy(sid, NetworkPolicy.deny_all()),
    }
    accepted, untyped = [], []
    for sid in _bad_ids(marker):
        for name, op in ops.items():
            ctx.calls += 1
            try:
                await op(sid)
            except (InvalidRequest, SessionNotFound, Unsupported):
                continue
            except Exception as exc:  # any other type breaks "bad input -> typed error"
                untyped.append(f"{name}({sid!r}): {type(exc).__name__}: {str(exc)[:80]}")
                continue
            accepted.append(f"{name}({sid!r})")
    if marker.exists() or accepted:
        return escaped(f"malformed ids accepted: {accepted}; traversal target created: {marker.exists()}")
    if untyped:
        return probe_broken(f"malformed ids raised untyped errors (the contract wants InvalidRequest or "
                            f"SessionNotFound): {untyped[:6]}")
    return conforms(f"{len(_bad_ids(marker))} malformed ids x {len(ops)} operations: all refused with typed errors")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _cli_cases(directory: Path) -> list[list[str]]:
    return [
        ["--ro", "relative/dir:/mnt/x"],
        ["--ro", f"{directory}:relative"],
        ["--ro", f"{directory}:/proc/x"],
        ["--rw", f"{directory}:/mnt/../etc"],
        ["--ro", f"{directory}:/"],
        ["--ro", f"{directory}/missing:/mnt/x"],
        ["--allow-host", "*"],
        ["--allow-host", "*.com"],
        ["--allow-host", "https://example.com"],
        ["--allow-host", "a..b"],
        ["--memory", "0"],
        ["--memory", "-1M"],
        ["--timeout", "0s"],
        ["--pids", "0"],
        ["--env", "1BAD=x"],
    ]


def _cli_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``stockade.cli.main(argv)`` with its output captured (in a worker thread: a wrongly accepted flag
    would start the command with its own event loop)."""
    from ... import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main(argv)
    return code, out.getvalue(), err.getvalue()


@case("escape.input.cli")
async def cli(ctx: CaseContext) -> Finding:
    """``stockade run`` with each invalid flag value (relative or kernel-filesystem mount paths, '..', '/',
    missing sources, host patterns like '*' and URLs, zero or negative limits, bad env names) exits 125 with a
    one-line error and never runs the command."""
    from ... import registry

    try:
        registry.backend_class(ctx.backend.name)
    except SandboxError as exc:
        return not_measured(f"the CLI cannot select backend {ctx.backend.name!r} by name ({exc})")
    directory = ctx.host_dir()
    ran = "stockade-ran-" + secrets.token_hex(6)
    failures: list[str] = []
    cases = _cli_cases(directory)
    for flags in cases:
        argv = ["run", "--backend", ctx.backend.name, *flags, "--", "echo", ran]
        ctx.calls += 1
        code, out, err = await anyio.to_thread.run_sync(_cli_in_process, argv)
        if ran in out or code != 125 or "stockade:" not in err or "internal error" in err:
            failures.append(f"{flags}: exit {code}, ran={ran in out}, stderr {err.strip()[-120:]!r}")
    ran_any = [f for f in failures if "ran=True" in f]
    if ran_any:
        return escaped(f"invalid flags ran the command anyway: {ran_any}")
    if failures:
        return probe_broken(f"invalid flags not refused with exit 125 and a message: {failures}")
    return conforms(f"{len(cases)} invalid flag values: exit 125, nothing ran")


_BAD_SPECS: list[dict[str, Any]] = [
    {"mounts": [{"source": "", "target": "../x"}]},
    {"mounts": [{"source": "", "target": "/proc/x"}]},
    {"mounts": [{"source": "", "target": "relative"}]},
    {"mounts": [{"source": "relative", "target": "/mnt/x"}]},
    {"mounts": [{"source": "", "target": "/"}]},
    {"network_policy": {"mode": "limited", "allowed_hosts": ["*"]}},
    {"network_policy": {"mode": "limited", "allowed_hosts": ["*.com"]}},
    {"network_policy": {"mode": "limited", "allowed_hosts": ["https://x.test"]}},
    {"network_policy": {"mode": "bogus"}},
    {"network_policy": {"mode": "limited", "allowed_host": ["x.test"]}},
    {"limits": {"memory_mb": -1}},
    {"limits": {"wall_time": -5}},
    {"session_id": "../../escape"},
    {"env": {"1BAD": "x"}},
    {"labels": {"": "x"}},
]

_BAD_EXECS: list[dict[str, Any]] = [
    {"command": ""},
    {"command": "true", "args": "not-a-list"},
    {"command": "true", "env": {"BAD KEY": "x"}},
    {"command": "true", "timeout": -1},
    {"command": "true", "cwd": "/tmp\u0000x"},
    {"command": "true", "bogus": 1},
]


async def _listed(client: Any) -> set[str] | None:
    response = await client.get("/v1/sessions")
    if response.status_code != 200:
        return None  # a backend without list_sessions: provisioning is then judged by status codes alone
    return {s["id"] for s in response.json().get("sessions", [])}


@case("escape.input.http")
async def http(ctx: CaseContext) -> Finding:
    """The HTTP service over this backend answers invalid specs, ids and exec requests with a 4xx (never 2xx,
    never 5xx), provisions nothing for them, and its file API does not read a host file named by its host path,
    through /proc/1/root, or with '..'."""
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("httpx") is None:
        return not_measured("the HTTP service needs starlette and httpx: pip install 'stockade[service]'")
    import httpx

    from ...service.app import create_app

    _d, victim, content = canary_dir(ctx)
    app = create_app(ctx.backend)
    transport = httpx.ASGITransport(app=app)
    problems: list[str] = []
    async with ctx.session() as session, httpx.AsyncClient(transport=transport, base_url="http://stockade") as client:
        ctx.calls += 1
        before = await _listed(client)

        def judge(what: str, response: httpx.Response) -> None:
            if not 400 <= response.status_code < 500:
                problems.append(f"{what}: {response.status_code} {response.text[:100]!r}")

        for spec in _BAD_SPECS:
            judge(f"provision {spec}", await client.post("/v1/sessions", json=spec))
        for bad_id in ("..", "..%2F..%2Fetc", "%2e%2e", "a%00b", "x" * 100):
            judge(f"get {bad_id}", await client.get(f"/v1/sessions/{bad_id}"))
            judge(f"exec {bad_id}", await client.post(f"/v1/sessions/{bad_id}/exec", json={"command": "true"}))
        for body in _BAD_EXECS:
            judge(f"exec {body}", await client.post(f"/v1/sessions/{session.id}/exec", json=body))
        for path in (str(victim), f"/proc/1/root{victim}", f"/tmp/../..{victim}", f"/proc/self/root{victim}"):
            response = await client.get(f"/v1/sessions/{session.id}/files/content", params={"path": path})
            if content in response.text:
                return escaped(f"the file API returned the host canary for path={path!r}")
        after = await _listed(client)
    ctx.calls += 40
    created = sorted(after - before) if before is not None and after is not None else []
    if created:
        return escaped(f"invalid requests provisioned sessions: {created}")
    if problems:
        return probe_broken(f"invalid requests not answered with a 4xx: {problems[:6]}")
    return conforms(f"{len(_BAD_SPECS)} bad specs, 10 bad id requests, {len(_BAD_EXECS)} bad exec bodies: all 4xx; "
                    "the file API never returned the host canary")
