"""stockade: run untrusted commands in sandboxes that enforce a declared permission policy.

``async with stockade.open_backend("bwrap") as backend: ...``; ``stockade.sync`` for blocking scripts.
The contract is :class:`SandboxBackend`; the values are in :mod:`stockade.models`; every error is a
:class:`SandboxError` (see :mod:`stockade.errors`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import sync
    from .backend import ExecChunk, SandboxBackend, SpecGap
    from .errors import (
        BackendUnavailable,
        ExecError,
        InvalidRequest,
        LifecycleError,
        NetworkPolicyError,
        SandboxError,
        SessionNotFound,
        Unsupported,
    )
    from .models import (
        MEMORY_MOUNT,
        OUTPUTS_MOUNT,
        ExecRequest,
        ExecResult,
        FilesystemAccess,
        FilesystemMount,
        NetworkPolicy,
        ResolvedMount,
        ResourceLimits,
        SandboxCapabilities,
        SandboxSession,
        SandboxSnapshot,
        SandboxSpec,
        SandboxState,
    )
    from .policy import PermissionPolicy
    from .registry import BackendInfo, available_backends, default_backend_name, open_backend

__version__ = "0.1.0"

__all__ = [
    "MEMORY_MOUNT",
    "OUTPUTS_MOUNT",
    "BackendInfo",
    "BackendUnavailable",
    "ExecChunk",
    "ExecError",
    "ExecRequest",
    "ExecResult",
    "FilesystemAccess",
    "FilesystemMount",
    "InvalidRequest",
    "LifecycleError",
    "NetworkPolicy",
    "NetworkPolicyError",
    "PermissionPolicy",
    "ResolvedMount",
    "ResourceLimits",
    "SandboxBackend",
    "SandboxCapabilities",
    "SandboxError",
    "SandboxSession",
    "SandboxSnapshot",
    "SandboxSpec",
    "SandboxState",
    "SessionNotFound",
    "SpecGap",
    "Unsupported",
    "__version__",
    "available_backends",
    "default_backend_name",
    "open_backend",
    "sync",
]

# Where each public name lives. They are imported on first use (PEP 562): helper processes such as the egress
# gateway import a few stockade modules and must not pay for pydantic and the models at start-up.
_HOMES = {
    **dict.fromkeys(("ExecChunk", "SandboxBackend", "SpecGap"), ".backend"),
    **dict.fromkeys(
        (
            "BackendUnavailable",
            "ExecError",
            "InvalidRequest",
            "LifecycleError",
            "NetworkPolicyError",
            "SandboxError",
            "SessionNotFound",
            "Unsupported",
        ),
        ".errors",
    ),
    **dict.fromkeys(
        (
            "MEMORY_MOUNT",
            "OUTPUTS_MOUNT",
            "ExecRequest",
            "ExecResult",
            "FilesystemAccess",
            "FilesystemMount",
            "NetworkPolicy",
            "ResolvedMount",
            "ResourceLimits",
            "SandboxCapabilities",
            "SandboxSession",
            "SandboxSnapshot",
            "SandboxSpec",
            "SandboxState",
        ),
        ".models",
    ),
    "PermissionPolicy": ".policy",
    **dict.fromkeys(("BackendInfo", "available_backends", "default_backend_name", "open_backend"), ".registry"),
}


def __getattr__(name: str) -> Any:
    if name == "sync":
        value: Any = importlib.import_module(".sync", __name__)
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    else:
        raise AttributeError(f"module 'stockade' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
