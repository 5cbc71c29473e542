"""Host side of the supervisor protocol (see ``_supervisor.py``): the shared framed client (``.._framed``), with
the session supervisor named in errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .. import _framed
from .._framed import PeerGone as SupervisorGone
from .._framed import PeerReply as SupervisorReply
from .._framed import short_unix_path

__all__ = ["SupervisorGone", "SupervisorReply", "request", "request_frames", "short_unix_path"]

_PEER = "supervisor"


async def request_frames(socket_path: str, body: dict[str, Any]) -> AsyncIterator[tuple[str, bytes]]:
    """Send ``body`` and yield ``(kind, payload)`` frames; the last is ``("r", json)`` or ``("x", json)``."""
    async for frame in _framed.request_frames(socket_path, body, peer=_PEER):
        yield frame


async def request(socket_path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request whose whole answer is one result; raises :class:`SupervisorReply` on an error frame."""
    return await _framed.send_request(socket_path, body, peer=_PEER)
