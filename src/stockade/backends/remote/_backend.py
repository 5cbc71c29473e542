"""The ``remote`` backend: a :class:`SandboxBackend` that is an HTTP client of ``stockade serve``.

Where it differs from the contract's documentation (``stockade.backend``):

- ``capabilities()`` are the service's backend's, fetched once (on ``async with`` or the first call) and cached.
- Sessions and snapshots say ``backend="remote"``; the service's own backend is in
  ``metadata["remote_backend"]``.
- Errors arrive as the service sent them (``error_from_json``); a service that cannot be reached, or that
  refuses the token, is :class:`BackendUnavailable`.
- Extra methods, as the service offers them: ``info()``, ``list_snapshots()``, ``read_file()``,
  ``write_file()``, ``list_files()``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ...backend import ExecChunk, SandboxBackend
from ...errors import BackendUnavailable, ExecError, InvalidRequest, LifecycleError, SandboxError, error_from_json
from ...models import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    validate_session_id,
)

__all__ = ["RemoteBackend", "probe"]

_UNIX_BASE = "http://stockade.local"
# Long execs and streams have no read deadline of their own (the exec's timeout bounds them on the service).
_EXEC_TIMEOUT = httpx.Timeout(30.0, read=None)
_DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)


def probe() -> str | None:
    """The remote backend needs only httpx, which importing this module proved."""
    return None


def _parse_url(url: str | None, unix: str | None) -> tuple[str, str | None]:
    """(base URL, unix socket path or None) from ``url`` (http[s]://host:port or unix:///path) or ``unix``."""
    if url and unix:
        raise InvalidRequest("give either url or unix, not both", field="url")
    if unix:
        return _UNIX_BASE, unix
    if not url:
        raise InvalidRequest("the remote backend needs url='http://host:port' or 'unix:///path' (or unix=PATH); "
                             "STOCKADE_URL can hold it", field="url")
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise InvalidRequest(f"a unix URL needs an absolute socket path (got {url!r})", field="url")
        return _UNIX_BASE, path
    if parts.scheme in ("http", "https") and parts.netloc:
        return url.rstrip("/"), None
    raise InvalidRequest(f"must be http://host:port, https://host:port or unix:///path (got {url!r})", field="url")


class RemoteBackend(SandboxBackend):
    """Options: ``url`` (``http://host:port`` or ``unix:///path``; default ``$STOCKADE_URL``, else the local
    service's default socket, see ``stockade.service.paths``), ``unix`` (a socket path instead of ``url``),
    ``token`` (default ``$STOCKADE_TOKEN``), ``transport`` (an httpx transport, e.g.
    ``httpx.ASGITransport(app)`` to talk to an in-process service)."""

    name = "remote"
    default_candidate = False

    def __init__(
        self,
        url: str | None = None,
        *,
        unix: str | os.PathLike[str] | None = None,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if transport is not None and url is None and unix is None:
            base, socket_path, self.url = _UNIX_BASE, None, "asgi"
        else:
            if url is None and unix is None:
                url = os.environ.get("STOCKADE_URL") or None
                if url is None:  # the local service at its documented default socket
                    from ...service.paths import default_socket_path

                    unix = default_socket_path()
            base, socket_path = _parse_url(url, os.fspath(unix) if unix is not None else None)
            self.url = f"unix://{socket_path}" if socket_path is not None else base
        token = token if token is not None else (os.environ.get("STOCKADE_TOKEN") or None)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._base = base
        self._socket_path = socket_path
        self._external_transport = transport
        self._client: httpx.AsyncClient | None = None
        self._caps: SandboxCapabilities | None = None

    # ------------------------------------------------------------------------------------------ transport

    def _transport(self) -> httpx.AsyncBaseTransport | None:
        if self._external_transport is not None:
            return self._external_transport
        if self._socket_path is not None:
            return httpx.AsyncHTTPTransport(uds=self._socket_path)
        return None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self._base, headers=self._headers, timeout=_DEFAULT_TIMEOUT,
                                             transport=self._transport())
        return self._client

    def _unreachable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(self.name, f"cannot reach the service at {self.url}: {exc or type(exc).__name__}")

    async def _request(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
                       params: dict[str, Any] | None = None, limits: httpx.Timeout | None = None) -> httpx.Response:
        try:
            response = await self.client.request(
                method, path, json=json_body, content=content, params=params,
                timeout=limits if limits is not None else _DEFAULT_TIMEOUT,
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content)
        return response

    def _error(self, status: int, body: bytes) -> SandboxError:
        if status == 401:
            return BackendUnavailable(self.name, f"the service at {self.url} refused the token (HTTP 401); "
                                                 "pass token= or set STOCKADE_TOKEN")
        try:
            detail = json.loads(body)["error"]
            if not isinstance(detail, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return SandboxError(f"the service answered HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        return error_from_json(detail)

    @staticmethod
    def _sid(session_id: str) -> str:
        # Checked here too: an id with '/' or '?' must not turn into another URL.
        return quote(validate_session_id(session_id), safe="")

    # -------------------------------------------------------------------------------------------- values

    def _session(self, data: Any) -> SandboxSession:
        session = SandboxSession.parse(data)
        metadata = {**session.metadata, "remote_backend": session.backend}
        return session.model_copy(update={"backend": self.name, "metadata": metadata})

    def _snapshot(self, data: Any) -> SandboxSnapshot:
        snap = SandboxSnapshot.parse(data)
        metadata = {**snap.metadata, "remote_backend": snap.backend}
        return snap.model_copy(update={"backend": self.name, "metadata": metadata})

    # ------------------------------------------------------------------------------------------- contract

    async def refresh(self) -> SandboxCapabilities:
        """Fetch (again) the service's capabilities."""
        response = await self._request("GET", "/v1/capabilities")
        self._caps = SandboxCapabilities.parse(response.json())
        return self._caps

    def capabilities(self) -> SandboxCapabilities:
        if self._caps is not None:
            return self._caps
        if self._external_transport is not None:
            raise LifecycleError("the remote backend has not fetched its capabilities yet: use it with "
                                 "'async with' or await backend.refresh() first")
        # A synchronous fetch, once: the contract makes capabilities() synchronous.
        try:
            with httpx.Client(base_url=self._base, headers=self._headers, timeout=30.0,
                              transport=httpx.HTTPTransport(uds=self._socket_path) if self._socket_path else None
                              ) as client:
                response = client.get("/v1/capabilities")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content)
        self._caps = SandboxCapabilities.parse(response.json())
        return self._caps

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        response = await self._request("POST", "/v1/sessions", json_body=spec.to_json(), limits=_EXEC_TIMEOUT)
        return self._session(response.json())

    async def get_session(self, session_id: str) -> SandboxSession:
        response = await self._request("GET", f"/v1/sessions/{self._sid(session_id)}")
        return self._session(response.json())

    async def list_sessions(self) -> list[SandboxSession]:
        response = await self._request("GET", "/v1/sessions")
        return [self._session(s) for s in response.json()["sessions"]]

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        response = await self._request("POST", f"/v1/sessions/{self._sid(session_id)}/mounts",
                                       json_body=mount.to_json())
        return self._session(response.json())

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        response = await self._request("PUT", f"/v1/sessions/{self._sid(session_id)}/network-policy",
                                       json_body=policy.to_json())
        return self._session(response.json())

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        response = await self._request("POST", f"/v1/sessions/{self._sid(session_id)}/exec",
                                       json_body=request.to_json(), limits=_EXEC_TIMEOUT)
        return ExecResult.parse(response.json())

    async def exec_stream(self, session_id: str, request: ExecRequest) -> AsyncIterator[ExecChunk | ExecResult]:
        from ...service.wire import decode_frame

        path = f"/v1/sessions/{self._sid(session_id)}/exec/stream"
        try:
            async with self.client.stream("POST", path, json=request.to_json(), timeout=_EXEC_TIMEOUT) as response:
                if response.status_code >= 400:
                    raise self._error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        frame = decode_frame(json.loads(line))
                    except (ValueError, InvalidRequest) as exc:
                        raise ExecError(f"the service sent a malformed stream frame: {exc}") from exc
                    if isinstance(frame, SandboxError):
                        raise frame
                    yield frame
                    if isinstance(frame, ExecResult):
                        return
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise ExecError("the service ended the output stream without a result")

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        response = await self._request("POST", f"/v1/sessions/{self._sid(session_id)}/snapshot",
                                       limits=_EXEC_TIMEOUT)
        return self._snapshot(response.json())

    async def resume(self, session_id: str) -> SandboxSession:
        response = await self._request("POST", f"/v1/sessions/{self._sid(session_id)}/resume",
                                       limits=_EXEC_TIMEOUT)
        return self._session(response.json())

    async def terminate(self, session_id: str) -> None:
        await self._request("DELETE", f"/v1/sessions/{self._sid(session_id)}", limits=_EXEC_TIMEOUT)

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        params = {"limit": limit} if limit is not None else None
        response = await self._request("GET", f"/v1/sessions/{self._sid(session_id)}/network-log", params=params)
        entries: list[dict[str, Any]] = response.json()["entries"]
        return entries

    # ----------------------------------------------------------------------------------------- extensions

    async def info(self) -> dict[str, Any]:
        """The service's backend name, version and limits."""
        response = await self._request("GET", "/v1/info")
        data: dict[str, Any] = response.json()
        return data

    async def list_snapshots(self, session_id: str | None = None) -> list[SandboxSnapshot]:
        """The snapshots taken through the service (optionally of one session)."""
        params = {"session_id": session_id} if session_id is not None else None
        response = await self._request("GET", "/v1/snapshots", params=params)
        return [self._snapshot(s) for s in response.json()["snapshots"]]

    async def read_file(self, session_id: str, path: str, *, max_bytes: int | None = None) -> bytes:
        """The content of ``path`` as the session sees it (the service's file limit applies)."""
        response = await self._request("GET", f"/v1/sessions/{self._sid(session_id)}/files/content",
                                       params={"path": path}, limits=_EXEC_TIMEOUT)
        data = response.content
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidRequest(f"{path} is larger than the {max_bytes} bytes allowed", field="path")
        return data

    async def write_file(self, session_id: str, path: str, data: bytes, *, max_bytes: int | None = None) -> int:
        """Write ``data`` to ``path`` in the session; returns the size written."""
        response = await self._request("PUT", f"/v1/sessions/{self._sid(session_id)}/files/content",
                                       params={"path": path}, content=data, limits=_EXEC_TIMEOUT)
        return int(response.json()["size"])

    async def list_files(self, session_id: str, path: str) -> list[Any]:
        """The entries of directory ``path`` in the session (``stockade.service.wire.FileEntry``)."""
        from ...service.wire import FileList

        response = await self._request("GET", f"/v1/sessions/{self._sid(session_id)}/files/list",
                                       params={"path": path}, limits=_EXEC_TIMEOUT)
        return list(FileList.model_validate(response.json()).entries)

    # ---------------------------------------------------------------------------------------------- close

    async def __aenter__(self) -> RemoteBackend:
        await self.refresh()
        return self

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
