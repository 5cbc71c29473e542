"""The one error tree of stockade.

Every failure a backend, the CLI or the service reports is one of these::

    SandboxError                      code "sandbox_error"
    ├── SessionNotFound (LookupError) code "session_not_found"
    ├── Unsupported                   code "unsupported"       (backend, operation)
    ├── InvalidRequest (ValueError)   code "invalid_request"   (field, rule)
    ├── LifecycleError                code "lifecycle_error"   (session in the wrong state, start-up failed)
    ├── ExecError                     code "exec_error"        (the command could not be started at all)
    ├── NetworkPolicyError            code "network_policy_error"
    └── BackendUnavailable            code "backend_unavailable" (missing tool, package or privilege)

A non-zero exit status of a command is data (``ExecResult.exit_code``), never an error. Backends translate
native failures (``OSError``, engine errors, ...) into this tree at one boundary and re-raise with
``from exc``. Each class has a stable ``code`` used in JSON bodies (``{"error": {"code", "message", ...}}``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendUnavailable",
    "ExecError",
    "InvalidRequest",
    "LifecycleError",
    "NetworkPolicyError",
    "SandboxError",
    "SessionNotFound",
    "Unsupported",
    "error_from_json",
]


class SandboxError(Exception):
    """Base class of every stockade error."""

    code: str = "sandbox_error"
    _detail_names: tuple[str, ...] = ()  # the keys details() reads; a rebuilt error always has them

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """Extra structured fields for the JSON form (beyond code and message)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """``{"code": ..., "message": ..., **details}``: the body of an HTTP error."""
        return {"code": self.code, "message": self.message, **self.details()}

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (service, Ray actors): keep them picklable with their fields.
        return (_rebuild, (type(self), self.to_json()))


class SessionNotFound(SandboxError, LookupError):
    """No session with that id exists (never created, already terminated, or reaped)."""

    code = "session_not_found"
    _detail_names = ("session_id",)

    def __init__(self, session_id: str, message: str | None = None) -> None:
        super().__init__(message or f"no sandbox session with id {session_id!r}")
        self.session_id = session_id

    def details(self) -> dict[str, Any]:
        return {"session_id": self.session_id}


class Unsupported(SandboxError):
    """The backend cannot enforce or perform the requested operation; its capabilities say so beforehand."""

    code = "unsupported"
    _detail_names = ("backend", "operation", "reason")

    def __init__(self, backend: str, operation: str, reason: str | None = None) -> None:
        text = f"backend {backend!r} does not support {operation}"
        if reason:
            text += f": {reason}"
        super().__init__(text)
        self.backend = backend
        self.operation = operation
        self.reason = reason

    def details(self) -> dict[str, Any]:
        return {"backend": self.backend, "operation": self.operation, "reason": self.reason}


class InvalidRequest(SandboxError, ValueError):
    """Input that breaks a rule; ``field`` names where, the message says which rule."""

    code = "invalid_request"
    _detail_names = ("field",)

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def details(self) -> dict[str, Any]:
        return {"field": self.field}


class LifecycleError(SandboxError):
    """The session cannot do this in its current state, or failed to start or stay alive."""

    code = "lifecycle_error"


class ExecError(SandboxError):
    """The command could not be started or its result could not be collected."""

    code = "exec_error"


class NetworkPolicyError(SandboxError):
    """A network policy could not be applied (the gateway failed to start or to take the rules)."""

    code = "network_policy_error"


class BackendUnavailable(SandboxError):
    """The backend cannot run on this host; the message says what to install or change."""

    code = "backend_unavailable"
    _detail_names = ("backend", "reason")

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} is not available: {reason}")
        self.backend = backend
        self.reason = reason

    def details(self) -> dict[str, Any]:
        return {"backend": self.backend, "reason": self.reason}


_BY_CODE: dict[str, type[SandboxError]] = {
    cls.code: cls
    for cls in (
        SandboxError,
        SessionNotFound,
        Unsupported,
        InvalidRequest,
        LifecycleError,
        ExecError,
        NetworkPolicyError,
        BackendUnavailable,
    )
}


def _rebuild(cls: type[SandboxError], body: dict[str, Any]) -> SandboxError:
    err = cls.__new__(cls)
    message = str(body.get("message", ""))
    Exception.__init__(err, message)
    err.message = message
    # A body from an older or foreign peer may lack a detail: default it, so to_json()/str() never fail.
    for key in cls._detail_names:
        setattr(err, key, body.get(key))
    for key, value in body.items():
        # Other keys become attributes only where they cannot shadow a method or dunder: the body may come
        # from a remote peer.
        if key in ("code", "message") or key in cls._detail_names:
            continue
        if isinstance(key, str) and key.isidentifier() and not key.startswith("_") and not hasattr(cls, key):
            setattr(err, key, value)
    return err


def error_from_json(body: dict[str, Any]) -> SandboxError:
    """Rebuild an error from its JSON form (as sent by the service); unknown codes become ``SandboxError``."""
    cls = _BY_CODE.get(str(body.get("code", "")), SandboxError)
    return _rebuild(cls, body)
