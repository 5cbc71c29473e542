"""The public surface is exactly what we say it is."""

from __future__ import annotations

import importlib

import stockade

DOCUMENTED = [
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


def test_all_is_the_documented_list() -> None:
    assert stockade.__all__ == DOCUMENTED


def test_every_public_name_is_importable() -> None:
    for name in stockade.__all__:
        assert getattr(stockade, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from stockade import *", namespace)
    assert set(DOCUMENTED) - {"__version__"} <= set(namespace)


def test_canonical_mounts() -> None:
    assert stockade.MEMORY_MOUNT == "/mnt/memory"
    assert stockade.OUTPUTS_MOUNT == "/mnt/session/outputs"


def test_version_is_a_string() -> None:
    assert isinstance(stockade.__version__, str)


def test_submodule_all_names_exist() -> None:
    for module_name in ("models", "errors", "backend", "registry", "policy", "sync"):
        module = importlib.import_module(f"stockade.{module_name}")
        for name in module.__all__:
            assert hasattr(module, name), f"stockade.{module_name}.{name}"


def test_reexports_are_the_same_objects() -> None:
    from stockade import errors, models, registry

    assert stockade.SandboxSpec is models.SandboxSpec
    assert stockade.SessionNotFound is errors.SessionNotFound
    assert stockade.open_backend is registry.open_backend
    assert stockade.sync.SyncBackend.__module__ == "stockade.sync"
