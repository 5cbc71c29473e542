"""Filesystem escapes through the kernel's special files: device nodes, ``/dev``, setuid binaries, writes to
``/proc/sys``, ``/proc/sysrq-trigger`` and ``/sys``, and the mount family (mount, umount, pivot_root, chroot).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread

from ..context import CaseContext, Finding, case, conforms, escaped, not_measured, overrefused
from ._support import (
    CANARY_TARGET,
    canary_dir,
    gated,
    mount,
    mounted_paths,
    need_python,
    require,
    run_py,
    scratch,
    unconfined,
)

__all__: list[str] = []

_MKNOD = """
import stat
refuse_if_host_root()
base = sys.argv[2]
os.makedirs(base, exist_ok=True)
out = {}
for name, kind, major, minor in (("null", stat.S_IFCHR, 1, 3), ("mem", stat.S_IFCHR, 1, 1),
                                 ("kmsg", stat.S_IFCHR, 1, 11), ("disk", stat.S_IFBLK, *json.loads(sys.argv[1]))):
    path = base + "/node-" + name
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except OSError as e:
        out[name] = "error: " + str(e.strerror or e)
        continue
    try:
        with open(path, "rb") as f:
            out[name] = "created and read %d bytes" % len(f.read(512))
    except OSError as e:
        out[name] = "created, open failed: " + str(e.strerror or e)
    finally:
        os.unlink(path)
try:
    os.mkfifo(base + "/fifo")
    fifo = "ok"
except OSError as e:
    fifo = "error: " + str(e.strerror or e)
emit({"nodes": out, "fifo": fifo})
"""


async def _gate(ctx: CaseContext) -> None:
    await gated(ctx, ctx.spec(mounts=(mount(ctx.host_dir(), CANARY_TARGET),)), "a spec with mounts")


@case("escape.fs.mknod")
async def mknod(ctx: CaseContext) -> Finding:
    """No device node can be made (the null device, /dev/mem, /dev/kmsg, the host's root disk); a fifo can
    (admitted sibling, same probe)."""
    await _gate(ctx)
    root_dev = os.stat("/").st_dev
    disk = [os.major(root_dev), os.minor(root_dev)]
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _MKNOD, json.dumps(disk), scratch(ctx))
    unconfined(found)
    nodes: dict[str, str] = found.get("nodes", {})
    made = {name: outcome for name, outcome in nodes.items() if not outcome.startswith("error")}
    if made:
        return escaped(f"device nodes created in the guest: {made}")
    if found.get("fifo") != "ok":
        return overrefused(f"mkfifo in /tmp failed: {found.get('fifo')}")
    require(len(nodes) == 4, "the mknod probe did not run every attempt", result)
    return conforms(f"every mknod refused ({nodes['disk']}); mkfifo works")


_DEV = """
import stat
nodes = {}
for root, dirs, files in os.walk("/dev"):
    for name in dirs + files:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "b" if stat.S_ISBLK(st.st_mode) else "c"
            nodes[path] = [kind, os.major(st.st_rdev), os.minor(st.st_rdev)]
opens = {}
for path in json.loads(sys.argv[1]):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        opens[path] = "opened"
    except OSError as e:
        opens[path] = "error: " + str(e.strerror or e)
try:
    with open("/dev/null", "wb") as f:
        f.write(b"x")
    with open("/dev/urandom", "rb") as f:
        basics = len(f.read(16)) == 16
except OSError:
    basics = False
emit({"nodes": nodes, "opens": opens, "basics": basics})
"""

# (major, minors or None for any): null, zero, full, random, urandom; tty, console, ptmx; the pts range.
_ALLOWED_CHAR = {1: {3, 5, 7, 8, 9}, 5: {0, 1, 2}, **{major: None for major in range(136, 144)}}
_HOST_DEVICES = ("/dev/kvm", "/dev/net/tun", "/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/fuse",
                 "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop-control", "/dev/vhost-net", "/dev/tty0",
                 "/dev/console")


def _present(paths: tuple[str, ...]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


def _read_knob() -> str | None:
    try:
        return _LEASE.read_text().strip()
    except OSError:
        return None


@case("escape.fs.dev")
async def dev(ctx: CaseContext) -> Finding:
    """/dev holds only the harmless character devices (null, zero, full, random, urandom, tty, ptmx, pts):
    no block device, no /dev/kvm, /dev/net/tun, /dev/mem, /dev/kmsg; /dev/null and /dev/urandom work."""
    await _gate(ctx)
    present = _present(_HOST_DEVICES)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _DEV, json.dumps(list(_HOST_DEVICES)))
    nodes: dict[str, list[object]] = found.get("nodes", {})
    extra = []
    for path, (kind, major, minor) in nodes.items():
        allowed = _ALLOWED_CHAR.get(int(str(major)), set())
        if kind == "b" or not (allowed is None or int(str(minor)) in allowed):
            extra.append(f"{path} ({kind} {major}:{minor})")
    opened = [p for p, outcome in found.get("opens", {}).items() if outcome == "opened" and p in nodes]
    if extra or opened:
        return escaped(f"host devices reachable in the guest: nodes {extra}; opened {opened}")
    if not found.get("basics"):
        return overrefused("/dev/null or /dev/urandom does not work in the guest")
    require(len(found.get("opens", {})) == len(_HOST_DEVICES), "the probe did not try every host device", result)
    listing = f"/dev holds only {sorted(nodes)}" if nodes else "the /dev listing is refused"
    return conforms(f"{listing}; none of {present} (present on the host) opens")


@case("escape.fs.setuid")
async def setuid(ctx: CaseContext) -> Finding:
    """A setuid-root and a setgid-root copy of ``id``, placed by the host in a mounted directory, run without
    changing the guest's effective ids (nosuid mounts, unmapped root, no_new_privs)."""
    await _gate(ctx)
    directory = ctx.host_dir(0o755)
    id_path = await anyio.to_thread.run_sync(_static_id, directory) or shutil.which("id")
    if os.geteuid() != 0 or id_path is None:
        return not_measured("staging a setuid-root binary needs root on the host and coreutils' id")
    for name, mode in (("suid-id", 0o4755), ("sgid-id", 0o2755), ("plain-id", 0o755)):
        target = directory / name
        shutil.copy(id_path, target)
        os.chown(target, 0, 0)
        target.chmod(mode)
    m = mount(directory, CANARY_TARGET)
    await gated(ctx, ctx.spec(mounts=(m,)), "a spec with mounts")
    async with ctx.session(mounts=(m,)) as session:
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        alive, result = await ctx.probe(session.id, "; ".join(
            f"echo '@{n}' $({ro}/{n} 2>&1)" for n in ("plain-id", "suid-id", "sgid-id")))
    lines = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines() if line.startswith("@")}
    gained = [line for line in lines.values() if "euid=" in line or "egid=" in line]
    if gained:
        return escaped(f"a setuid/setgid binary changed the guest's effective ids: {gained}")
    require(alive and len(lines) == 3, "the guest did not run the setuid probe", result)
    if "uid=" not in lines["@plain-id"]:
        return not_measured(f"id (static where a C compiler was found, else the host's) does not run in this "
                            f"guest: {lines['@plain-id']}")
    return conforms(f"setuid and setgid copies ran without new ids: {lines['@suid-id']}")


# The ids as coreutils' id prints them (euid=/egid= only when they differ from the real ones), built static so
# it runs in any image: the host's own id needs the host's shared libraries (libselinux), which an image lacks.
_ID_SOURCE = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    uid_t uid = getuid(), euid = geteuid();
    gid_t gid = getgid(), egid = getegid();
    printf("uid=%u gid=%u", (unsigned)uid, (unsigned)gid);
    if (euid != uid) printf(" euid=%u", (unsigned)euid);
    if (egid != gid) printf(" egid=%u", (unsigned)egid);
    printf("\n");
    return 0;
}
"""


def _static_id(directory: Path) -> str | None:
    """A static ``id`` built with the host's C compiler in ``directory`` (removed with it), or None."""
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    source, binary = directory / "id.c", directory / "static-id"
    source.write_text(_ID_SOURCE)
    try:
        proc = subprocess.run([cc, "-static", "-Os", "-o", str(binary), str(source)],
                              capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        source.unlink(missing_ok=True)
    return str(binary) if proc.returncode == 0 and binary.is_file() else None


_SYS_WRITE = """
out = {}
for path in json.loads(sys.argv[1]):
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        out[path] = "error: " + str(e.strerror or e)
        continue
    os.close(fd)  # opened for writing; nothing written (these knobs reconfigure the whole host)
    out[path] = "opened for writing"
canary, value = sys.argv[2], sys.argv[3]
try:
    with open(canary, "w") as f:
        f.write(value)
    out[canary] = "written"
except OSError as e:
    out[canary] = "error: " + str(e.strerror or e)
emit({"writes": out})
"""

_LEASE = Path("/proc/sys/fs/lease-break-time")
_DANGEROUS = (
    "/proc/sysrq-trigger",
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/proc/sys/vm/drop_caches",
    "/proc/sys/kernel/hostname",
    "/proc/sys/net/ipv4/ip_forward",
    "/sys/kernel/uevent_helper",
    "/sys/fs/cgroup/memory/release_agent",
    "/sys/fs/cgroup/release_agent",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/power/state",
)


@case("escape.fs.proc_sys")
async def proc_sys(ctx: CaseContext) -> Finding:
    """Host-wide kernel knobs cannot be written: a harmless one (``fs.lease-break-time``) is written with a
    random value and must stay unchanged on the host; the dangerous ones (sysrq-trigger, core_pattern,
    modprobe, uevent_helper, cgroup release_agent ...) must not even open for writing."""
    await _gate(ctx)
    original = _read_knob()
    if original is None:
        return not_measured(f"{_LEASE} is not readable on this host, so there is no host-wide canary knob")
    value = str(int(original) + 1 + secrets.randbelow(50)) if original.isdigit() else "77"

    def restore() -> None:
        if _read_knob() != original:
            with contextlib.suppress(OSError):
                _LEASE.write_text(original)

    ctx.on_cleanup(restore)
    probes = list(_DANGEROUS)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _SYS_WRITE, json.dumps(probes), str(_LEASE), value)
    after = _read_knob()
    writes: dict[str, str] = found.get("writes", {})
    # The guest's own hostname is its UTS namespace's business; everything else here is host-wide.
    opened = [p for p, o in writes.items() if not o.startswith("error") and p != "/proc/sys/kernel/hostname"]
    if after != original or opened:
        return escaped(f"host kernel knobs writable: {_LEASE} {original} -> {after}; opened {opened}")
    require(len(writes) == len(probes) + 1, "the probe did not try every knob", result)
    return conforms(f"{_LEASE} stayed {original} (guest: {writes[str(_LEASE)]}); none of {len(probes)} "
                    "host knobs opened for writing")


_MOUNT = """
import ctypes, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    if fn(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
def mountinfo():
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)
refuse_if_host_root()
before = mountinfo()
target, base = sys.argv[1], sys.argv[2]
m = base + "/m"
os.makedirs(m, exist_ok=True)
attempts = {
    "mount_tmpfs": lambda: call(libc.mount, b"none", m.encode(), b"tmpfs", ctypes.c_ulong(0), None),
    "bind_root": lambda: call(libc.mount, b"/", m.encode(), None, ctypes.c_ulong(4096 | 16384), None),
    "umount_canary": lambda: call(libc.umount2, target.encode(), 0),
    "umount_lazy_tmp": lambda: call(libc.umount2, b"/tmp", 2),
    "pivot_root": lambda: call(libc.syscall, 155 if os.uname().machine == "x86_64" else 41, base.encode(),
                               m.encode()),
    "chroot": lambda: call(libc.chroot, base.encode()),
    "unshare_mount_shell": lambda: subprocess.run(["unshare", "-m", "true"], check=True, capture_output=True),
    "mount_shell": lambda: subprocess.run(["mount", "-t", "tmpfs", "none", m], check=True, capture_output=True),
}
out = {}
for name, fn in attempts.items():
    try:
        fn()
        out[name] = "ok"
    except (OSError, subprocess.CalledProcessError) as e:
        out[name] = "error: " + str(getattr(e, "strerror", None) or e)[:100]
try:
    visible = open(target + "/canary.txt").read()
except OSError as e:
    visible = "error: " + str(e.strerror)
emit({"attempts": out, "changed": mountinfo() != before, "canary": visible})
"""


@case("escape.fs.mount_syscalls")
async def mount_syscalls(ctx: CaseContext) -> Finding:
    """mount (tmpfs, a bind of /), umount of a mount (uncovering what is under it), pivot_root, chroot,
    ``unshare -m`` and the ``mount`` command all fail, and the guest's mount table is unchanged afterwards."""
    directory, _f, content = canary_dir(ctx)
    m = mount(directory, CANARY_TARGET)
    await gated(ctx, ctx.spec(mounts=(m,)), "a spec with mounts")
    async with ctx.session(mounts=(m,)) as session:
        await need_python(ctx, session.id)
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        found, result = await run_py(ctx, session.id, _MOUNT, ro, scratch(ctx))
    unconfined(found)
    attempts: dict[str, str] = found.get("attempts", {})
    succeeded = sorted(n for n, o in attempts.items() if o == "ok")
    if succeeded or found.get("changed"):
        return escaped(f"mount operations succeeded: {succeeded}; mount table changed: {found.get('changed')}")
    require(content in str(found.get("canary")), "the mounted canary was not readable", result)
    return conforms(f"all {len(attempts)} refused (mount: {attempts.get('mount_tmpfs')}); mount table unchanged")

