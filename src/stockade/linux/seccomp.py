"""The seccomp filter every local sandbox runs under.

A deny list on top of a default-allow policy, compiled with libseccomp (through the PyPI package
``pyseccomp``) into a classic BPF program. The program is used two ways: handed to ``bwrap --seccomp FD``
(:func:`bpf_fd`) or loaded into the current process before ``exec`` (:func:`apply_to_current_process`,
:func:`preexec_loader`).

What the default profile refuses (design section 3: at least as strict as Docker's default profile for the
dangerous calls):

* every call in :data:`BLOCKED_SYSCALLS` fails with ``EPERM``; the ptrace family
  (:data:`PTRACE_SYSCALLS`) only while ``allow_ptrace`` is false;
* ``clone3`` fails with ``ENOSYS`` (:data:`ENOSYS_SYSCALLS`);
* ``clone`` with any ``CLONE_NEW*`` flag fails with ``EPERM``;
* ``ioctl`` with ``TIOCSTI`` or ``TIOCLINUX`` fails with ``EPERM``;
* ``personality`` with anything but 0, ``PER_LINUX32``, ``UNAME26``, both, or the query value ``0xffffffff``
  fails with ``EPERM``;
* ``mknod`` / ``mknodat`` of a character or block device fails with ``EPERM`` (fifos and sockets pass);
* ``socket`` / ``socketpair`` per :attr:`SeccompProfile.network` (see :data:`NetworkFamilies`): a family
  that is not allowed fails with ``EAFNOSUPPORT``, a type or protocol that is not allowed with ``EPERM``
  (``EPROTOTYPE`` for a datagram ``socketpair`` under ``"pair"``).

The same rules are compiled for every ABI the kernel accepts from this machine (on x86_64: x86_64, i386 and
x32); system calls an ABI lacks are skipped for that ABI. A call from any other ABI kills the process.

Known gap, i386 only: 32-bit code creates sockets through ``socketcall(2)``, whose arguments sit in user
memory where seccomp cannot read them. With ``network="inet"`` socket creation through that ABI is not
filtered at all (so 32-bit code can open e.g. netlink sockets); with the other settings it is
refused entirely (``socketcall(SYS_SOCKET / SYS_SOCKETPAIR)`` fails with ``EAFNOSUPPORT``, even for
``AF_UNIX``), while the direct i386 ``socket`` call is filtered like on x86_64.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import io
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, get_args

from stockade.errors import BackendUnavailable, InvalidRequest

__all__ = [
    "BLOCKED_SYSCALLS",
    "ENOSYS_SYSCALLS",
    "PTRACE_SYSCALLS",
    "NetworkFamilies",
    "SeccompProfile",
    "apply_to_current_process",
    "bpf_fd",
    "compile_bpf",
    "default_profile",
    "preexec_loader",
]

NetworkFamilies = Literal["pair", "unix", "inet", "inet_tcp"]
"""Which sockets ``socket(2)`` may create.

``"pair"``: none; only ``socketpair(AF_UNIX)`` of type ``SOCK_STREAM`` or ``SOCK_SEQPACKET`` (a connected
pair that cannot reach any other socket: a datagram pair could ``sendto()`` a host daemon's path, so it is
refused). ``"unix"``: ``AF_UNIX`` only. ``"inet"``: ``AF_UNIX``, ``AF_INET`` and ``AF_INET6``, any type.
``"inet_tcp"``: ``AF_UNIX``, plus ``AF_INET``/``AF_INET6`` with ``SOCK_STREAM`` and protocol 0 or
``IPPROTO_TCP`` only (no UDP, raw, SCTP or MPTCP: the TCP rules of Landlock then cover all of IP).
Every other family (netlink, packet, vsock, ...) is refused in all of them.
"""

_BACKEND = "seccomp"

PTRACE_SYSCALLS: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "kcmp",
    "pidfd_getfd",
)
"""Reading or steering another process: refused unless ``allow_ptrace`` (Docker: CAP_SYS_PTRACE)."""

_ALWAYS_BLOCKED: tuple[str, ...] = (
    # mount table and root directory
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # namespaces: a fresh user namespace hands out capabilities again
    "setns",
    "unshare",
    # the kernel keyring is not namespaced
    "keyctl",
    "add_key",
    "request_key",
    # large kernel attack surface, rarely needed by ordinary programs
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    # the machine as a whole
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "lookup_dcookie",
    "nfsservctl",
    "_sysctl",
    "uselib",
    "vhangup",
    "sethostname",
    "setdomainname",
    # file handles bypass path-based checks (the "shocker" container escape)
    "open_by_handle_at",
    "name_to_handle_at",
    # the system clock is not namespaced
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    # direct hardware / legacy mode access
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
)

BLOCKED_SYSCALLS: tuple[str, ...] = _ALWAYS_BLOCKED + PTRACE_SYSCALLS
"""System calls the default profile refuses with ``EPERM`` whatever their arguments."""

ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3", "openat2")
"""Refused with ``ENOSYS``: their flags or modes sit in memory where seccomp cannot see them, and ``ENOSYS``
makes libc fall back to ``clone`` / ``openat``, whose arguments are filtered (Docker does the same for
``clone3``)."""

# Names that exist only on some architectures or only in old kernels: their absence from libseccomp's tables
# is no reason to refuse to build a filter. Any other unknown name means libseccomp is too old to know a call
# the kernel has, and a filter built without it would silently be weaker.
_OPTIONAL = frozenset(
    {
        "umount",
        "fchmodat2",
        "stime",
        "clock_settime64",
        "clock_adjtime64",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "nfsservctl",
        "_sysctl",
        "uselib",
        "lookup_dcookie",
        "iopl",
        "ioperm",
        "vm86",
        "vm86old",
        "socketcall",
    }
)

_AF_UNIX = 1
_AF_INET = 2
_AF_INET6 = 10
_SOCK_STREAM = 1
_SOCK_SEQPACKET = 5
_IPPROTO_TCP = 6
_SYS_SOCKET = 1  # socketcall(2) call numbers
_SYS_SOCKETPAIR = 8

_NAMESPACE_CLONE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    # CLONE_NEWTIME (0x80) is absent on purpose: in clone(2) those bits are the exit signal, the kernel never
    # reads a time-namespace request from them (only unshare and clone3 take it, and both are refused).
)

_TIOCSTI = 0x5412  # pushes bytes into the terminal's input queue: types commands into the parent's shell
_TIOCLINUX = 0x541C  # the same through the Linux console's selection paste, among others

_LOW32 = 0xFFFFFFFF

# personality(2) values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and the query.
_PERSONALITY_ALLOWED = frozenset({0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF})
_PERSONALITY_FREE_BITS = (3, 17)


def _personality_denials() -> list[tuple[int, int]]:
    """``(mask, value)`` pairs whose union is every 32-bit personality outside the allowed set.

    libseccomp allows one comparison per argument in a rule, so "not one of five values" has to be a union of
    single masked comparisons. Each pair says "bit i is set and bit j is clear" with i outside {3, 17}. Any
    refused value has such a bit i set and, not being 0xffffffff, some clear bit; the run of set bits through
    i ends at a set bit e followed by a clear bit e+1 (cyclically): the pair (e, e+1) covers it, or (2, 4) and
    (16, 18) when the run ends at bit 3 or 17. The allowed values have no set bit outside {3, 17} or no clear
    bit, so no pair covers them.
    """
    pairs = [(i, (i + 1) % 32) for i in range(32) if i not in _PERSONALITY_FREE_BITS]
    pairs += [(2, 4), (16, 18)]
    return [((1 << i) | (1 << j), 1 << i) for i, j in pairs]


@dataclass(frozen=True)
class SeccompProfile:
    """What the filter lets through; see the module docstring for everything it always refuses."""

    network: NetworkFamilies = "inet"
    allow_ptrace: bool = False

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` when a field holds a value the type does not allow."""
        if self.network not in get_args(NetworkFamilies):
            allowed = ", ".join(repr(v) for v in get_args(NetworkFamilies))
            raise InvalidRequest(f"must be one of {allowed}, not {self.network!r}", field="seccomp.network")
        if not isinstance(self.allow_ptrace, bool):
            raise InvalidRequest("must be a bool", field="seccomp.allow_ptrace")


def default_profile(network: NetworkFamilies = "inet") -> SeccompProfile:
    """The profile sandboxes get unless told otherwise: no ptrace, sockets per ``network``."""
    profile = SeccompProfile(network=network)
    profile.validate()
    return profile


def _libseccomp() -> Any:
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(
            _BACKEND,
            f"libseccomp cannot be loaded ({exc}); install the Python package 'pyseccomp' and the system "
            "library (Debian: apt-get install libseccomp2)",
        ) from exc
    module: ModuleType = pyseccomp
    return module


def _arches(sc: Any) -> list[int]:
    native = int(sc.system_arch())
    compat = {
        int(sc.Arch.X86_64): [int(sc.Arch.X86), int(sc.Arch.X32)],
        int(sc.Arch.AARCH64): [int(sc.Arch.ARM)],
    }
    return [native, *compat.get(native, [])]


class _ArchRules:
    """Adds rules to the filter of one ABI, skipping system calls that ABI does not have."""

    def __init__(self, sc: Any, arch: int) -> None:
        self.sc = sc
        self.arch = arch
        self.is_x86 = arch == int(sc.Arch.X86)
        self.filter = sc.SyscallFilter(sc.ALLOW)
        if arch != int(sc.system_arch()):
            self.filter.add_arch(arch)
            self.filter.remove_arch(sc.Arch.NATIVE)
        # A wrong-ABI call is an attack or a bug; killing just the thread could leave a hung process.
        self.filter.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)

    def has(self, name: str) -> bool:
        return int(self.sc.resolve_syscall(self.arch, name)) >= 0

    def deny(self, err: int, name: str, *args: Any) -> None:
        if self.has(name) or (self.is_x86 and name in ("socket", "socketpair")):
            self.filter.add_rule(self.sc.ERRNO(err), name, *args)

    def arg(self, index: int, op: str, a: int, b: int | None = None) -> Any:
        sc = self.sc
        code = {"eq": sc.EQ, "lt": sc.LT, "gt": sc.GT, "masked_eq": sc.MASKED_EQ}[op]
        return sc.Arg(index, code, a) if b is None else sc.Arg(index, code, a, b)


def _outside(rules: _ArchRules, index: int, allowed: Iterable[int]) -> Iterator[Any]:
    """Single comparisons whose union is every value of argument ``index`` outside the set ``allowed``."""
    values = sorted(set(allowed))
    if values[0] > 0:
        yield rules.arg(index, "lt", values[0])
    for low, high in itertools.pairwise(values):
        for gap in range(low + 1, high):
            yield rules.arg(index, "eq", gap)
    yield rules.arg(index, "gt", values[-1])


def _add_socket_rules(rules: _ArchRules, network: NetworkFamilies) -> None:
    if rules.is_x86:
        if network == "inet":
            # libseccomp turns any argument rule on an i386 socket call into a refusal of the whole
            # socketcall(SYS_SOCKET), which would cut 32-bit programs off the network: leave i386 unfiltered.
            return
        # Added first so these errnos win over the ones libseccomp derives from the socket rules below.
        for call in (_SYS_SOCKET, _SYS_SOCKETPAIR):
            rules.deny(errno.EAFNOSUPPORT, "socketcall", rules.arg(0, "eq", call))

    if network == "pair":
        rules.deny(errno.EAFNOSUPPORT, "socket")
        # The low nibble of the type is the socket type (the rest is SOCK_NONBLOCK/SOCK_CLOEXEC).
        for sock_type in range(16):
            if sock_type not in (_SOCK_STREAM, _SOCK_SEQPACKET):
                rules.deny(errno.EPROTOTYPE, "socketpair", rules.arg(0, "eq", _AF_UNIX),
                           rules.arg(1, "masked_eq", 0xF, sock_type))
    else:
        families = [_AF_UNIX] if network == "unix" else [_AF_UNIX, _AF_INET, _AF_INET6]
        for cmp in _outside(rules, 0, families):
            rules.deny(errno.EAFNOSUPPORT, "socket", cmp)
    # socketpair creates sockets without socket(): only AF_UNIX implements it usefully (TIPC does too).
    for cmp in _outside(rules, 0, [_AF_UNIX]):
        rules.deny(errno.EAFNOSUPPORT, "socketpair", cmp)

    if network == "inet_tcp":
        for family in (_AF_INET, _AF_INET6):
            same_family = rules.arg(0, "eq", family)
            # The type's low nibble is the socket type, the rest are SOCK_NONBLOCK/SOCK_CLOEXEC: these four
            # masks cover every nibble except SOCK_STREAM (1).
            for mask, value in ((0xF, 0), (0xE, 2), (0xC, 4), (0x8, 8)):
                rules.deny(errno.EPERM, "socket", same_family, rules.arg(1, "masked_eq", mask, value))
            for cmp in _outside(rules, 2, [0, _IPPROTO_TCP]):
                rules.deny(errno.EPERM, "socket", same_family, cmp)


def _add_rules(rules: _ArchRules, profile: SeccompProfile) -> None:
    blocked = _ALWAYS_BLOCKED if profile.allow_ptrace else BLOCKED_SYSCALLS
    for name in blocked:
        rules.deny(errno.EPERM, name)
    for name in ENOSYS_SYSCALLS:
        rules.deny(errno.ENOSYS, name)

    for flag in _NAMESPACE_CLONE_FLAGS:
        rules.deny(errno.EPERM, "clone", rules.arg(0, "masked_eq", flag, flag))

    # The kernel reads the request as 32 bits: compare only the low half so high garbage cannot hide it.
    for request in (_TIOCSTI, _TIOCLINUX):
        rules.deny(errno.EPERM, "ioctl", rules.arg(1, "masked_eq", _LOW32, request))

    for mask, value in _personality_denials():
        rules.deny(errno.EPERM, "personality", rules.arg(0, "masked_eq", mask, value))

    _add_socket_rules(rules, profile.network)
    _add_setid_rules(rules)
    _add_device_rules(rules)


# Where each call takes its mode: a guest must not create set-user-ID or set-group-ID files. Its uid may map to
# a host uid that others trust (root, when root launched the sandbox), and through a read-write mount such a
# file would be a privilege escalation waiting on the host for someone to run it. Unprivileged chmod needs no
# capability for this, so only the filter can stop it (it refuses, EPERM; plain modes pass).
_MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1, "open": 2, "openat": 3}
_S_ISUID, _S_ISGID = 0o4000, 0o2000


def _add_setid_rules(rules: _ArchRules) -> None:
    for name, index in _MODE_ARG.items():
        for bit in (_S_ISUID, _S_ISGID):
            rules.deny(errno.EPERM, name, rules.arg(index, "masked_eq", bit, bit))


# Device nodes: without CAP_MKNOD the kernel refuses them anyway, but gVisor's Sentry lets any uid make one in
# its own file systems (escape.fs.mknod). Fifos, sockets and regular files stay allowed.
_MKNOD_MODE_ARG = {"mknod": 1, "mknodat": 2}
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000


def _add_device_rules(rules: _ArchRules) -> None:
    for name, index in _MKNOD_MODE_ARG.items():
        for kind in (_S_IFCHR, _S_IFBLK):
            rules.deny(errno.EPERM, name, rules.arg(index, "masked_eq", _S_IFMT, kind))


def _check_names(sc: Any, arches: list[int]) -> None:
    names = {*BLOCKED_SYSCALLS, *ENOSYS_SYSCALLS, "clone", "ioctl", "personality", "socket", "socketpair"}
    for name in sorted(names - _OPTIONAL):
        if all(int(sc.resolve_syscall(arch, name)) == -1 for arch in arches):
            raise BackendUnavailable(
                _BACKEND,
                f"the installed libseccomp does not know the system call {name!r}; upgrade libseccomp "
                "(2.5.4 or later) so the filter can refuse it",
            )


@functools.lru_cache(maxsize=16)
def _compile(profile: SeccompProfile) -> bytes:
    sc = _libseccomp()
    arches = _arches(sc)
    _check_names(sc, arches)
    try:
        filters = []
        for arch in arches:
            rules = _ArchRules(sc, arch)
            _add_rules(rules, profile)
            filters.append(rules.filter)
        combined = filters[0]
        for other in filters[1:]:
            combined.merge(other)
        fd = os.memfd_create("stockade-seccomp-build", os.MFD_CLOEXEC)
        with io.FileIO(fd, "r+") as out:
            combined.export_bpf(out)
            out.seek(0)
            program = out.read()
    except OSError as exc:
        raise BackendUnavailable(_BACKEND, f"libseccomp could not build the filter: {exc}") from exc
    if not program or len(program) % 8:
        raise BackendUnavailable(_BACKEND, f"libseccomp produced a malformed program ({len(program)} bytes)")
    return program


def compile_bpf(profile: SeccompProfile) -> bytes:
    """The raw classic-BPF program (``struct sock_filter[]``) for ``profile``: what ``bwrap --seccomp`` reads.

    Built for every ABI of this machine; cached per profile. Raises :class:`InvalidRequest` for a bad profile
    and :class:`BackendUnavailable` when libseccomp is missing or too old.
    """
    profile.validate()
    return _compile(profile)


def bpf_fd(profile: SeccompProfile) -> int:
    """A sealed memfd holding :func:`compile_bpf`, positioned at its start; the caller closes it.

    Close-on-exec is set: pass it with ``subprocess``'s ``pass_fds`` (which clears that in the child), e.g.
    ``bwrap --seccomp FD``.
    """
    program = compile_bpf(profile)
    fd = os.memfd_create("stockade-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(program)
        while view:
            view = view[os.write(fd, view) :]
        # Whoever else ends up holding the fd must not be able to swap the program for a weaker one.
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _load(program: bytes) -> None:
    """Set no_new_privs and install ``program`` in the calling thread (and what it execs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    ulong = ctypes.c_ulong
    if prctl(_PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        err = ctypes.get_errno()
        raise BackendUnavailable(_BACKEND, f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if prctl(_PR_SET_SECCOMP, ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), ulong(0), ulong(0)) != 0:
        err = ctypes.get_errno()
        raise BackendUnavailable(_BACKEND, f"loading the seccomp filter failed: {os.strerror(err)}")


def apply_to_current_process(profile: SeccompProfile) -> None:
    """Set no_new_privs and load the filter for ``profile`` into this process; irreversible.

    Meant for a forked child before ``exec`` (``preexec_fn``). It compiles the filter first (cached in the
    parent if it was compiled there before the fork); :func:`preexec_loader` does that work up front instead.
    Only the calling thread is filtered: call it where no other threads exist.
    """
    _load(compile_bpf(profile))


def preexec_loader(profile: SeccompProfile) -> Callable[[], None]:
    """Compile now, in the parent; return a ``preexec_fn`` that only has to install the program."""
    program = compile_bpf(profile)

    def load() -> None:
        _load(program)

    return load
