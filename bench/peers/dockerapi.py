"""The few Docker Engine API calls the benchmark makes, over the daemon's unix socket (stdlib only).

These are the raw engine calls a container backend wraps (create, start, exec, delete), without a client
library in between: the floor against which a ``docker`` backend's provision and exec are compared.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

__all__ = ["DockerAPI", "DockerAPIError"]


class DockerAPIError(RuntimeError):
    """The engine answered with an error status."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerAPI:
    """A blocking client of one daemon socket; one kept-alive connection for plain calls."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the decoded JSON answer (None when empty). Retries once on a dropped keep-alive."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            try:
                return self._request(self._conn, method, path, body)
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        return None

    @staticmethod
    def _request(conn: _UnixConnection, method: str, path: str, body: Any) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status >= 400:
            raise DockerAPIError(f"{method} {path}: {response.status} {payload[:300].decode(errors='replace')}")
        return json.loads(payload) if payload.strip() else None

    def ping(self) -> bool:
        try:
            conn = _UnixConnection(self.socket_path, 5.0)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def version(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("GET", "/version")
        return answer

    def run(self, image: str, cmd: list[str] | None = None) -> str:
        """Create and start a container without network; its id."""
        body: dict[str, Any] = {"Image": image, "HostConfig": {"NetworkMode": "none"}}
        if cmd is not None:
            body["Cmd"] = cmd
        created = self.call("POST", "/containers/create", body)
        self.call("POST", f"/containers/{created['Id']}/start")
        return str(created["Id"])

    def exec(self, container: str, argv: list[str]) -> tuple[int, bytes]:
        """Run ``argv`` in the container and wait; (exit code, raw multiplexed output)."""
        made = self.call("POST", f"/containers/{container}/exec",
                         {"Cmd": argv, "AttachStdout": True, "AttachStderr": True})
        # The engine hijacks the connection for the output stream and closes it at the end: its own connection.
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("POST", f"/exec/{made['Id']}/start", body=b'{"Detach": false, "Tty": false}',
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            output = response.read()
            if response.status >= 400:
                raise DockerAPIError(f"exec start: {response.status} {output[:300]!r}")
        finally:
            conn.close()
        info = self.call("GET", f"/exec/{made['Id']}/json")
        return int(info["ExitCode"]), output

    def remove(self, container: str) -> None:
        self.call("DELETE", f"/containers/{container}?force=1")

    def inspect_pid(self, container: str) -> int:
        return int(self.call("GET", f"/containers/{container}/json")["State"]["Pid"])
