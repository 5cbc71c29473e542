"""The bubblewrap command line of a session, and the guest files generated for it.

Every choice here closes a known hole (machine-notes, "Things that bite"): ``--cap-drop ALL`` because bwrap run
as root keeps capabilities; ``--remount-ro /`` because bwrap's root tmpfs is otherwise writable; inherited fds
are closed by the caller (``close_fds``) and only the agent socket, the seccomp program and the ready pipe are
passed; ``--disable-userns`` and the seccomp filter both stop nested user namespaces.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ...models import FilesystemAccess

__all__ = [
    "GUEST_AGENT", "GUEST_HOME", "GUEST_UID", "LaunchPlan", "bwrap_argv", "data_fd", "find_guest_python",
    "guest_files",
]

GUEST_UID = 1000
GUEST_HOME = "/tmp"
GUEST_AGENT = "/run/stockade/agent.py"
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

# /etc files a program needs that carry no secrets; missing ones are skipped (--ro-bind-try).
_ETC_FILES = (
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
)
# Kernel interfaces that leak host state or are only meant for the host's root (masked as Docker does).
_MASKED_PROC = (
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/kcore",
    "/proc/kallsyms",
    "/proc/kmsg",
    "/proc/sysrq-trigger",
    "/proc/latency_stats",
)
_MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class GuestMount:
    host_path: str
    target: str
    access: FilesystemAccess
    # For a read-write directory the session owns: an empty directory beside it, which lets the mount helper
    # present it as an overlay's upper layer (no host path in the guest's mountinfo; see linux/mounts.py).
    workdir: str | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """Everything ``bwrap_argv`` needs; built by the backend from a spec and the session's directories."""

    state_dir: Path
    python: str
    python_binds: tuple[str, ...]
    mounts: tuple[GuestMount, ...]
    tmp_bytes: int
    hostname: str
    listen_fd: int
    ready_fd: int
    seccomp_fd: int
    info_fd: int
    staging_dir: Path | None = None
    # (guest path, fd to read its content from): the files of guest_files(), passed to bwrap.
    files: tuple[tuple[str, int], ...] = ()
    # Only for the backend's explicit ``share_host_network`` option with an unrestricted policy.
    share_host_network: bool = False


def find_guest_python() -> tuple[str, tuple[str, ...]]:
    """The interpreter that runs the agent inside the guest, and the host paths it needs bound.

    The system ``/usr/bin/python3`` needs nothing extra (``/usr`` is in every view). Otherwise the host's own
    interpreter prefix is bound read-only: it holds the stdlib, not user data.
    """
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate, ()
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, (prefix,)


def guest_files(hostname: str, share_host_network: bool) -> dict[str, bytes]:
    """The files generated for the guest (its /etc entries and the agent), by guest path.

    They reach the guest as copies on its own root tmpfs (``--file``), not as binds of host files: a bind shows
    its host path in the guest's mountinfo, and these would have named the session's state directory.
    """
    files = {
        "/etc/passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{GUEST_UID}:{GUEST_UID}:sandbox:{GUEST_HOME}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "/etc/group": f"root:x:0:\nsandbox:x:{GUEST_UID}:\nnogroup:x:65534:\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "/etc/hostname": f"{hostname}\n",
        # The egress gateway's DNS stub when the session has egress; in a deny-all guest nothing answers
        # there, and an explicit loopback entry fails fast.
        "/etc/resolv.conf": "nameserver 127.0.0.53\noptions timeout:1 attempts:1\n",
    }
    if share_host_network:
        del files["/etc/resolv.conf"]  # the host's resolver is the one reachable then (bound below)
    out = {guest: text.encode() for guest, text in files.items()}
    out[GUEST_AGENT] = _agent_source()
    return out


@functools.cache
def _agent_source() -> bytes:
    return Path(__file__).with_name("_agent.py").read_bytes()


def data_fd(data: bytes) -> int:
    """A sealed-size memfd holding ``data``, positioned at its start (bubblewrap reads ``--file`` to EOF)."""
    fd = os.memfd_create("stockade-guest-file", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def bwrap_argv(plan: LaunchPlan) -> list[str]:
    """The full ``bwrap`` argv for a session whose agent listens on ``plan.listen_fd``."""
    argv = [
        "bwrap",
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *(() if plan.share_host_network else ("--unshare-net",)),
        "--disable-userns",
        "--uid", str(GUEST_UID),
        "--gid", str(GUEST_UID),
        "--hostname", plan.hostname,
        "--cap-drop", "ALL",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
        "--setenv", "PATH", GUEST_PATH,
        "--setenv", "HOME", GUEST_HOME,
        "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]
    for name in _MERGED_USR:
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), f"/{name}"]
    for path in _ETC_FILES:
        argv += ["--ro-bind-try", path, path]
    if plan.share_host_network:
        argv += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
    for prefix in plan.python_binds:
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--proc", "/proc",
        # Launched by root, the guest's uid maps to the host's uid 0: host-wide sysctls under /proc/sys would
        # be writable (no capability is needed for most), and root-only kernel files readable.
        "--ro-bind", "/proc/sys", "/proc/sys",
        *(arg for path in _MASKED_PROC if os.path.exists(path) for arg in ("--ro-bind", "/dev/null", path)),
        "--dev", "/dev",
        # bwrap's /dev is a tmpfs without a size limit: bound /dev/shm like /tmp, and make the rest read-only.
        "--size", str(plan.tmp_bytes), "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--size", str(plan.tmp_bytes), "--tmpfs", "/tmp",
        "--dir", "/var/tmp",
        "--dir", "/run/stockade",
    ]
    for guest, fd in plan.files:
        argv += ["--perms", "0444", "--file", str(fd), guest]
    for mount in plan.mounts:
        flag = "--bind" if mount.access is FilesystemAccess.READ_WRITE else "--ro-bind"
        argv += [flag, mount.host_path, mount.target]
    argv += [
        "--remount-ro", "/",
        "--chdir", GUEST_HOME,
        "--seccomp", str(plan.seccomp_fd),
        "--info-fd", str(plan.info_fd),
        "--",
        plan.python, "-I", "-S", "-B", GUEST_AGENT, str(plan.listen_fd), str(plan.ready_fd),
    ]
    return argv

