"""Pure lowering of a session's layout into what the kernel enforces: the Landlock ruleset, the seccomp
profile, the guest environment and the translation of guest paths to host paths.

Kept free of I/O so each piece has its own test, and so that network policies beyond deny-all are a small
addition: :func:`session_ruleset` and :func:`seccomp_network` take the one TCP port (the egress gateway's on
127.0.0.1) that a ``limited`` session may connect to.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from ...linux import landlock
from ...linux.seccomp import NetworkFamilies
from ...models import MEMORY_MOUNT, OUTPUTS_MOUNT, FilesystemAccess

__all__ = [
    "GUEST_PATH",
    "SYSTEM_DEVICES",
    "SYSTEM_READ_ONLY",
    "MountPlan",
    "SessionPaths",
    "guest_env",
    "resolve_cwd",
    "seccomp_network",
    "session_ruleset",
    "translate",
]

GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

# What a program needs to start and run: the system's executables and libraries, and the few /etc files that
# carry no secrets (the same list the bwrap backend binds). Missing ones are skipped. /etc/passwd, group,
# hosts and hostname are left out on purpose: they describe the host, and there is no private copy to give.
SYSTEM_READ_ONLY: tuple[str, ...] = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
    "/etc/ssl/openssl.cnf",
    "/etc/bash.bashrc",
    "/etc/profile",
    "/etc/inputrc",
    "/etc/python3",
    "/etc/python3.11",
    # Programs read their own /proc/self; other processes' environ, mem, fd and root stay closed (Landlock's
    # ptrace rule), their cmdline and status do not (see docs/landlock.md).
    "/proc",
    # nproc / os.cpu_count() read the online CPU list here.
    "/sys/devices/system/cpu",
)

SYSTEM_DEVICES: tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

_DEVICE_ACCESS = (
    landlock.FsAccess.READ_FILE | landlock.FsAccess.WRITE_FILE | landlock.FsAccess.TRUNCATE
    | landlock.FsAccess.IOCTL_DEV
)


@dataclass(frozen=True)
class MountPlan:
    """A mount of the spec (or a canonical one) as this backend realises it: a host directory or file,
    granted in place, that the guest reaches at ``host_path``; ``target`` is the guest path it stands for."""

    target: str
    host_path: str
    access: FilesystemAccess
    owned: bool = False


@dataclass(frozen=True)
class SessionPaths:
    """The host directories of one session."""

    root: str
    home: str
    tmp: str
    mounts: tuple[MountPlan, ...]

    def mount(self, target: str) -> MountPlan:
        for plan in self.mounts:
            if plan.target == target:
                return plan
        raise KeyError(target)

    @property
    def outputs(self) -> str:
        return self.mount(OUTPUTS_MOUNT).host_path

    @property
    def memory(self) -> str:
        return self.mount(MEMORY_MOUNT).host_path


def session_ruleset(paths: SessionPaths, *, connect_port: int | None = None) -> landlock.Ruleset:
    """The Landlock ruleset of a session: the system read-only, devices usable, home and TMPDIR and
    read-write mounts fully writable, read-only mounts readable; nothing else.

    ``connect_port`` None: no TCP bind or connect at all. A port: TCP connect to that port only (the egress
    gateway's); Landlock cannot tell addresses apart, so this must go with a seccomp profile that keeps UDP
    and raw sockets out (:func:`seccomp_network`) and a gateway that listens on loopback only.
    """
    grants = [
        *landlock.grants(SYSTEM_READ_ONLY, landlock.READ_ONLY, optional=True),
        *landlock.grants(SYSTEM_DEVICES, _DEVICE_ACCESS, optional=True),
        landlock.PathGrant(paths.root, landlock.READ_ONLY),
        landlock.PathGrant(paths.home, landlock.READ_WRITE),
        landlock.PathGrant(paths.tmp, landlock.READ_WRITE),
    ]
    for plan in paths.mounts:
        access = landlock.READ_WRITE if plan.access is FilesystemAccess.READ_WRITE else landlock.READ_ONLY
        grants.append(landlock.PathGrant(plan.host_path, access))
    ports = () if connect_port is None else (connect_port,)
    return landlock.Ruleset(paths=tuple(grants), tcp_connect_ports=ports)


def seccomp_network(connect_port: int | None = None) -> NetworkFamilies:
    """Socket families the session may create: under deny-all only connected unix pairs (``socketpair``), so
    UDP, raw, netlink, packet, vsock and TCP are refused, and so is every unix socket that could be connected
    to a path or abstract name: Landlock controls ``connect()`` to a host daemon's pathname socket only from
    ABI 9 (not used here yet), and a guest running with the caller's uid would reach whatever that uid may
    (``docker.sock`` for a member of the docker group). TCP and unix when a gateway port is allowed."""
    return "pair" if connect_port is None else "inet_tcp"


def translate(path: str, mounts: tuple[MountPlan, ...]) -> str:
    """A guest path under a mount target rewritten to the host path the guest reaches it at; any other path
    unchanged. The longest matching target wins."""
    for plan in sorted(mounts, key=lambda p: len(p.target), reverse=True):
        if path == plan.target:
            return plan.host_path
        if path.startswith(plan.target + "/"):
            return plan.host_path + path[len(plan.target) :]
    return path


def resolve_cwd(cwd: str | None, paths: SessionPaths) -> str:
    """The host directory an exec starts in: home by default, relative paths under home, mount targets
    translated."""
    if cwd is None:
        return paths.home
    if not cwd.startswith("/"):
        return posixpath.normpath(posixpath.join(paths.home, cwd))
    return translate(cwd, paths.mounts)


def guest_env(paths: SessionPaths, *declared: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of an exec: a minimal base plus the declared variables (later ones win), with
    values that are guest paths under a mount translated to host paths. Nothing of the host's comes in."""
    env = {
        "PATH": GUEST_PATH,
        "HOME": paths.home,
        "LANG": "C.UTF-8",
        "TMPDIR": paths.tmp,
        "STOCKADE_MEMORY_DIR": paths.memory,
        "STOCKADE_OUTPUTS_DIR": paths.outputs,
        "HARN_MEMORY_DIR": paths.memory,
        "HARN_OUTPUTS_DIR": paths.outputs,
    }
    for mapping in declared:
        for key, value in mapping.items():
            env[key] = translate(value, paths.mounts) if value.startswith("/") else value
    return env
