"""stockade: run untrusted commands in sandboxes that enforce a declared permission policy.

``async with stockade.open_backend("bwrap") as backend: ...``; ``stockade.sync`` for blocking scripts.
The contract is :class:`SandboxBackend`; the values are in :mod:`stockade.models`; every error is a
:class:`SandboxError` (see :mod:`stockade.errors`).
"""

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
