"""What travels over HTTP beyond the contract's own models: error statuses, limits, envelopes, stream frames.

Every :class:`~stockade.errors.SandboxError` maps to exactly one status (:func:`status_for`) and the body
``{"error": {"code", "message", ...details}}``. The service adds three errors of its own (unauthorized, body too
large, a limit reached); a client that does not know their codes still gets a :class:`SandboxError` with the
message.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..backend import ExecChunk
from ..errors import (
    BackendUnavailable,
    ExecError,
    InvalidRequest,
    LifecycleError,
    NetworkPolicyError,
    SandboxError,
    SessionNotFound,
    Unsupported,
)
from ..models import ExecResult, SandboxSession, SandboxSnapshot

__all__ = [
    "ERROR_STATUS",
    "ErrorBody",
    "ErrorDetail",
    "FileEntry",
    "FileList",
    "FileWritten",
    "Health",
    "Info",
    "LimitExceeded",
    "NetworkLog",
    "PayloadTooLarge",
    "ServiceLimits",
    "SessionList",
    "SnapshotList",
    "Unauthorized",
    "decode_frame",
    "encode_frame",
    "error_body",
    "status_for",
]


class Unauthorized(SandboxError):
    """The request carried no bearer token, or not this service's."""

    code = "unauthorized"


class PayloadTooLarge(SandboxError):
    """The request body is larger than the service accepts."""

    code = "payload_too_large"


class LimitExceeded(SandboxError):
    """A service limit (such as the number of sessions) is reached; retry once something is released."""

    code = "limit_exceeded"


# One status per error class; the most specific class wins (the tree is flat below SandboxError). A request the
# backend cannot carry out (Unsupported) is the client's to change, so a 4xx like a command that cannot start;
# the body's code tells them apart. 5xx are left to failures of the service's own side.
ERROR_STATUS: dict[type[SandboxError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    SessionNotFound: 404,
    LifecycleError: 409,
    PayloadTooLarge: 413,
    ExecError: 422,
    LimitExceeded: 429,
    Unsupported: 422,
    NetworkPolicyError: 502,
    BackendUnavailable: 503,
    SandboxError: 500,
}


def status_for(error: SandboxError) -> int:
    """The HTTP status of ``error``."""
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def error_body(error: SandboxError) -> dict[str, Any]:
    """``{"error": error.to_json()}``."""
    return {"error": error.to_json()}


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits of a service; None switches one off.

    ``max_body_bytes``: request bodies above it get 413. ``max_file_bytes``: the largest file moved by the files
    API. ``exec_timeout_ceiling``: seconds; an exec asking for more is refused, and a session provisioned
    through the service gets it as ``limits.wall_time`` when its spec sets none (a longer one is refused), so
    no exec through the service runs longer. ``max_sessions``: ``provision`` answers 429 once the backend lists
    that many sessions. ``mount_roots``: when set, mount sources must lie below one of these host directories.
    """

    max_body_bytes: int = 32 << 20
    max_file_bytes: int = 8 << 20
    exec_timeout_ceiling: float | None = None
    max_sessions: int | None = None
    mount_roots: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_file_bytes": self.max_file_bytes,
            "exec_timeout_ceiling": self.exec_timeout_ceiling,
            "max_sessions": self.max_sessions,
            "mount_roots": list(self.mount_roots) if self.mount_roots is not None else None,
        }


# ------------------------------------------------------------------------------------------------ envelopes


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorDetail(BaseModel):
    """``code`` and ``message`` always; details (``session_id``, ``field``, ``backend`` ...) by error kind."""

    model_config = ConfigDict(extra="allow")
    code: str
    message: str


class ErrorBody(_Envelope):
    error: ErrorDetail


class Health(_Envelope):
    status: Literal["ok"] = "ok"


class Info(_Envelope):
    backend: str
    version: str
    limits: dict[str, Any]
    auth: Literal["token", "socket"]


class SessionList(_Envelope):
    sessions: list[SandboxSession]


class SnapshotList(_Envelope):
    snapshots: list[SandboxSnapshot]


class NetworkLog(_Envelope):
    entries: list[dict[str, Any]]


class FileEntry(_Envelope):
    """One directory entry as the guest sees it. ``type``: ``file``, ``dir``, ``symlink`` or ``other``."""

    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int = Field(ge=0)
    mode: int = Field(ge=0)
    mtime: float


class FileList(_Envelope):
    path: str
    entries: list[FileEntry]


class FileWritten(_Envelope):
    path: str
    size: int = Field(ge=0)


# ------------------------------------------------------------------------------------------- stream frames
# exec/stream answers NDJSON, one object a line: {"stream": "stdout"|"stderr", "data": base64} for output,
# then {"result": ExecResult} last, or {"error": {...}} when the exec failed after the stream had begun.


def encode_frame(item: ExecChunk | ExecResult | SandboxError) -> dict[str, Any]:
    if isinstance(item, ExecChunk):
        return {"stream": item.stream, "data": base64.b64encode(item.data).decode("ascii")}
    if isinstance(item, ExecResult):
        return {"result": item.to_json()}
    return error_body(item)


def decode_frame(frame: Any) -> ExecChunk | ExecResult | SandboxError:
    """The inverse of :func:`encode_frame`; a frame that fits no shape raises ``InvalidRequest``."""
    from ..errors import error_from_json

    if isinstance(frame, dict):
        if frame.keys() == {"stream", "data"} and frame["stream"] in ("stdout", "stderr"):
            try:
                data = base64.b64decode(str(frame["data"]), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest("stream frame data is not base64", field="data") from None
            return ExecChunk(frame["stream"], data)
        if frame.keys() == {"result"}:
            return ExecResult.parse(frame["result"])
        if frame.keys() == {"error"} and isinstance(frame["error"], dict):
            return error_from_json(frame["error"])
    raise InvalidRequest(f"not an exec stream frame: {str(frame)[:200]!r}")
