"""The ASGI application: the whole contract under ``/v1``, in the harn wire shapes.

``create_app(backend)`` returns a Starlette application; :mod:`.server` serves it with uvicorn. Every route is
declared once in :data:`OPERATIONS`, which the router and the OpenAPI document (:mod:`.openapi`) both read.

The service holds no session state of its own: every answer comes from the backend, which keeps its sessions
on disk (``persistent_sessions``), so a restarted service finds every live session again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import anyio
import anyio.lowlevel
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..backend import SandboxBackend
from ..errors import ExecError, InvalidRequest, SandboxError, SessionNotFound, Unsupported
from ..models import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    ResourceLimits,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    validate_session_id,
)
from . import files
from .auth import TokenSource
from .journal import SnapshotJournal
from .openapi import Operation, QueryParam, build_openapi
from .wire import (
    FileList,
    FileWritten,
    Health,
    Info,
    LimitExceeded,
    NetworkLog,
    PayloadTooLarge,
    ServiceLimits,
    SessionList,
    SnapshotList,
    Unauthorized,
    encode_frame,
    error_body,
    status_for,
)

__all__ = ["OPERATIONS", "create_app"]

log = logging.getLogger("stockade.service")

PUBLIC_PATHS = frozenset({"/v1/health", "/openapi.json", "/v1/openapi.json"})
MAX_LOG_LIMIT = 100_000


class _Service:
    """What the handlers share: the backend, the limits and the snapshot journal."""

    def __init__(self, backend: SandboxBackend, limits: ServiceLimits, journal: SnapshotJournal,
                 token: TokenSource | None) -> None:
        self.backend = backend
        self.limits = limits
        self.journal = journal
        self.token = token
        self.provision_lock = anyio.Lock()
        self.provisioning = 0
        self.openapi: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------- helpers


def _json_response(model: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(model.to_json() if hasattr(model, "to_json") else model.model_dump(mode="json"),
                        status_code=status)


def error_response(error: SandboxError) -> JSONResponse:
    status = status_for(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(error), status_code=status, headers=headers)


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        raise InvalidRequest("a JSON object is required", field="body")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        # Also keeps a JSON *string* from being parsed a second time as JSON text by Model.parse.
        raise InvalidRequest(f"must be a JSON object, not {type(data).__name__}", field="body")
    return data


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], data: dict[str, Any]) -> _M:
    """``model.parse(data)``, but a boolean field must get a JSON boolean: the models coerce 0, "yes" and the
    like (lax mode), which over HTTP would accept a wrong type as a decision."""
    _check_bools(model, data, "")
    return model.parse(data)  # type: ignore[attr-defined,no-any-return]


def _check_bools(model: type[BaseModel], data: Any, prefix: str) -> None:
    if not isinstance(data, dict):
        return
    for name, info in model.model_fields.items():
        if name not in data:
            continue
        value, where = data[name], f"{prefix}{name}"
        annotation = info.annotation
        if annotation is bool and not isinstance(value, bool):
            raise InvalidRequest("must be true or false", field=where)
        for arg in (annotation, *get_args(annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                if isinstance(value, list):
                    for index, item in enumerate(value):
                        _check_bools(arg, item, f"{where}.{index}.")
                else:
                    _check_bools(arg, value, f"{where}.")


def _session_id(request: Request) -> str:
    return validate_session_id(request.path_params["session_id"], "session_id")


def _query(request: Request, name: str, *, required: bool = False) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidRequest("must be given once", field=name)
    if not values:
        if required:
            raise InvalidRequest("is required", field=name)
        return None
    return values[0]


def _query_int(request: Request, name: str, low: int, high: int) -> int | None:
    text = _query(request, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"must be a whole number (got {text[:50]!r})", field=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"must be between {low} and {high}", field=name)
    return value


def _check_exec(svc: _Service, request: ExecRequest) -> None:
    ceiling = svc.limits.exec_timeout_ceiling
    if ceiling is not None and request.timeout is not None and request.timeout.total_seconds() > ceiling:
        raise InvalidRequest(f"must be at most {ceiling:g} s on this service", field="timeout")


def _check_mount_source(svc: _Service, mount: FilesystemMount, field: str) -> None:
    roots = svc.limits.mount_roots
    if roots is None or not mount.source:
        return
    real = os.path.realpath(mount.source)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return
    raise InvalidRequest(
        f"{mount.source!r} is outside the directories this service may mount ({', '.join(roots)})", field=field
    )


# -------------------------------------------------------------------------------------------- handlers

Handler = Callable[[_Service, Request], Awaitable[Response]]


async def health(svc: _Service, request: Request) -> Response:
    return _json_response(Health())


async def info(svc: _Service, request: Request) -> Response:
    return _json_response(Info(backend=svc.backend.name, version=__version__, limits=svc.limits.to_json(),
                               auth="token" if svc.token is not None else "socket"))


async def openapi(svc: _Service, request: Request) -> Response:
    if svc.openapi is None:
        svc.openapi = build_openapi(OPERATIONS)
    return JSONResponse(svc.openapi)


async def capabilities(svc: _Service, request: Request) -> Response:
    return _json_response(svc.backend.capabilities())


async def list_sessions(svc: _Service, request: Request) -> Response:
    return _json_response(SessionList(sessions=await svc.backend.list_sessions()))


async def provision(svc: _Service, request: Request) -> Response:
    spec = _parse(SandboxSpec, await _json_object(request))
    for index, mount in enumerate(spec.mounts):
        _check_mount_source(svc, mount, f"mounts.{index}.source")
    ceiling = svc.limits.exec_timeout_ceiling
    if ceiling is not None:
        wall = spec.limits.wall_time
        if wall is None:
            limits = ResourceLimits.parse({**spec.limits.to_json(), "wall_time": ceiling})
            spec = spec.model_copy(update={"limits": limits})
        elif wall.total_seconds() > ceiling:
            raise InvalidRequest(f"must be at most {ceiling:g} s on this service", field="limits.wall_time")
    if spec.session_id is None:
        # Minted here, whatever the backend would do: 128 bits from the OS CSPRNG.
        spec = spec.model_copy(update={"session_id": secrets.token_hex(16)})
    session: SandboxSession | None = None
    try:
        async with _session_slot(svc):
            session = await svc.backend.provision(spec)
        # The caller may have gone while the backend worked (its client cancelled or timed out: a disconnect,
        # or a cancellation of this request). Nobody would ever be handed the session then, so it is ended
        # here, rather than left running, owned by no one. The checkpoint delivers a pending cancellation and
        # lets the server take in a disconnect.
        await anyio.lowlevel.checkpoint()
        gone = await request.is_disconnected()
    except BaseException:
        if session is not None:
            await _end_unclaimed(svc, session.id)
        raise
    if gone:
        await _end_unclaimed(svc, session.id)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return _json_response(session, 201)


async def _end_unclaimed(svc: _Service, session_id: str) -> None:
    log.info("ending session %s: its caller went away before provision answered", session_id)
    with anyio.CancelScope(shield=True), contextlib.suppress(SessionNotFound):
        await svc.backend.terminate(session_id)


@contextlib.asynccontextmanager
async def _session_slot(svc: _Service) -> AsyncIterator[None]:
    maximum = svc.limits.max_sessions
    if maximum is None:
        yield
        return
    async with svc.provision_lock:
        try:
            live = len(await svc.backend.list_sessions())
        except Unsupported:
            raise Unsupported(svc.backend.name, "max_sessions",
                              "the backend cannot list its sessions, so the limit cannot be kept") from None
        if live + svc.provisioning >= maximum:
            raise LimitExceeded(f"this service allows at most {maximum} sessions; terminate one first")
        svc.provisioning += 1
    try:
        yield
    finally:
        svc.provisioning -= 1


async def get_session(svc: _Service, request: Request) -> Response:
    return _json_response(await svc.backend.get_session(_session_id(request)))


async def terminate(svc: _Service, request: Request) -> Response:
    await svc.backend.terminate(_session_id(request))
    return Response(status_code=204)


async def attach_mount(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    mount = _parse(FilesystemMount, await _json_object(request))
    _check_mount_source(svc, mount, "source")
    return _json_response(await svc.backend.attach_filesystem(session_id, mount))


async def network_policy(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    policy = _parse(NetworkPolicy, await _json_object(request))
    return _json_response(await svc.backend.apply_network_policy(session_id, policy))


async def exec_(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    exec_request = _parse(ExecRequest, await _json_object(request))
    _check_exec(svc, exec_request)
    return _json_response(await svc.backend.exec(session_id, exec_request))


def _ndjson(item: Any) -> bytes:
    return (json.dumps(encode_frame(item)) + "\n").encode()


async def exec_stream(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    exec_request = _parse(ExecRequest, await _json_object(request))
    _check_exec(svc, exec_request)
    stream = svc.backend.exec_stream(session_id, exec_request)
    # The first item is awaited before answering, so that an unknown session or a command that cannot start
    # gets its own status rather than a 200 with an error frame.
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise ExecError(f"backend {svc.backend.name} ended the output stream without a result") from None
    except BaseException:
        await _close(stream)
        raise

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield _ndjson(first)
            if isinstance(first, ExecResult):
                return
            async for item in stream:
                yield _ndjson(item)
        except SandboxError as exc:
            yield _ndjson(exc)
        except Exception:
            log.exception("exec stream of session %s failed", session_id)
            yield _ndjson(SandboxError("internal error of the service (see its log)"))
        finally:
            await _close(stream)

    return StreamingResponse(frames(), media_type="application/x-ndjson")


async def _close(stream: Any) -> None:
    # Closing the backend's generator ends the command when the client went away (bwrap's agent kills an exec
    # whose caller disconnected); shielded, because it runs while the request is being cancelled.
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def snapshot(svc: _Service, request: Request) -> Response:
    snap = await svc.backend.snapshot(_session_id(request))
    svc.journal.add(snap)
    return _json_response(snap, 201)


async def list_snapshots(svc: _Service, request: Request) -> Response:
    session_id = _query(request, "session_id")
    if session_id is not None:
        validate_session_id(session_id, "session_id")
    return _json_response(SnapshotList(snapshots=svc.journal.list(session_id)))


async def resume(svc: _Service, request: Request) -> Response:
    return _json_response(await svc.backend.resume(_session_id(request)))


async def network_log(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    limit = _query_int(request, "limit", 1, MAX_LOG_LIMIT)
    return _json_response(NetworkLog(entries=await svc.backend.network_log(session_id, limit)))


async def read_file(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    path = files.validate_guest_path(_query(request, "path", required=True))
    data = await files.read_file(svc.backend, session_id, path, max_bytes=svc.limits.max_file_bytes)
    return Response(data, media_type="application/octet-stream")


async def write_file(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    path = files.validate_guest_path(_query(request, "path", required=True))
    data = await request.body()
    size = await files.write_file(svc.backend, session_id, path, data, max_bytes=svc.limits.max_file_bytes)
    return _json_response(FileWritten(path=path, size=size), 201)


async def list_files(svc: _Service, request: Request) -> Response:
    session_id = _session_id(request)
    path = files.validate_guest_path(_query(request, "path", required=True), allow_root=True)
    return _json_response(FileList(path=path, entries=await files.list_files(svc.backend, session_id, path)))


# ------------------------------------------------------------------------------------------ route table

_SESSION = "/v1/sessions/{session_id}"
_PATH_Q = QueryParam("path", {"type": "string", "minLength": 1}, required=True,
                     description="absolute path inside the session (no '.' or '..' components)")

OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/v1/health", "health", health, "Liveness (no token needed)",
              response=Health, public=True),
    Operation("GET", "/v1/info", "info", info, "The backend's name, the version and the service's limits",
              response=Info),
    Operation("GET", "/v1/capabilities", "capabilities", capabilities,
              "What the backend enforces on this host", response=SandboxCapabilities),
    Operation("GET", "/v1/sessions", "list_sessions", list_sessions, "Every live session of the backend",
              response=SessionList, errors=(422,)),
    Operation("POST", "/v1/sessions", "provision", provision, "Provision a session enforcing a spec",
              body=SandboxSpec, response=SandboxSession, status=201,
              errors=(400, 409, 422, 429, 502, 503)),
    Operation("GET", _SESSION, "get_session", get_session, "One session", response=SandboxSession,
              errors=(400, 404, 422)),
    Operation("DELETE", _SESSION, "terminate", terminate,
              "Terminate a session and remove all it owned (snapshots stay)", response=None, status=204,
              errors=(400, 404, 409)),
    Operation("POST", f"{_SESSION}/mounts", "attach_filesystem", attach_mount,
              "Make a mount visible in the running session", body=FilesystemMount, response=SandboxSession,
              errors=(400, 404, 409, 422)),
    Operation("PUT", f"{_SESSION}/network-policy", "apply_network_policy", network_policy,
              "Replace the session's egress policy", body=NetworkPolicy, response=SandboxSession,
              errors=(400, 404, 409, 422, 502)),
    Operation("POST", f"{_SESSION}/exec", "exec", exec_, "Run one command and wait for its result",
              body=ExecRequest, response=ExecResult, errors=(400, 404, 409, 422)),
    Operation("POST", f"{_SESSION}/exec/stream", "exec_stream", exec_stream,
              "Run one command, streaming its output as NDJSON frames, the result last",
              body=ExecRequest, response="ndjson", errors=(400, 404, 409, 422)),
    Operation("POST", f"{_SESSION}/snapshot", "snapshot", snapshot,
              "Capture the session's writable state", response=SandboxSnapshot, status=201,
              errors=(400, 404, 409, 422)),
    Operation("POST", f"{_SESSION}/resume", "resume", resume, "Bring a suspended session back to running",
              response=SandboxSession, errors=(400, 404, 409, 422)),
    Operation("GET", f"{_SESSION}/network-log", "network_log", network_log,
              "The egress gateway's decisions for the session, oldest first", response=NetworkLog,
              query=(QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_LIMIT},
                                description="at most this many entries (the newest)"),),
              errors=(400, 404, 422)),
    Operation("GET", "/v1/snapshots", "list_snapshots", list_snapshots,
              "The snapshots taken through this service", response=SnapshotList,
              query=(QueryParam("session_id", {"type": "string"}, description="only this session's"),),
              errors=(400,)),
    Operation("GET", f"{_SESSION}/files/content", "read_file", read_file,
              "Download a regular file as the session sees it", response="bytes", query=(_PATH_Q,),
              errors=(400, 404, 409, 422)),
    Operation("PUT", f"{_SESSION}/files/content", "write_file", write_file,
              "Upload a file into the session (parent directories are created)", body="bytes",
              response=FileWritten, status=201, query=(_PATH_Q,), errors=(400, 404, 409, 422)),
    Operation("GET", f"{_SESSION}/files/list", "list_files", list_files,
              "List a directory as the session sees it", response=FileList, query=(_PATH_Q,),
              errors=(400, 404, 409, 422)),
    Operation("GET", "/openapi.json", "openapi", openapi, "This document", response="openapi", public=True),
)


# ------------------------------------------------------------------------------------------ middleware


async def _send_error(scope: Scope, receive: Receive, send: Send, error: SandboxError) -> None:
    await error_response(error)(scope, receive, send)


class _AuthMiddleware:
    """Every path except :data:`PUBLIC_PATHS` needs the bearer token, checked before anything else runs."""

    def __init__(self, app: ASGIApp, token: TokenSource | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token is not None and scope["path"] not in PUBLIC_PATHS:
            authorization = None
            for key, value in scope.get("headers", ()):
                if key == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            if not self.token.check(authorization):
                # The same answer for a missing, malformed, stale or foreign token: nothing to tell them apart.
                await _send_error(scope, receive, send, Unauthorized("missing or invalid bearer token"))
                return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """Bodies above ``limit`` bytes get 413, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    await _send_error(scope, receive, send, InvalidRequest("Content-Length is not a number"))
                    return
                if announced > self.limit:
                    await _send_error(scope, receive, send, self._too_large())
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than this service accepts ({self.limit} bytes)")


# ------------------------------------------------------------------------------------------------- app


def _dispatch(handlers: dict[str, Handler]) -> Handler:
    async def dispatch(svc: _Service, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](svc, request)

    return dispatch


def _endpoint(svc: _Service, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(svc, request)
        except SandboxError as exc:
            return error_response(exc)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse(
                {"error": {"code": "internal_error", "message": "internal error of the service (see its log)"}},
                status_code=500,
            )

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                        headers=exc.headers)


def create_app(
    backend: SandboxBackend,
    *,
    token: TokenSource | None = None,
    limits: ServiceLimits | None = None,
    state_dir: Path | None = None,
) -> Starlette:
    """The service over ``backend``. ``token``: require this bearer token (None: no token, for a 0600 unix
    socket). ``state_dir``: where the snapshot journal lives (None: in memory)."""
    limits = limits or ServiceLimits()
    journal = SnapshotJournal(state_dir / "snapshots.jsonl" if state_dir is not None else None)
    svc = _Service(backend, limits, journal, token)
    # One route per path, so that a wrong method gets 405 with every method of that path in Allow.
    by_path: dict[str, dict[str, Handler]] = {}
    for op in OPERATIONS:
        by_path.setdefault(op.path, {})[op.method] = op.handler
    by_path["/v1/openapi.json"] = {"GET": openapi}
    routes = [Route(path, _endpoint(svc, _dispatch(handlers)), methods=list(handlers))
              for path, handlers in by_path.items()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Nothing to restore: the backend keeps its sessions on disk. Listing them once says what came back.
        try:
            found = await backend.list_sessions()
        except Unsupported:
            log.info("backend %s cannot list its sessions", backend.name)
        else:
            log.info("backend %s: %d live session(s) found", backend.name, len(found))
        yield

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.state.stockade = svc
    # Outermost first: the token is checked before the body is read at all.
    app.add_middleware(_BodyLimitMiddleware, limit=limits.max_body_bytes)
    app.add_middleware(_AuthMiddleware, token=token)
    return app
