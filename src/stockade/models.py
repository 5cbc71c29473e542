"""The values of the contract, wire-compatible with harn-hostlib's ``sandbox`` module.

Every model is immutable and validated when constructed: once a ``FilesystemMount`` exists its target is
absolute and ``..``-free, once a ``SandboxSpec`` exists its host patterns parse. Bad input raises
:class:`~stockade.errors.InvalidRequest` naming the field and the rule, whether the model is built in code or
read with ``parse_model`` / ``*.parse`` (pydantic's own ``model_validate`` still raises ``ValidationError``).

JSON shapes follow harn's serde output: ``{"mode": "limited", "allowed_hosts": [...]}``, ``"read_only"``,
durations ``{"secs": N, "nanos": N}`` (numbers of seconds and strings such as ``"30s"`` accepted on input),
snake_case states. Fields harn does not know (``ExecResult.duration_ms``, ``SandboxSpec.image`` ...) are
optional with defaults, so a harn peer can ignore them. Unknown input fields are refused: a misspelt
``allowed_host`` must not silently turn into a weaker policy.
"""

from __future__ import annotations

import math
import posixpath
import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import InvalidRequest

__all__ = [
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
    "SandboxSessionId",
    "SandboxSnapshot",
    "SandboxSpec",
    "SandboxState",
    "parse_duration",
    "parse_model",
    "validate_session_id",
]

MEMORY_MOUNT = "/mnt/memory"
"""Canonical guest mount for durable agent memory (read-only unless the spec makes it writable)."""
OUTPUTS_MOUNT = "/mnt/session/outputs"
"""Canonical guest mount for the session's writable outputs."""

# Bounds that keep a typo ("memory_mb": 5e9) from becoming a request no host can honour.
MAX_DURATION = timedelta(days=30)
MAX_MEMORY_MB = 4 * 1024 * 1024
MAX_CPU_COUNT = 4096
MAX_PIDS = 4_194_304
MAX_OUTPUT_BYTES = 1 << 40

# \Z, not $: "$" also matches before a trailing newline, which would let "id\n" through.
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}\Z")
_FORBIDDEN_TARGET_ROOTS = ("/proc", "/sys", "/dev")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


# --------------------------------------------------------------------------------------------- helpers


def _no_nul(value: str, field: str) -> str:
    if "\x00" in value:
        raise InvalidRequest("must not contain a NUL character", field=field)
    return value


def validate_session_id(value: Any, field: str = "session_id") -> str:
    """Return ``value`` if it is a valid session id: 1-64 of ``[A-Za-z0-9._-]``, not starting with ``.`` or
    ``-``."""
    if not isinstance(value, str):
        raise InvalidRequest("must be a string", field=field)
    if not value:
        raise InvalidRequest("must not be empty", field=field)
    if len(value) > 64:
        raise InvalidRequest(f"must be at most 64 characters (got {len(value)})", field=field)
    if not _SESSION_ID_RE.match(value):
        raise InvalidRequest(
            "may contain only letters, digits, '.', '_' and '-', and must not start with '.' or '-' "
            f"(got {value!r})",
            field=field,
        )
    return value


def parse_duration(value: Any, field: str = "duration") -> timedelta:
    """Read a duration given as ``{"secs", "nanos"}``, a number of seconds, or a string like ``"30s"``.

    The result is positive and at most 30 days. ``timedelta`` holds microseconds: ``nanos`` are rounded up to
    the next microsecond so that a positive harn duration never becomes zero.
    """
    limit = MAX_DURATION.total_seconds()
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise InvalidRequest("must be a duration, not a boolean", field=field)
    elif isinstance(value, int | float):
        # Compare before converting: float(10**400) overflows and timedelta(seconds=1e20) raises.
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("must be a finite number of seconds", field=field)
        if value <= 0:
            raise InvalidRequest("must be positive", field=field)
        if value > limit:
            raise InvalidRequest(f"must be at most {MAX_DURATION.days} days", field=field)
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise InvalidRequest(
                "must be a number with an optional unit ns, us, ms, s, m, h or d, like '30s' "
                f"(got {value!r})",
                field=field,
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
        if seconds > limit:  # also catches "1e999"-sized digit strings, which float() turns into inf
            raise InvalidRequest(f"must be at most {MAX_DURATION.days} days", field=field)
        result = timedelta(seconds=seconds)
    elif isinstance(value, dict):
        if set(value) - {"secs", "nanos"} or "secs" not in value:
            raise InvalidRequest('must have the form {"secs": N, "nanos": N}', field=field)
        secs, nanos = value["secs"], value.get("nanos", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (secs, nanos)):
            raise InvalidRequest("secs and nanos must be whole numbers", field=field)
        if secs < 0 or not 0 <= nanos < 1_000_000_000:
            raise InvalidRequest("secs must be >= 0 and nanos within 0..999999999", field=field)
        if secs > limit:
            raise InvalidRequest(f"must be at most {MAX_DURATION.days} days", field=field)
        result = timedelta(seconds=secs, microseconds=-(-nanos // 1000))
    else:
        raise InvalidRequest("must be a duration", field=field)
    if result <= timedelta(0):
        raise InvalidRequest("must be positive", field=field)
    if result > MAX_DURATION:
        raise InvalidRequest(f"must be at most {MAX_DURATION.days} days", field=field)
    return result


def _emit_duration(value: timedelta) -> dict[str, int]:
    total_us = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    return {"secs": total_us // 1_000_000, "nanos": (total_us % 1_000_000) * 1000}


def _duration_validator(field: str) -> BeforeValidator:
    return BeforeValidator(lambda v: None if v is None else parse_duration(v, field))


Duration = Annotated[timedelta, PlainSerializer(_emit_duration, return_type=dict[str, int])]


def _bounded_int(value: Any, field: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequest("must be a whole number", field=field)
    if not low <= value <= high:
        raise InvalidRequest(f"must be between {low} and {high} (got {value})", field=field)
    return int(value)


def normalise_mount_target(target: Any, field: str = "target") -> str:
    """Return the normalised absolute guest path, or raise ``InvalidRequest`` naming the rule."""
    if not isinstance(target, str):
        raise InvalidRequest("must be a string", field=field)
    _no_nul(target, field)
    if not target.startswith("/"):
        raise InvalidRequest(f"must be an absolute guest path (got {target!r})", field=field)
    parts = [p for p in target.split("/") if p]
    if any(p == ".." for p in parts):
        raise InvalidRequest(f"must not contain a '..' component (got {target!r})", field=field)
    if any(p == "." for p in parts):
        raise InvalidRequest(f"must not contain a '.' component (got {target!r})", field=field)
    normal = "/" + "/".join(parts)
    if normal == "/":
        raise InvalidRequest("must not be '/' (the guest root)", field=field)
    for root in _FORBIDDEN_TARGET_ROOTS:
        if normal == root or normal.startswith(root + "/"):
            raise InvalidRequest(f"must not be {root} or below it (kernel filesystems)", field=field)
    if len(normal) > 4096:
        raise InvalidRequest("must be at most 4096 characters", field=field)
    return normal


_M = TypeVar("_M", bound=BaseModel)


def parse_model(model: type[_M], data: Any) -> _M:
    """Validate ``data`` (a dict or JSON text) into ``model``, raising ``InvalidRequest`` on any failure."""
    try:
        if isinstance(data, str | bytes | bytearray):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid_from_validation(exc) from None


def _invalid_from_validation(exc: ValidationError) -> InvalidRequest:
    # Our own validators raise InvalidRequest inside pydantic; pydantic wraps it. Surface the first original.
    for err in exc.errors():
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, InvalidRequest):
            field = _join_path([str(x) for x in err.get("loc", ())], ctx_err.field)
            return InvalidRequest(_strip_field(ctx_err), field=field)
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "is not a known field"
    elif first.get("type") == "missing":
        msg = "is required"
    return InvalidRequest(msg, field=loc or None)


def _join_path(loc: list[str], inner: str | None) -> str | None:
    """Prefix a validator's own field name with pydantic's location, so "mounts.0.target" is said, not
    "target". The two overlap where the validator already named the field it validates (loc ``env``, inner
    ``env.HOME``): the longest suffix of ``loc`` that is a prefix of ``inner`` is said once."""
    inner_parts = inner.split(".") if inner else []
    for overlap in range(min(len(loc), len(inner_parts)), 0, -1):
        if loc[len(loc) - overlap :] == inner_parts[:overlap]:
            return ".".join(loc + inner_parts[overlap:])
    return ".".join(loc + inner_parts) or None


def _strip_field(err: InvalidRequest) -> str:
    prefix = f"{err.field}: " if err.field else ""
    return err.message[len(prefix) :] if prefix and err.message.startswith(prefix) else err.message


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def __init__(self, /, **data: Any) -> None:
        # Constructing a model in code breaks the same rules as parsing one: say so with InvalidRequest (a
        # ValueError, like pydantic's ValidationError), so callers catch one error type however values arrive.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _invalid_from_validation(exc) from None

    @classmethod
    def parse(cls: type[_M], data: Any) -> _M:
        """Validate a dict or JSON text, raising :class:`InvalidRequest` on bad input."""
        return parse_model(cls, data)

    def to_json(self) -> dict[str, Any]:
        """The wire form (a JSON-ready dict)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- values

SandboxSessionId = Annotated[str, BeforeValidator(validate_session_id)]
"""A session id: 1-64 of ``[A-Za-z0-9._-]``, not starting with ``.`` or ``-`` (a plain string on the wire)."""


class NetworkPolicy(_Model):
    """Egress policy: ``unrestricted``, or ``limited`` to ``allowed_hosts`` (an empty list denies all)."""

    mode: Literal["unrestricted", "limited"]
    allowed_hosts: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        mode = data.get("mode")
        if mode == "unrestricted" and data.get("allowed_hosts"):
            raise InvalidRequest("must be absent when mode is 'unrestricted'", field="allowed_hosts")
        if mode == "limited" and "allowed_hosts" not in data:
            raise InvalidRequest("is required when mode is 'limited' (an empty list denies all)",
                                 field="allowed_hosts")
        return data

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        from .hostpatterns import parse_host_pattern

        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise InvalidRequest("must be a list of host patterns", field="allowed_hosts")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise InvalidRequest("must be a list of strings", field="allowed_hosts")
            pattern = parse_host_pattern(item)
            if pattern.text not in out:
                out.append(pattern.text)
        return tuple(out)

    @classmethod
    def deny_all(cls) -> NetworkPolicy:
        return cls(mode="limited", allowed_hosts=())

    @classmethod
    def unrestricted(cls) -> NetworkPolicy:
        return cls(mode="unrestricted")

    @classmethod
    def limited(cls, *hosts: str) -> NetworkPolicy:
        return cls.parse({"mode": "limited", "allowed_hosts": list(hosts)})

    @property
    def denies_all(self) -> bool:
        return self.mode == "limited" and not self.allowed_hosts

    @model_serializer(mode="plain")
    def _serialise(self) -> dict[str, Any]:
        # harn's internally tagged enum: the unrestricted variant has no allowed_hosts key at all. A
        # serializer (not a to_json override) so that a policy nested in a spec is emitted in the same shape.
        if self.mode == "unrestricted":
            return {"mode": "unrestricted"}
        return {"mode": "limited", "allowed_hosts": list(self.allowed_hosts)}


class FilesystemAccess(StrEnum):
    """Whether a mount is writable by the guest."""

    READ_ONLY = "read_only"
    READ_WRITE = "read_write"


class FilesystemMount(_Model):
    """A host ``source`` exposed at guest ``target``; an empty source means a fresh session-owned
    directory."""

    source: str = ""
    target: str
    access: FilesystemAccess = FilesystemAccess.READ_ONLY

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidRequest("must be a string path", field="source")
        _no_nul(value, "source")
        if value and not value.startswith("/"):
            raise InvalidRequest(f"must be an absolute host path or empty (got {value!r})", field="source")
        if not value:
            return ""
        # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux reads it as "/".
        return "/" + posixpath.normpath(value).lstrip("/")

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return normalise_mount_target(value)


class ResourceLimits(_Model):
    """Resource ceilings. ``wall_time`` bounds each exec; ``idle_timeout`` lets a backend suspend the
    session."""

    wall_time: Annotated[Duration | None, _duration_validator("wall_time")] = None
    cpu_count: int | None = None
    memory_mb: int | None = None
    idle_timeout: Annotated[Duration | None, _duration_validator("idle_timeout")] = None
    # Extensions (not in harn):
    pids_max: int | None = None
    tmp_mb: int | None = None
    output_limit_bytes: int | None = None

    @field_validator("cpu_count", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        return _bounded_int(value, "cpu_count", 1, MAX_CPU_COUNT)

    @field_validator("memory_mb", "tmp_mb", mode="before")
    @classmethod
    def _mem(cls, value: Any, info: Any) -> Any:
        return _bounded_int(value, info.field_name, 1, MAX_MEMORY_MB)

    @field_validator("pids_max", mode="before")
    @classmethod
    def _pids(cls, value: Any) -> Any:
        return _bounded_int(value, "pids_max", 1, MAX_PIDS)

    @field_validator("output_limit_bytes", mode="before")
    @classmethod
    def _out(cls, value: Any) -> Any:
        return _bounded_int(value, "output_limit_bytes", 1, MAX_OUTPUT_BYTES)


class SandboxSpec(_Model):
    """The request to provision a session: the runtime lowering of a permission policy.

    ``network_policy`` defaults to deny-all (harn defaults to unrestricted; stockade prefers the safe side
    when a caller says nothing). ``env`` is set for every exec of the session (an extension).
    """

    session_id: SandboxSessionId | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy.deny_all)
    mounts: tuple[FilesystemMount, ...] = ()
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    # Extensions (not in harn):
    env: dict[str, str] = Field(default_factory=dict)
    memory_writable: bool = False
    image: str | None = None
    from_snapshot: str | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise InvalidRequest("must be an object of string keys and values", field="labels")
        for key, val in value.items():
            if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
                raise InvalidRequest(f"key {key!r} must match [A-Za-z0-9][A-Za-z0-9._/-]{{0,127}}",
                                     field="labels")
            if not isinstance(val, str) or len(val) > 1024:
                raise InvalidRequest(f"value of {key!r} must be a string of at most 1024 characters",
                                     field="labels")
            _no_nul(val, "labels")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        return _check_env(value, "env")

    @field_validator("mounts", mode="after")
    @classmethod
    def _mounts(cls, value: tuple[FilesystemMount, ...]) -> tuple[FilesystemMount, ...]:
        seen: set[str] = set()
        for i, mount in enumerate(value):
            if mount.target in seen:
                raise InvalidRequest(f"{mount.target!r} is mounted twice", field=f"mounts.{i}.target")
            seen.add(mount.target)
        return value

    @field_validator("from_snapshot", mode="before")
    @classmethod
    def _snap(cls, value: Any) -> Any:
        if value is None:
            return None
        return validate_session_id(value, "from_snapshot")

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest("must be a non-empty image reference", field="image")
        return _no_nul(value, "image")


def _check_env(value: Any, field: str) -> Any:
    if not isinstance(value, dict):
        raise InvalidRequest("must be an object of string keys and values", field=field)
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            raise InvalidRequest(f"key {key!r} must match [A-Za-z_][A-Za-z0-9_]*", field=field)
        if not isinstance(val, str):
            raise InvalidRequest(f"value of {key!r} must be a string", field=field)
        _no_nul(val, f"{field}.{key}")
    return value


class SandboxState(StrEnum):
    """Lifecycle state of a session."""

    PROVISIONED = "provisioned"
    RUNNING = "running"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"


class ResolvedMount(_Model):
    """A mount resolved to its guest path and, where the guest sees host paths, its host path."""

    target: str
    access: FilesystemAccess
    host_path: str | None = None


class SandboxSession(_Model):
    """A session as seen by callers. ``metadata`` is backend-specific (string to string)."""

    id: SandboxSessionId
    backend: str
    state: SandboxState
    mounts: tuple[ResolvedMount, ...] = ()
    metadata: dict[str, str] = Field(default_factory=dict)


class ExecRequest(_Model):
    """One command to run in a session. ``timeout`` falls back to the spec's ``limits.wall_time``."""

    command: str
    args: tuple[str, ...] = ()
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stdin: str | None = None
    timeout: Annotated[Duration | None, _duration_validator("timeout")] = None

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise InvalidRequest("must be a string", field="command")
        if not value:
            raise InvalidRequest("must not be empty", field="command")
        return _no_nul(value, "command")

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise InvalidRequest("must be a list of strings", field="args")
        for i, arg in enumerate(value):
            if not isinstance(arg, str):
                raise InvalidRequest("must be a list of strings", field=f"args.{i}")
            _no_nul(arg, f"args.{i}")
        return tuple(value)

    @field_validator("cwd", mode="before")
    @classmethod
    def _cwd(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise InvalidRequest("must be a non-empty path", field="cwd")
        return _no_nul(value, "cwd")

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        return _check_env(value, "env")

    @field_validator("stdin", mode="before")
    @classmethod
    def _stdin(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise InvalidRequest("must be a string", field="stdin")
        return value

    @property
    def argv(self) -> list[str]:
        return [self.command, *self.args]


class ExecResult(_Model):
    """The outcome of an exec. A non-zero ``exit_code`` is data, not an error.

    ``exit_code`` is 128+N when the command was killed by signal N (as shells report it). Output that is not
    UTF-8 is decoded with replacement characters.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int
    timed_out: bool = False
    # Extensions (not in harn):
    duration_ms: float | None = None
    oom_killed: bool = False
    truncated: bool = False

    @property
    def success(self) -> bool:
        """True when the command exited 0 and did not time out."""
        return self.exit_code == 0 and not self.timed_out


class SandboxSnapshot(_Model):
    """A handle on captured session state; it outlives the session."""

    session_id: SandboxSessionId
    backend: str
    snapshot_id: str
    metadata: dict[str, str] = Field(default_factory=dict)


class SandboxCapabilities(_Model):
    """What a backend can enforce or do, stated honestly; the conformance suite reads it to set
    expectations."""

    # harn's flags, in harn's order:
    local_process_sandbox: bool = False
    network_policy: bool = False
    snapshot: bool = False
    resume: bool = False
    suspend_on_idle: bool = False
    # stockade's extensions:
    filesystem_isolation: bool = False
    # The guest has pid, ipc and uts namespaces of its own: host processes and the host's hostname are out of its
    # sight. False (``landlock``) is declared, not hidden: the escape suite's cases about exactly that end
    # ``not_applicable`` (anything beyond it, such as a signal reaching a host process, is still an escape).
    process_isolation: bool = False
    live_mounts: bool = False
    memory_snapshot: bool = False
    resource_limits: bool = False
    memory_limit: bool = False
    pids_limit: bool = False
    cpu_limit: bool = False
    network_deny_all: bool = False
    network_unrestricted: bool = False
    egress_log: bool = False
    exec_streaming: bool = False
    persistent_sessions: bool = False
    # True (the contract's default, so peers that never send it keep the contract's meaning): the guest sees its
    # mounts at their targets and has a /tmp of its own. False: the guest sees host paths; each mount is
    # granted in place at ``ResolvedMount.host_path`` and only ``$TMPDIR`` is the session's (``landlock``).
    private_filesystem_view: bool = True
    # True (the contract's default): under deny-all the guest keeps local networking of its own (TCP/UDP to
    # 127.0.0.1, unix sockets by path or abstract name, all inside the sandbox). False (``landlock``): deny-all
    # refuses IP sockets altogether, because without a network namespace the guest's loopback would be the
    # host's, and unix sockets too where a connect() could reach a host daemon's socket; socketpair() works.
    private_loopback: bool = True
    # True (the contract's default): the guest's /proc (mountinfo, mounts, cgroup) names no host path, neither a
    # mount's source nor the backend's own directories. False is declared where some do show: a read-write mount
    # of a host directory is a bind there, and a bind shows its source's path (``bwrap``; ``docker`` and
    # ``podman`` with runc, whose engine shows every mount's source and its own data root). The session's id
    # must not show either way.
    private_mount_sources: bool = True
    # True (the contract's default): a command cannot read the /proc entries (environ, maps, fd links) of the
    # session's own supervisor processes (the guest's init, whatever started the command), which run as another uid
    # or are not dumpable. False is declared where the guest's kernel does not apply that check (``docker`` with
    # gVisor: Debian's runsc lets any uid open them). Another exec's secret reaching a command is an escape either
    # way.
    private_supervisor: bool = True
    # True (the contract's default): a command killed for exceeding ``limits.memory_mb`` leaves the session
    # running, so its next exec works. False is declared where the limit's OOM kill takes the whole sandbox
    # (``docker`` with gVisor, whose processes all live in one host process): the session is then dead.
    oom_keeps_session: bool = True
