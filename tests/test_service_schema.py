"""A schemathesis run against the service's own OpenAPI document, in-process: generated valid and invalid
requests for every operation; no 5xx, and every answer (status, content type, headers, body) is one the
document declares; requests without the token get 401; schema-violating requests are refused.

One check is left out: ``positive_data_acceptance`` (schema-valid data must be accepted). The document states
types and shapes, but not every rule the models enforce (host patterns, mount targets, whether a host path
exists), so a schema-valid request can rightly get 400.

The service runs over :class:`MemoryDouble`, a test-only backend that keeps sessions in memory and runs
nothing (exec echoes its argv): the run is about the HTTP layer (parsing, validation, error mapping, shapes),
and generated specs must not turn into real sandboxes mounting arbitrary host paths.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")

from hypothesis import HealthCheck, settings  # noqa: E402

from stockade.backend import SandboxBackend  # noqa: E402
from stockade.errors import SessionNotFound, Unsupported  # noqa: E402
from stockade.models import (  # noqa: E402
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
)
from stockade.service.app import create_app  # noqa: E402
from stockade.service.auth import TokenSource  # noqa: E402
from stockade.service.wire import ServiceLimits  # noqa: E402


class MemoryDouble(SandboxBackend):
    """TEST ONLY: sessions are dict entries; nothing is confined because nothing runs."""

    name = "memory-double"

    def __init__(self) -> None:
        self.sessions: dict[str, SandboxSession] = {}

    def capabilities(self) -> SandboxCapabilities:
        return SandboxCapabilities(snapshot=True, resume=True, network_deny_all=True, exec_streaming=True,
                                   persistent_sessions=True)

    def _get(self, session_id: str) -> SandboxSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.refuse_gaps(spec)
        if not spec.network_policy.denies_all:
            raise Unsupported(self.name, "network_policy")
        session_id = spec.session_id or secrets.token_hex(16)
        if session_id in self.sessions:
            from stockade.errors import InvalidRequest

            raise InvalidRequest("already exists", field="session_id")
        session = SandboxSession(id=session_id, backend=self.name, state=SandboxState.RUNNING)
        self.sessions[session_id] = session
        return session

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        self._get(session_id)
        raise Unsupported(self.name, "attach_filesystem")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        session = self._get(session_id)
        if not policy.denies_all:
            raise Unsupported(self.name, "apply_network_policy")
        return session

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        self._get(session_id)
        return ExecResult(stdout=" ".join(request.argv), exit_code=0, duration_ms=0.0)

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        self._get(session_id)
        return SandboxSnapshot(session_id=session_id, backend=self.name, snapshot_id=f"{session_id}-snap")

    async def resume(self, session_id: str) -> SandboxSession:
        return self._get(session_id)

    async def terminate(self, session_id: str) -> None:
        self._get(session_id)
        del self.sessions[session_id]

    async def list_sessions(self) -> list[SandboxSession]:
        return list(self.sessions.values())

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._get(session_id)
        return [{"decision": "deny", "name": "example.com", "port": 443}][:limit]


_backend = MemoryDouble()
_TOKEN = secrets.token_urlsafe(32)
app = create_app(_backend, token=TokenSource(token=_TOKEN),
                 limits=ServiceLimits(max_sessions=50, max_body_bytes=1 << 20, exec_timeout_ceiling=60))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()  # type: ignore[untyped-decorator]  # schemathesis ships no types for it
@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api(case: Any) -> None:
    if len(_backend.sessions) > 40:
        _backend.sessions.clear()  # keep the session limit from answering everything with 429
    # A real session id half of the time, so the operations get past the lookup too (positive cases only: a
    # negative case's invalid id must stay invalid).
    positive = case.meta is None or not case.meta.generation.mode.is_negative
    if "session_id" in (case.path_parameters or {}) and positive and secrets.randbelow(2) == 0:
        made = secrets.token_hex(8)
        _backend.sessions[made] = SandboxSession(id=made, backend=_backend.name, state=SandboxState.RUNNING)
        case.path_parameters["session_id"] = made
    # With the token; schemathesis's own auth checks also send the request without it and expect 401.
    case.call_and_validate(headers={"Authorization": f"Bearer {_TOKEN}"},
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
