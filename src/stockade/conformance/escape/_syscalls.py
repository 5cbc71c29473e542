"""The system-call probe: which calls the guest's filter lets reach the kernel.

Each call is made with arguments the kernel rejects before doing anything (a bad pointer, fd -1, an invalid
flag combination), so an allowed call fails with EFAULT, EBADF, EINVAL, ESRCH ... and has no effect, while a
filtered one fails with EPERM (or ENOSYS, which seccomp uses for ``clone3``). Some calls check a capability
before their arguments (pivot_root, init_module, reboot ...): for those EPERM cannot tell the filter from the
missing capability, and the report says "blocked" either way, which is what matters to the guest.

``ALLOWED`` are ordinary calls probed the same way: they must come back with EFAULT/EBADF, which shows the
probe can tell an allowed call from a blocked one at all (the admitted sibling).
"""

from __future__ import annotations

__all__ = ["ALLOWED", "BLOCKED", "PROBE"]

BAD = 1  # a non-NULL address nothing is mapped at

# name: (x86_64 number, aarch64 number or None, args). "SELF" is replaced by the probe's own pid.
BLOCKED: dict[str, tuple[int, int | None, tuple[object, ...]]] = {
    "mount": (165, 40, (BAD, BAD, BAD, 0, BAD)),
    "umount2": (166, 39, (BAD, 0)),
    "pivot_root": (155, 41, (BAD, BAD)),
    "chroot": (161, 51, (BAD,)),
    "fsopen": (430, 430, (BAD, 0)),
    "fsmount": (432, 432, (-1, 0, 0)),
    "fspick": (433, 433, (-100, BAD, 0)),
    "move_mount": (429, 429, (-1, BAD, -1, BAD, 0)),
    "open_tree": (428, 428, (-100, BAD, 1)),  # OPEN_TREE_CLONE
    "mount_setattr": (442, 442, (-100, BAD, 0, BAD, 32)),
    "setns": (308, 268, (-1, 0)),
    "unshare": (272, 97, (0x1,)),  # an invalid flag: EINVAL when allowed
    "clone_newuser": (56, 220, (0x10000000 | 0x200 | 17, 0, 0, 0, 0)),  # NEWUSER|FS: EINVAL when allowed
    "clone_newns": (56, 220, (0x00020000 | 0x200 | 17, 0, 0, 0, 0)),  # NEWNS|FS: EINVAL when allowed
    "clone3": (435, 435, (BAD, 88)),
    "keyctl": (250, 219, (9999, 0, 0, 0, 0)),
    "add_key": (248, 217, (BAD, BAD, BAD, 0, 0)),
    "request_key": (249, 218, (BAD, BAD, BAD, 0)),
    "bpf": (321, 280, (0, BAD, 64)),
    "perf_event_open": (298, 241, (BAD, 0, -1, -1, 0)),
    "userfaultfd": (323, 282, (0xFFFFFFFF,)),
    "io_uring_setup": (425, 425, (1, BAD)),
    "io_uring_enter": (426, 426, (-1, 0, 0, 0, 0, 0)),
    "io_uring_register": (427, 427, (-1, 0, 0, 0)),
    "ptrace": (101, 117, (3, "SELF", 0, 0)),  # PTRACE_PEEKUSER on an untraced self: ESRCH when allowed
    "process_vm_readv": (310, 270, ("SELF", BAD, 1, BAD, 1, 0)),
    "process_vm_writev": (311, 271, ("SELF", BAD, 1, BAD, 1, 0)),
    "process_madvise": (440, 440, (-1, BAD, 1, 0, 0)),
    "pidfd_getfd": (438, 438, (-1, 0, 0)),
    "kcmp": (312, 272, ("SELF", "SELF", 99, 0, 0)),  # an invalid type: EINVAL when allowed
    "open_by_handle_at": (304, 265, (-100, BAD, 0)),
    "name_to_handle_at": (303, 264, (-100, BAD, BAD, BAD, 0)),
    "kexec_load": (246, 104, (0, 0, BAD, 0x00010000)),  # a foreign architecture: EINVAL, never an unload
    "kexec_file_load": (320, 294, (-1, -1, 0, BAD, 0)),
    "init_module": (175, 105, (BAD, 0, BAD)),
    "finit_module": (313, 273, (-1, BAD, 0)),
    "delete_module": (176, 106, (BAD, 0)),
    "reboot": (169, 142, (0, 0, 0, 0)),  # no magic: EINVAL if it ever got past the capability check
    "swapon": (167, 224, (BAD, 0)),
    "swapoff": (168, 225, (BAD,)),
    "acct": (163, 89, (BAD,)),
    "quotactl": (179, 60, (0, BAD, 0, BAD)),
    "syslog": (103, 116, (3, BAD, 16)),
    "settimeofday": (164, 170, (BAD, BAD)),
    "clock_settime": (227, 112, (0, BAD)),
    "adjtimex": (159, 171, (BAD,)),
    "clock_adjtime": (305, 266, (0, BAD)),
    "sethostname": (170, 161, (BAD, 4)),
    "setdomainname": (171, 162, (BAD, 4)),
    "iopl": (172, None, (3,)),
    "ioperm": (173, None, (0, 1, 1)),
    "fanotify_init": (300, 262, (0, 0)),
    "ioctl_tiocsti": (16, 29, (-1, 0x5412, BAD)),
    "ioctl_tiocsti_high_bits": (16, 29, (-1, 0x5412 | (1 << 32), BAD)),  # CVE-2019-10063
    "ioctl_tioclinux": (16, 29, (-1, 0x541C, BAD)),
    "personality_no_randomize": (135, 92, (0x0040000,)),
}

ALLOWED: dict[str, tuple[int, int | None, tuple[object, ...]]] = {
    "uname": (63, 160, (BAD,)),
    "getcwd": (79, 17, (BAD, 4096)),
    "newfstatat": (262, 79, (-100, BAD, BAD, 0)),
    "pipe2": (293, 59, (BAD, 0)),
    "ioctl_tcgets": (16, 29, (-1, 0x5401, BAD)),
    "clock_gettime": (228, 113, (0, BAD)),
    "openat": (257, 56, (-100, BAD, 0, 0)),
    "personality_query": (135, 92, (0xFFFFFFFF,)),
}

PROBE = """
import ctypes, errno, threading
table = json.loads(sys.argv[1])
arch = os.uname().machine
column = {"x86_64": 0, "aarch64": 1}.get(arch)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
if column is not None:
    for name, row in table.items():
        number = row[column]
        if number is None:
            out[name] = "absent"
            continue
        args = [os.getpid() if a == "SELF" else a for a in row[2]]
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
        e = ctypes.get_errno()
        out[name] = ("ret %d" % ret) if ret >= 0 else errno.errorcode.get(e, str(e))
emit({"arch": arch, "results": out})
"""
