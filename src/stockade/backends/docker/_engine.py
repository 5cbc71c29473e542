"""The one boundary between stockade and the container engine's REST API (docker-py's low-level client).

Every engine failure is translated here into the ``stockade.errors`` tree. All calls block: the backend runs
them in worker threads. Nothing here ever pulls an image: only ``create`` of an image already present is used,
so a missing image is an error that names the build command, never a registry request.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...errors import BackendUnavailable, InvalidRequest, LifecycleError, SandboxError

__all__ = ["Engine", "EngineNotFound", "ExecOutcome", "default_base_url"]


def default_base_url(engine: str = "docker") -> str:
    """``$STOCKADE_DOCKER_HOST``, else ``$DOCKER_HOST``, else the engine's usual socket."""
    if engine == "podman":
        env = os.environ.get("STOCKADE_PODMAN_HOST") or os.environ.get("CONTAINER_HOST")
        return env or "unix:///run/podman/podman.sock"
    return os.environ.get("STOCKADE_DOCKER_HOST") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


_MAX_CONNECTIONS = 64
"""Connections kept open to the engine (more are opened when needed, and closed after use)."""


def _share_unix_pool(client: Any) -> None:
    """Give ``client`` one connection pool for its unix socket, instead of docker-py's one per request URL.

    docker-py's ``UnixHTTPAdapter`` keys its pools by URL (every exec has URLs of its own) in an LRU of
    ``num_pools`` entries, and closes the pool it evicts even while another thread is still reading a response
    through it: with 20 concurrent execs that ended in ``AttributeError: 'NoneType' object has no attribute
    'qsize'`` from urllib3 (seen under gVisor, whose execs are slow enough to overlap). Every URL names the same
    socket, so one pool serves them all and nothing is evicted.
    """
    from docker.transport.unixconn import UnixHTTPAdapter

    adapter = getattr(client, "_custom_adapter", None)
    if not isinstance(adapter, UnixHTTPAdapter):
        return  # TCP or ssh: requests' own adapter keys its pools by host

    class SharedPoolAdapter(UnixHTTPAdapter):
        def get_connection(self, url: Any, proxies: Any = None) -> Any:
            return super().get_connection("http+docker://localhost", proxies)

    shared = SharedPoolAdapter("http+unix://" + adapter.socket_path, adapter.timeout,
                               max_pool_size=_MAX_CONNECTIONS)
    client.mount("http+docker://", shared)
    client._custom_adapter = shared
    adapter.close()


class EngineNotFound(SandboxError):
    """The engine has no such object (container, image, exec); callers turn it into their own error."""


@contextlib.contextmanager
def _mapped(backend: str, what: str) -> Iterator[None]:
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.NotFound as exc:
        raise EngineNotFound(f"{what}: {exc.explanation or exc}") from exc
    except docker.errors.ImageNotFound as exc:  # pragma: no cover - NotFound above covers it
        raise EngineNotFound(f"{what}: {exc}") from exc
    except docker.errors.APIError as exc:
        raise LifecycleError(f"{backend}: {what} failed: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise BackendUnavailable(backend, f"cannot reach the engine ({what}): {exc}") from exc
    except docker.errors.DockerException as exc:
        raise LifecycleError(f"{backend}: {what} failed: {exc}") from exc


@dataclass
class ExecOutcome:
    """What one exec produced (bytes, capped per stream)."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    start_error: str | None = None
    pid: int = 0


class Engine:
    """A thin, typed view of the engine API that stockade uses."""

    def __init__(self, base_url: str, backend: str = "docker", timeout: float = 120.0) -> None:
        self.base_url = base_url
        self.backend = backend
        self.timeout = timeout
        self._client: Any = None

    @property
    def api(self) -> Any:
        if self._client is None:
            try:
                import docker
            except ImportError as exc:
                raise BackendUnavailable(
                    self.backend, "the Python package 'docker' is missing; pip install 'stockade[docker]'"
                ) from exc
            with _mapped(self.backend, "connect"):
                # A fixed API version: "auto" would cost a round trip per client, and 1.41 is what both
                # Docker 20.10 and Podman 4's compatibility API speak.
                client = docker.APIClient(base_url=self.base_url, version="1.41", timeout=int(self.timeout),
                                          max_pool_size=_MAX_CONNECTIONS)
                _share_unix_pool(client)
                self._client = client
        return self._client

    def is_local(self) -> bool:
        """Whether the engine runs on this host (a unix socket), so its processes are ours to see."""
        return self.base_url.startswith(("unix://", "http+unix://"))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` with the engine's errors mapped; ``EngineNotFound`` for a missing object."""
        with _mapped(self.backend, what):
            return fn(*args, **kwargs)

    # --------------------------------------------------------------------------------------- daemon

    def ping(self) -> None:
        self.call("ping", self.api.ping)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.call("info", self.api.info)
        return info

    def image_exists(self, image: str) -> bool:
        try:
            self.call("inspect image", self.api.inspect_image, image)
        except EngineNotFound:
            return False
        return True

    # ------------------------------------------------------------------------------------ containers

    def create(self, name: str, config: dict[str, Any]) -> str:
        api = self.api
        with _mapped(self.backend, "create container"):
            url = api._url("/containers/create")  # docker-py's create_container cannot take a raw HostConfig
            res = api._post_json(url, data=config, params={"name": name})
            if res.status_code == 409:
                raise InvalidRequest(f"a container named {name!r} already exists", field="session_id")
            if res.status_code == 404:
                raise InvalidRequest(
                    f"image {config.get('Image')!r} is not present in the engine (no registry is used); "
                    "build it with: stockade image build",
                    field="image",
                )
            body: dict[str, Any] = api._result(res, True)
        return str(body["Id"])

    def start(self, container: str, checkpoint: str | None = None) -> None:
        api = self.api
        with _mapped(self.backend, "start container"):
            params = {"checkpoint": checkpoint} if checkpoint else None
            res = api._post(api._url("/containers/{0}/start", container), params=params)
            api._raise_for_status(res)

    def inspect(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("inspect container", self.api.inspect_container, container)
        return result

    def remove(self, container: str) -> None:
        with contextlib.suppress(EngineNotFound):
            self.call("remove container", self.api.remove_container, container, v=True, force=True)

    def list_labelled(self, label: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call(
            "list containers", self.api.containers, all=True, filters={"label": label}
        )
        return found

    def pause(self, container: str) -> None:
        self.call("pause", self.api.pause, container)

    def unpause(self, container: str) -> None:
        self.call("unpause", self.api.unpause, container)

    def checkpoint(self, container: str, name: str) -> None:
        """Save the container's memory and stop it (``docker checkpoint create``; gVisor only here)."""
        api = self.api
        with _mapped(self.backend, "checkpoint"):
            res = api._post_json(
                api._url("/containers/{0}/checkpoints", container), data={"CheckpointID": name, "Exit": True}
            )
            api._raise_for_status(res)

    def checkpoint_delete(self, container: str, name: str) -> None:
        """Remove the engine's copy of a checkpoint (a memory image as large as the guest's memory)."""
        api = self.api
        with contextlib.suppress(EngineNotFound), _mapped(self.backend, "delete checkpoint"):
            res = api._delete(api._url("/containers/{0}/checkpoints/{1}", container, name))
            api._raise_for_status(res)

    # ------------------------------------------------------------------------------------------ exec

    def exec_create(self, container: str, argv: list[str], *, env: dict[str, str], cwd: str | None,
                    user: str, stdin: bool) -> str:
        created: dict[str, Any] = self.call(
            "exec create", self.api.exec_create, container, argv, stdin=stdin, environment=env,
            workdir=cwd, user=user,
        )
        return str(created["Id"])

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("exec inspect", self.api.exec_inspect, exec_id)
        return result

    def _exec_info(self, exec_id: str) -> dict[str, Any]:
        # The engine forgets an exec when its container stops (e.g. gVisor's whole sandbox OOM-killed).
        try:
            return self.exec_inspect(exec_id)
        except EngineNotFound:
            return {"Running": False}

    def exec_run(
        self,
        exec_id: str,
        *,
        stdin: bytes | None,
        deadline: float | None,
        limit: int,
        on_timeout: Callable[[dict[str, Any]], None],
        on_chunk: Callable[[int, bytes], None] | None = None,
        drain_seconds: float = 5.0,
    ) -> ExecOutcome:
        """Start ``exec_id``, feed ``stdin``, collect output up to ``limit`` bytes per stream.

        When ``deadline`` (monotonic) passes, ``on_timeout`` gets the exec's inspect data and must kill the
        exec's process tree; the output is then drained for at most ``drain_seconds``. A command that exits
        while a background process still holds its stdout ends the exec too (the engine would otherwise wait).
        """
        out = ExecOutcome()
        sock_io = self.call("exec start", self.api.exec_start, exec_id, socket=True)
        raw: socket.socket = getattr(sock_io, "_sock", sock_io)
        sender = self._send_stdin(raw, stdin) if stdin is not None else None
        try:
            self._pump(raw, exec_id, out, deadline, limit, on_timeout, on_chunk, drain_seconds)
        finally:
            if sender is not None:
                # Closing the socket below ends a send still blocked on a command that never read.
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)
                sender.join(timeout=5)
            with contextlib.suppress(OSError):
                raw.close()
            with contextlib.suppress(Exception):
                sock_io.close()
        info = self._exec_info(exec_id)
        out.pid = int(info.get("Pid") or 0)
        code = info.get("ExitCode")
        out.exit_code = int(code) if code is not None else None
        return out

    @staticmethod
    def _send_stdin(raw: socket.socket, data: bytes) -> threading.Thread:
        # In its own thread: a command that writes a lot before reading would otherwise deadlock against us.
        def send() -> None:
            with contextlib.suppress(OSError):
                raw.sendall(data)
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)  # EOF on the command's stdin

        thread = threading.Thread(target=send, name="stockade-exec-stdin", daemon=True)
        thread.start()
        return thread

    def _pump(
        self,
        raw: socket.socket,
        exec_id: str,
        out: ExecOutcome,
        deadline: float | None,
        limit: int,
        on_timeout: Callable[[dict[str, Any]], None],
        on_chunk: Callable[[int, bytes], None] | None,
        drain_seconds: float,
    ) -> None:
        buf = bytearray()
        ended_at: float | None = None  # when the command was seen finished with the stream still open
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is not None and now >= drain_until:
                return
            if deadline is not None and not out.timed_out and now >= deadline:
                out.timed_out = True
                on_timeout(self._exec_info(exec_id))
                drain_until = time.monotonic() + drain_seconds
            wait = 0.25
            if deadline is not None and not out.timed_out:
                wait = max(0.0, min(wait, deadline - now))
            if drain_until is not None:
                wait = max(0.0, min(wait, drain_until - now))
            if ended_at is not None:
                wait = min(wait, 0.05)
            readable, _, _ = select.select([raw], [], [], wait)
            if not readable:
                if ended_at is not None:
                    return  # finished, and quiet for a moment: a background process holds the stream
                if not out.timed_out and not self._exec_info(exec_id).get("Running", True):
                    ended_at = time.monotonic()
                continue
            try:
                chunk = raw.recv(65536)
            except OSError:
                return
            if not chunk:
                self._frames(buf, out, limit, on_chunk, final=True)
                return
            buf += chunk
            self._frames(buf, out, limit, on_chunk, final=False)

    @staticmethod
    def _frames(
        buf: bytearray, out: ExecOutcome, limit: int, on_chunk: Callable[[int, bytes], None] | None, final: bool
    ) -> None:
        # The multiplexed stream: 1 byte stream id, 3 zero bytes, 4 bytes big-endian length, payload.
        while len(buf) >= 8:
            kind = buf[0]
            (size,) = struct.unpack(">I", buf[4:8])
            if len(buf) < 8 + size:
                break
            payload = bytes(buf[8 : 8 + size])
            del buf[: 8 + size]
            target = out.stderr if kind == 2 else out.stdout
            room = limit - len(target)
            if room < len(payload):
                out.truncated = True
                payload = payload[: max(room, 0)]
            if payload:
                target += payload
                if on_chunk is not None:
                    on_chunk(kind, payload)
        if final and buf:
            out.truncated = True  # a cut frame at EOF: report it rather than guess
