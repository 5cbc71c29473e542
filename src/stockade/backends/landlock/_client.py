"""Host side of the supervisor protocol (see ``_supervisor.py``): one unix-socket connection per request."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from anyio.abc import SocketStream

__all__ = ["SupervisorGone", "SupervisorReply", "request", "request_frames", "short_unix_path"]

# sun_path holds 108 bytes; state directories can be deeper than that.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def short_unix_path(path: str) -> Iterator[str]:
    """A name for the socket at ``path`` that fits in ``sun_path``: through ``/proc/self/fd`` of its
    directory when the path itself is too long."""
    if len(path.encode()) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class SupervisorGone(Exception):
    """The supervisor could not be reached or hung up mid-request (the session is not running)."""


class SupervisorReply(Exception):
    """The supervisor answered with an error frame."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", "supervisor error"))
        self.body = body


async def _read_exact(stream: SocketStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        try:
            chunk = await stream.receive(max(65536, n - len(buf)))
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise SupervisorGone("the supervisor closed the connection") from exc
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def request_frames(socket_path: str, body: dict[str, Any]) -> AsyncIterator[tuple[str, bytes]]:
    """Send ``body`` and yield ``(kind, payload)`` frames; the last is ``("r", json)`` or ``("x", json)``."""
    data = json.dumps(body).encode()
    try:
        with short_unix_path(socket_path) as short:
            stream = await anyio.connect_unix(short)
    except OSError as exc:
        raise SupervisorGone(f"cannot reach the session supervisor: {exc.strerror or exc}") from exc
    async with stream:
        try:
            await stream.send(struct.pack(">I", len(data)) + data)
        except (anyio.BrokenResourceError, OSError) as exc:
            raise SupervisorGone("the supervisor closed the connection") from exc
        buf = bytearray()
        while True:
            header = await _read_exact(stream, 5, buf)
            kind = chr(header[0])
            (size,) = struct.unpack(">I", header[1:])
            payload = await _read_exact(stream, size, buf)
            yield kind, payload
            if kind in ("r", "x"):
                return


async def request(socket_path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request whose whole answer is one result; raises :class:`SupervisorReply` on an error frame."""
    async for kind, payload in request_frames(socket_path, body):
        if kind == "r":
            result: dict[str, Any] = json.loads(payload)
            return result
        if kind == "x":
            raise SupervisorReply(json.loads(payload))
    raise SupervisorGone("the supervisor sent no result")
