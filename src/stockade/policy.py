"""Permission policies: the few lines a user writes, lowered into a :class:`SandboxSpec` by a pure function.

A policy file (TOML)::

    [filesystem]
    read = ["/srv/data:/mnt/data"]     # host SRC[:guest DST], read-only; DST defaults to SRC
    write = ["/srv/out:/mnt/out"]      # read-write
    memory_writable = false            # may the guest write /mnt/memory?

    [network]
    allow = ["api.github.com", "*.pythonhosted.org:443"]   # absent or [] = no network
    # unrestricted = true              # any public destination instead of an allow list

    [limits]
    memory = "512M"      # K, M, G suffixes (binary); a bare number is MiB
    cpus = 2
    timeout = "30s"      # per exec
    idle_timeout = "10m"
    pids = 256
    tmp = "256M"

    [env]
    LANG = "C.UTF-8"

Unknown tables or keys are refused (a misspelt key must not silently weaken the policy).
Which parts a given backend would not enforce is answered by ``backend.check(policy.to_spec())``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .models import (
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    SandboxSpec,
    parse_duration,
    parse_model,
)

__all__ = ["PermissionPolicy", "parse_mount_arg", "parse_size_mb"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size_mb(value: Any, field: str) -> int:
    """A size like ``512M``, ``2G``, ``1048576K`` or a number of MiB, as whole MiB (rounded up)."""
    if isinstance(value, bool):
        raise InvalidRequest("must be a size like '512M' or a number of MiB", field=field)
    if isinstance(value, int | float):
        # TOML has nan and inf; int(nan) would escape as a bare ValueError. 10**400 MiB is simply too big.
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("must be a finite size", field=field)
        mb = float(value) if value < 1 << 60 else float(1 << 60)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise InvalidRequest(f"must be a size like '512M', '2G' or a number of MiB (got {value!r})",
                                 field=field)
        number = min(float(match.group(1)), float(1 << 60))
        unit = (match.group(2) or "m")[0].lower()
        factor = {"b": 1 / (1 << 20), "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}[unit]
        mb = number * factor
    else:
        raise InvalidRequest("must be a size like '512M' or a number of MiB", field=field)
    if mb <= 0:
        raise InvalidRequest("must be positive", field=field)
    whole = int(mb) if mb == int(mb) else int(mb) + 1
    return whole


def parse_mount_arg(text: str, access: FilesystemAccess, field: str = "mount") -> FilesystemMount:
    """``SRC[:DST]`` as given on the command line or in a policy file.

    A relative or ``~`` SRC is resolved against the current directory and home (the only inputs read).
    DST defaults to the resolved SRC, so ``--ro data`` shows ``./data`` at its absolute path in the guest.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequest("must be SRC or SRC:DST", field=field)
    src, sep, dst = text.partition(":")
    if not src:
        raise InvalidRequest(f"needs a host path before ':' (got {text!r})", field=field)
    if sep and not dst:
        raise InvalidRequest(f"needs a guest path after ':' (got {text!r})", field=field)
    src_path = str(Path(src).expanduser())
    if not src_path.startswith("/"):
        src_path = str(Path(src_path).absolute())
    if not sep:
        dst = src_path
    try:
        return FilesystemMount(source=src_path, target=dst, access=access)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{_strip(exc)} (in {text!r})", field=field) from None


def _strip(exc: InvalidRequest) -> str:
    """The rule of an error without its field prefix, to re-raise it under the policy's own key."""
    prefix = f"{exc.field}: " if exc.field else ""
    return exc.message[len(prefix) :] if exc.message.startswith(prefix) else exc.message


# Spec fields whose errors are re-labelled with the policy key the user wrote.
_POLICY_KEYS = {
    "limits.memory_mb": "limits.memory",
    "limits.tmp_mb": "limits.tmp",
    "limits.cpu_count": "limits.cpus",
    "limits.pids_max": "limits.pids",
    "limits.wall_time": "limits.timeout",
    "limits.idle_timeout": "limits.idle_timeout",
    "network_policy.allowed_hosts": "network.allow",
}


def _table(data: dict[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise InvalidRequest("must be a table", field=name)
    unknown = set(table) - keys
    if unknown:
        raise InvalidRequest(f"unknown key(s) {sorted(unknown)}; known: {sorted(keys)}", field=name)
    return table


def _str_list(table: dict[str, Any], key: str, field: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest("must be a list of strings", field=field)
    return tuple(value)


@dataclass(frozen=True)
class PermissionPolicy:
    """What a command may read, write and reach, and how much it may use."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    memory_writable: bool = False
    allow_hosts: tuple[str, ...] = ()
    unrestricted_network: bool = False
    memory: str | int | None = None
    cpus: int | None = None
    timeout: str | float | None = None
    idle_timeout: str | float | None = None
    pids: int | None = None
    tmp: str | int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, text: str) -> PermissionPolicy:
        """Parse policy TOML text; raises InvalidRequest naming the table and key."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"is not valid TOML: {exc}", field="policy") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> PermissionPolicy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            message = f"cannot read policy file {str(path)!r}: {exc.strerror}"
            raise InvalidRequest(message, field="policy") from None
        return cls.from_toml(text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PermissionPolicy:
        unknown = set(data) - {"filesystem", "network", "limits", "env"}
        if unknown:
            raise InvalidRequest(
                f"unknown table(s) {sorted(unknown)}; known: filesystem, network, limits, env", field="policy"
            )
        fs = _table(data, "filesystem", {"read", "write", "memory_writable"})
        net = _table(data, "network", {"allow", "unrestricted"})
        limits = _table(data, "limits", {"memory", "cpus", "timeout", "idle_timeout", "pids", "tmp"})
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise InvalidRequest("must be a table of strings", field="env")
        unrestricted = net.get("unrestricted", False)
        if not isinstance(unrestricted, bool):
            raise InvalidRequest("must be true or false", field="network.unrestricted")
        memory_writable = fs.get("memory_writable", False)
        if not isinstance(memory_writable, bool):
            raise InvalidRequest("must be true or false", field="filesystem.memory_writable")
        policy = cls(
            read=_str_list(fs, "read", "filesystem.read"),
            write=_str_list(fs, "write", "filesystem.write"),
            memory_writable=memory_writable,
            allow_hosts=_str_list(net, "allow", "network.allow"),
            unrestricted_network=unrestricted,
            memory=limits.get("memory"),
            cpus=limits.get("cpus"),
            timeout=limits.get("timeout"),
            idle_timeout=limits.get("idle_timeout"),
            pids=limits.get("pids"),
            tmp=limits.get("tmp"),
            env=dict(env),
        )
        policy.to_spec()  # validate everything now, so a bad file fails where it is read
        return policy

    def network_policy(self) -> NetworkPolicy:
        if self.unrestricted_network:
            if self.allow_hosts:
                raise InvalidRequest("give either an allow list or unrestricted = true, not both",
                                     field="network")
            return NetworkPolicy.unrestricted()
        try:
            return NetworkPolicy.limited(*self.allow_hosts)
        except InvalidRequest as exc:
            raise InvalidRequest(_strip(exc), field="network.allow") from None

    def to_spec(self, **overrides: Any) -> SandboxSpec:
        """Lower the policy into a spec (pure: no filesystem access). ``overrides`` set other spec fields."""
        mounts = [parse_mount_arg(p, FilesystemAccess.READ_ONLY, "filesystem.read") for p in self.read]
        mounts += [parse_mount_arg(p, FilesystemAccess.READ_WRITE, "filesystem.write") for p in self.write]
        limits: dict[str, Any] = {}
        if self.memory is not None:
            limits["memory_mb"] = parse_size_mb(self.memory, "limits.memory")
        if self.tmp is not None:
            limits["tmp_mb"] = parse_size_mb(self.tmp, "limits.tmp")
        if self.cpus is not None:
            limits["cpu_count"] = self.cpus
        if self.pids is not None:
            limits["pids_max"] = self.pids
        if self.timeout is not None:
            limits["wall_time"] = parse_duration(self.timeout, "limits.timeout")
        if self.idle_timeout is not None:
            limits["idle_timeout"] = parse_duration(self.idle_timeout, "limits.idle_timeout")
        data: dict[str, Any] = {
            "network_policy": self.network_policy(),
            "mounts": mounts,
            "limits": limits,
            "env": self.env,
            "memory_writable": self.memory_writable,
        }
        data.update(overrides)
        try:
            return parse_model(SandboxSpec, data)
        except InvalidRequest as exc:
            key = _POLICY_KEYS.get(exc.field or "")
            if key is None or "limits" in overrides:
                raise
            raise InvalidRequest(_strip(exc), field=key) from None
