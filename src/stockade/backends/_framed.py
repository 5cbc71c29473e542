"""Host side of the framed request protocol that bwrap's agent (``bwrap/_agent.py``) and landlock's supervisor
(``landlock/_supervisor.py``) both speak: one unix-socket connection per request, the request as a 4-byte
big-endian length and JSON, the answer as ``kind (1 byte) | length (4 bytes) | payload`` frames.

``peer`` names the other end in error messages ("agent", "supervisor")."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from anyio.abc import SocketStream

__all__ = ["PeerGone", "PeerReply", "request_frames", "send_request", "short_unix_path"]

# sun_path holds 108 bytes; state directories can be deeper than that (pytest's tmp paths are).
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def short_unix_path(path: str) -> Iterator[str]:
    """A path to the same socket that fits in ``sun_path``: through ``/proc/self/fd`` of its directory."""
    if len(path.encode()) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class PeerGone(Exception):
    """The peer could not be reached or hung up mid-request (the session is not running)."""


class PeerReply(Exception):
    """The peer answered with an error frame."""

    def __init__(self, body: dict[str, Any], peer: str = "agent") -> None:
        super().__init__(body.get("message", f"{peer} error"))
        self.body = body


async def _read_exact(stream: SocketStream, n: int, buf: bytearray, peer: str) -> bytes:
    while len(buf) < n:
        try:
            chunk = await stream.receive(max(65536, n - len(buf)))
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise PeerGone(f"the {peer} closed the connection") from exc
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def request_frames(
    socket_path: str, request: dict[str, Any], *, peer: str = "agent"
) -> AsyncIterator[tuple[str, bytes]]:
    """Send ``request`` and yield ``(kind, payload)`` frames; the last is ``("r", json)`` or ``("x", json)``."""
    body = json.dumps(request).encode()
    try:
        with short_unix_path(socket_path) as short:
            stream = await anyio.connect_unix(short)
    except OSError as exc:
        raise PeerGone(f"cannot reach the session {peer} at {socket_path}: {exc.strerror or exc}") from exc
    async with stream:
        try:
            await stream.send(struct.pack(">I", len(body)) + body)
        except (anyio.BrokenResourceError, OSError) as exc:
            raise PeerGone(f"the {peer} closed the connection") from exc
        buf = bytearray()
        while True:
            header = await _read_exact(stream, 5, buf, peer)
            kind = chr(header[0])
            (size,) = struct.unpack(">I", header[1:])
            payload = await _read_exact(stream, size, buf, peer)
            yield kind, payload
            if kind in ("r", "x"):
                return


async def send_request(socket_path: str, request: dict[str, Any], *, peer: str = "agent") -> dict[str, Any]:
    """A request whose only interesting frame is the final one; raises :class:`PeerReply` on an error frame."""
    async for kind, payload in request_frames(socket_path, request, peer=peer):
        if kind == "r":
            result: dict[str, Any] = json.loads(payload)
            return result
        if kind == "x":
            raise PeerReply(json.loads(payload), peer)
    raise PeerGone(f"the {peer} sent no result")
