"""Backend names -> lazily imported classes, plus the ``stockade.backends`` entry-point group.

A backend class is found by name without importing every backend (their dependencies are optional extras).
Each backend module exposes a ``probe()`` function returning ``None`` when it can run here, or the reason it
cannot (with the command that fixes it); ``available_backends()`` reports those reasons.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .backend import SandboxBackend
from .errors import BackendUnavailable, InvalidRequest

__all__ = [
    "BackendInfo",
    "available_backends",
    "backend_class",
    "default_backend_name",
    "default_candidate",
    "open_backend",
]

ENTRY_POINT_GROUP = "stockade.backends"

# name -> "module:Class". Order matters for the default: strongest isolation that needs nothing extra first.
_BUILTIN: dict[str, str] = {}

_EXTRAS: dict[str, str] = {}


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run on this host, and why not."""

    name: str
    available: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "reason": self.reason}


# Entry points come back in no promised order: the default's preference is stated here (strongest isolation
# that needs nothing extra first); other backends follow by name.
_PREFERENCE = ("bwrap", "docker", "landlock")


def _targets() -> dict[str, str]:
    targets = dict(_BUILTIN)  # registered explicitly: in registration order
    rank = {name: i for i, name in enumerate(_PREFERENCE)}
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (rank.get(ep.name, len(rank)), ep.name))
    for ep in found:
        # module and attr, not ep.value: a value may carry extras ("pkg.mod:Cls [extra]").
        targets.setdefault(ep.name, f"{ep.module}:{ep.attr}")
    return targets


def _load(name: str) -> tuple[type[SandboxBackend], Callable[[], str | None]]:
    targets = _targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise InvalidRequest(f"unknown backend {name!r}; known backends: {known}", field="backend")
    module_name, _, attr = targets[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRAS.get(name, name)
        raise BackendUnavailable(
            name, f"cannot import {module_name} ({exc}); install it with: pip install 'stockade[{extra}]'"
        ) from exc
    cls = getattr(module, attr, None) if attr else None
    if not (isinstance(cls, type) and issubclass(cls, SandboxBackend)):
        raise BackendUnavailable(name, f"{targets[name]!r} does not name a SandboxBackend subclass")
    probe: Callable[[], str | None] = getattr(module, "probe", lambda: None)
    return cls, probe


def default_candidate(name: str) -> bool:
    """Whether ``name`` may be picked without being asked for (see ``SandboxBackend.default_candidate``)."""
    try:
        return bool(_load(name)[0].default_candidate)
    except (BackendUnavailable, InvalidRequest):
        return False


def backend_class(name: str) -> type[SandboxBackend]:
    """The backend class registered under ``name`` (imported on first use)."""
    return _load(name)[0]


def available_backends() -> list[BackendInfo]:
    """Every registered backend, with whether it can run here and the reason when not."""
    infos: list[BackendInfo] = []
    for name in _targets():
        try:
            _, probe = _load(name)
            reason = probe()
        except BackendUnavailable as exc:
            reason = exc.reason
        except Exception as exc:  # a broken third-party plugin must not break the listing
            reason = f"backend failed to load: {exc!r}"
        infos.append(BackendInfo(name, reason is None, reason))
    return infos


def default_backend_name() -> str:
    """The first available backend in order of preference. Never picks a weaker one silently: the order is
    strongest-isolation first, and the caller sees which one was picked (``backend.name``)."""
    infos = available_backends()
    for info in infos:
        if info.available and default_candidate(info.name):
            return info.name
    reasons = "; ".join(f"{i.name}: {i.reason}" for i in infos) or "no backend is registered"
    raise BackendUnavailable("default", f"no backend can run on this host ({reasons})")


def open_backend(name: str | None = None, /, **options: Any) -> SandboxBackend:
    """Instantiate a backend by name (the default backend when ``name`` is None).

    Use it as ``async with stockade.open_backend("bwrap") as backend: ...``. Raises
    :class:`BackendUnavailable` with the fix (package to install, privilege missing) when the backend cannot
    run here.
    """
    name = name or default_backend_name()
    cls, probe = _load(name)
    try:
        reason = probe()
    except Exception as exc:  # a probe that crashes says nothing good about the host: refuse, with the cause
        raise BackendUnavailable(name, f"probe failed: {exc!r}") from exc
    if reason is not None:
        raise BackendUnavailable(name, reason)
    return cls(**options)


def register_builtin(name: str, target: str, extra: str | None = None) -> None:
    """Register a backend shipped with stockade (``target`` is ``"module:Class"``)."""
    _BUILTIN[name] = target
    if extra:
        _EXTRAS[name] = extra
