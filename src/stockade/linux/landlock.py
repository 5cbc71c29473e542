"""A small binding of Landlock (Linux 5.13+) through raw system calls: ABI detection, rulesets, restrict_self.

Landlock lets an unprivileged process restrict itself and everything it later starts: which paths it may
read, write or execute, which TCP ports it may bind or connect to (ABI 4), and (ABI 6) whether it may signal
or reach abstract unix sockets of processes outside its domain. Rules only ever narrow: once
:func:`restrict_self` ran, nothing the process does widens them.

The system calls (444, 445, 446 on every architecture) are called through ``ctypes``; the PyPI ``landlock``
package covers only the filesystem part. Everything a ruleset would enforce is decided up front by
:func:`plan` for a given ABI, so callers can say exactly what is and is not enforced
(:class:`Enforcement`) before anything is applied.

What each ABI adds (kernel version in brackets):

==== =====================================================================================================
ABI  adds
==== =====================================================================================================
1    filesystem: execute, read/write files, list directories, create/remove entries (5.13); linking or
     renaming a file into another directory is always refused (``EXDEV``)
2    ``REFER``: link/rename across directories where both sides allow it (5.19)
3    ``TRUNCATE``: ``truncate(2)`` and ``O_TRUNC`` (6.2); below 3, ``truncate`` by path is not controlled
4    TCP ``bind``/``connect`` by port (6.7); UDP and other protocols are never covered
5    ``IOCTL_DEV``: ioctl on device files (6.10)
6    scopes: signals and abstract unix sockets limited to the domain (6.12)
7    audit logging flags (6.15); nothing new to enforce
8    restrict all threads at once (7.0); not needed for a fresh child
9    ``RESOLVE_UNIX``: connecting to pathname unix sockets (7.1); below 9, any socket file the process can
     reach by path and whose mode allows it can be connected to
==== =====================================================================================================

Things Landlock never controls (at any ABI known here): ``stat``/path walking (existence, size, owner and
times of any file are visible), ``chdir``, ``chmod``/``chown``/``utimes``/xattrs, UDP, and the contents of
``/proc`` beyond the ptrace-style checks (a domain cannot read ``/proc/<pid>/environ``, ``mem``, ``fd`` or
``root`` of processes outside it, but ``cmdline`` and ``status`` of every process stay readable).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stockade.errors import BackendUnavailable, InvalidRequest, Unsupported

__all__ = [
    "ABI_KNOWN",
    "READ_ONLY",
    "READ_WRITE",
    "Enforcement",
    "FsAccess",
    "NetAccess",
    "PathGrant",
    "Ruleset",
    "RulesetPlan",
    "Scope",
    "abi_version",
    "available_scopes",
    "create_ruleset",
    "grants",
    "handled_fs",
    "handled_net",
    "plan",
    "restrict_self",
]

_BACKEND = "landlock"

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_PR_SET_NO_NEW_PRIVS = 38

ABI_KNOWN = 9
"""The newest ABI this module knows the access rights of; newer kernels are used at this level."""


class FsAccess(enum.IntFlag):
    """Filesystem access rights (``LANDLOCK_ACCESS_FS_*``)."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13  # ABI 2
    TRUNCATE = 1 << 14  # ABI 3
    IOCTL_DEV = 1 << 15  # ABI 5
    RESOLVE_UNIX = 1 << 16  # ABI 9


class NetAccess(enum.IntFlag):
    """Network access rights (``LANDLOCK_ACCESS_NET_*``, ABI 4)."""

    BIND_TCP = 1 << 0
    CONNECT_TCP = 1 << 1


class Scope(enum.IntFlag):
    """IPC scopes (``LANDLOCK_SCOPE_*``, ABI 6): what a domain may not reach outside itself."""

    ABSTRACT_UNIX_SOCKET = 1 << 0
    SIGNAL = 1 << 1


# Rights that make sense on a single file (the kernel refuses directory-only rights in a rule on a file).
_FILE_RIGHTS = (
    FsAccess.EXECUTE
    | FsAccess.WRITE_FILE
    | FsAccess.READ_FILE
    | FsAccess.TRUNCATE
    | FsAccess.IOCTL_DEV
    | FsAccess.RESOLVE_UNIX
)

READ_ONLY = FsAccess.EXECUTE | FsAccess.READ_FILE | FsAccess.READ_DIR
"""Read, list and execute: what a read-only grant gives."""
READ_WRITE = FsAccess(sum(FsAccess))
"""Every right, including creating and removing entries and connecting to unix sockets beneath."""

_FS_BY_ABI = {
    1: FsAccess(sum(a for a in FsAccess if a < FsAccess.REFER)),
    2: FsAccess.REFER,
    3: FsAccess.TRUNCATE,
    5: FsAccess.IOCTL_DEV,
    9: FsAccess.RESOLVE_UNIX,
}


def handled_fs(abi: int) -> FsAccess:
    """The filesystem rights a ruleset of ``abi`` can handle (and so refuse)."""
    return FsAccess(sum(rights for since, rights in _FS_BY_ABI.items() if abi >= since))


def handled_net(abi: int) -> NetAccess:
    return NetAccess.BIND_TCP | NetAccess.CONNECT_TCP if abi >= 4 else NetAccess(0)


def available_scopes(abi: int) -> Scope:
    return Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL if abi >= 6 else Scope(0)


# ------------------------------------------------------------------------------------------------ syscalls

_libc: ctypes.CDLL | None = None


def _syscall(number: int, *args: Any) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The Landlock ABI of the running kernel; 0 when Landlock is absent or disabled (not in ``lsm=``)."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


# -------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class PathGrant:
    """``access`` beneath ``path`` (a directory) or on ``path`` (a file). An ``optional`` grant whose path
    does not exist is skipped; a missing required one is an error."""

    path: str
    access: FsAccess
    optional: bool = False


@dataclass(frozen=True)
class Ruleset:
    """What a confined process may do. Everything not granted is refused, as far as the ABI reaches.

    ``tcp_connect_ports`` / ``tcp_bind_ports``: the only TCP ports ``connect``/``bind`` may use (empty:
    none). ``restrict_tcp`` false leaves TCP to other layers (e.g. seccomp or a network namespace), which is
    the only way to run on ABI < 4. ``scope_signals`` / ``scope_abstract_unix``: keep signals and abstract unix
    sockets inside the domain where the ABI allows it.
    """

    paths: tuple[PathGrant, ...]
    tcp_connect_ports: tuple[int, ...] = ()
    tcp_bind_ports: tuple[int, ...] = ()
    restrict_tcp: bool = True
    scope_signals: bool = True
    scope_abstract_unix: bool = True

    def __post_init__(self) -> None:
        for port in (*self.tcp_connect_ports, *self.tcp_bind_ports):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise InvalidRequest(f"must be a TCP port 0..65535 (got {port!r})", field="landlock.port")
        for grant in self.paths:
            if not grant.path.startswith("/"):
                raise InvalidRequest(f"must be an absolute path (got {grant.path!r})", field="landlock.path")


@dataclass(frozen=True)
class Enforcement:
    """What a ruleset enforces on a kernel of ``abi``: the rights it handles, and what stays uncontrolled."""

    abi: int
    fs: FsAccess
    net: NetAccess
    scopes: Scope
    gaps: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "abi": self.abi,
            "fs": [a.name for a in FsAccess if a in self.fs],
            "net": [a.name for a in NetAccess if a in self.net],
            "scopes": [s.name for s in Scope if s in self.scopes],
            "gaps": list(self.gaps),
        }


@dataclass(frozen=True)
class RulesetPlan:
    """A ruleset resolved against an ABI: the attribute values to create it with."""

    ruleset: Ruleset
    enforcement: Enforcement


def plan(ruleset: Ruleset, abi: int | None = None) -> RulesetPlan:
    """Decide what ``ruleset`` enforces at ``abi`` (default: the running kernel's, capped at
    :data:`ABI_KNOWN`).

    Raises :class:`Unsupported` when the ruleset asks for something the ABI cannot enforce: TCP port rules
    below ABI 4. Raises :class:`BackendUnavailable` when Landlock is absent.
    """
    kernel_abi = abi_version() if abi is None else abi
    if kernel_abi < 1:
        raise BackendUnavailable(
            _BACKEND, "the kernel has no Landlock (Linux 5.13+ with 'landlock' in the lsm= boot parameter)"
        )
    level = min(kernel_abi, ABI_KNOWN)
    net = handled_net(level) if ruleset.restrict_tcp else NetAccess(0)
    if ruleset.restrict_tcp and (ruleset.tcp_connect_ports or ruleset.tcp_bind_ports) and not net:
        raise Unsupported(
            _BACKEND, "tcp port rules", f"Landlock ABI {kernel_abi} cannot filter TCP by port (needs ABI 4, Linux 6.7)"
        )
    scopes = Scope(0)
    if ruleset.scope_signals:
        scopes |= available_scopes(level) & Scope.SIGNAL
    if ruleset.scope_abstract_unix:
        scopes |= available_scopes(level) & Scope.ABSTRACT_UNIX_SOCKET
    fs = handled_fs(level)
    gaps = ["stat, chdir, chmod, chown, utimes and xattrs are not controlled at any ABI"]
    if level < 2:
        gaps.append("no REFER right (ABI < 2): linking or renaming across directories is always refused")
    if level < 3:
        gaps.append("truncate(2) by path is not controlled (ABI < 3)")
    if not net:
        gaps.append("TCP bind/connect are not controlled by Landlock" + (" (ABI < 4)" if ruleset.restrict_tcp else ""))
    gaps.append("UDP, raw and other non-TCP sockets are not controlled by Landlock")
    if level < 6:
        gaps.append("signals and abstract unix sockets reach outside the domain (ABI < 6)")
    if level < 9:
        gaps.append("pathname unix sockets outside the grants can be connected to (ABI < 9)")
    return RulesetPlan(ruleset, Enforcement(kernel_abi, fs, net, scopes, tuple(gaps)))


def _open_path(grant: PathGrant) -> int | None:
    try:
        return os.open(grant.path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if grant.optional:
            return None
        raise InvalidRequest(f"{grant.path!r} does not exist", field="landlock.path") from None
    except OSError as exc:
        if grant.optional:
            return None
        raise InvalidRequest(f"cannot open {grant.path!r}: {exc.strerror}", field="landlock.path") from None


def create_ruleset(ruleset: Ruleset, abi: int | None = None) -> tuple[int, Enforcement]:
    """Create the kernel ruleset for ``ruleset``; returns its fd (close-on-exec; pass it on explicitly) and
    what it enforces. The fd can be applied by any number of processes with :func:`restrict_self`."""
    resolved = plan(ruleset, abi)
    enf = resolved.enforcement
    attr = _RulesetAttr(int(enf.fs), int(enf.net), int(enf.scopes))
    # Older kernels reject a struct larger than they know unless the extra bytes are zero; pass only the
    # fields this ABI has, so a non-zero field a kernel lacks can never be silently ignored.
    size = 8 if enf.abi < 4 else 16 if enf.abi < 6 else 24
    try:
        fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    except OSError as exc:
        raise BackendUnavailable(_BACKEND, f"landlock_create_ruleset failed: {exc.strerror}") from exc
    try:
        os.set_inheritable(fd, False)
        for grant in ruleset.paths:
            _add_path_rule(fd, grant, enf.fs)
        if enf.net:
            for port in ruleset.tcp_connect_ports:
                _add_port_rule(fd, NetAccess.CONNECT_TCP, port)
            for port in ruleset.tcp_bind_ports:
                _add_port_rule(fd, NetAccess.BIND_TCP, port)
    except BaseException:
        os.close(fd)
        raise
    return fd, enf


def _add_path_rule(ruleset_fd: int, grant: PathGrant, handled: FsAccess) -> None:
    path_fd = _open_path(grant)
    if path_fd is None:
        return
    try:
        access = grant.access & handled
        if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
            access &= _FILE_RIGHTS
        if not access:
            return
        attr = _PathBeneathAttr(int(access), path_fd)
        try:
            _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(attr),
                     ctypes.c_uint32(0))
        except OSError as exc:
            raise BackendUnavailable(_BACKEND, f"landlock_add_rule({grant.path!r}) failed: {exc.strerror}") from exc
    finally:
        os.close(path_fd)


def _add_port_rule(ruleset_fd: int, access: NetAccess, port: int) -> None:
    attr = _NetPortAttr(int(access), port)
    try:
        _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_NET_PORT), ctypes.byref(attr),
                 ctypes.c_uint32(0))
    except OSError as exc:
        raise BackendUnavailable(_BACKEND, f"landlock_add_rule(port {port}) failed: {exc.strerror}") from exc


def restrict_self(ruleset_fd: int, *, no_new_privs: bool = True) -> None:
    """Confine the calling thread (and everything it starts) by the ruleset; irreversible.

    Sets no_new_privs first (Landlock requires it of processes without CAP_SYS_ADMIN). Call it in a
    single-threaded process, e.g. a forked child before ``exec``.
    """
    if no_new_privs:
        libc = ctypes.CDLL(None, use_errno=True)
        ulong = ctypes.c_ulong
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
            err = ctypes.get_errno()
            raise BackendUnavailable(_BACKEND, f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")
    try:
        _syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
    except OSError as exc:
        raise BackendUnavailable(_BACKEND, f"landlock_restrict_self failed: {exc.strerror}") from exc


def grants(paths: Iterable[str], access: FsAccess, *, optional: bool = False) -> tuple[PathGrant, ...]:
    """``PathGrant`` for each path with the same access."""
    return tuple(PathGrant(p, access, optional) for p in paths)
