"""Filesystem escapes by path: outside reads and writes, ``..``, ``/proc/<pid>/root``, leaked descriptors as
working directories (runc CVE-2024-21626), read-only mounts, symlinks and hard links out of a mount.

Every refusal reads or writes a host canary (random content in a directory no mount covers) and judges by
what the host sees afterwards; its admitted sibling does the same through a mount that grants it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
from pathlib import Path

from ..canaries import token
from ..context import CaseContext, Finding, case, conforms, escaped, overrefused, show
from ._support import (
    CANARY_TARGET,
    RW_TARGET,
    Respawner,
    canary_dir,
    gated,
    mount,
    mounted_paths,
    need_python,
    require,
    run_py,
    scratch,
)

__all__: list[str] = []

_READ = """
paths = json.loads(sys.argv[1])
out = {}
for p in paths:
    try:
        with open(p, "rb") as f:
            out[p] = f.read(300).decode(errors="replace")
    except OSError as e:
        out[p] = "error: " + str(e.strerror or e)
pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
emit({"reads": out, "pids": pids})
"""


async def _fs_gate(ctx: CaseContext, *mounts: object) -> None:
    spec = ctx.spec(mounts=mounts) if mounts else ctx.spec(mounts=(mount(ctx.host_dir(), CANARY_TARGET),))
    await gated(ctx, spec, "a spec with mounts")


def _leaks(reads: dict[str, str], content: str) -> list[str]:
    return [path for path, text in reads.items() if content in text]


@case("escape.fs.outside_read")
async def outside_read(ctx: CaseContext) -> Finding:
    """A host file no mount covers is unreadable by its path and by ``..`` out of a mount or of /tmp (the
    read of a mounted canary is the control)."""
    await _fs_gate(ctx)
    _d, file, content = canary_dir(ctx)
    mounted, _mf, mounted_content = canary_dir(ctx)
    up = "/.." * 16
    async with ctx.session(mounts=(mount(mounted, CANARY_TARGET),)) as session:
        await need_python(ctx, session.id)
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        paths = [
            str(file),
            f"/{file}",
            f"{ro}{up}{file}",
            f"/tmp{up}{file}",
            f"{ro}/../../../../../../..{file}",
            f"{ro}/canary.txt",
        ]
        found, result = await run_py(ctx, session.id, _READ, json.dumps(paths))
    reads: dict[str, str] = found.get("reads", {})
    leaks = _leaks(reads, content)
    if leaks:
        return escaped(f"host canary {file} read through {leaks}")
    require(mounted_content in reads.get(f"{ro}/canary.txt", ""), "the control read of the mounted canary failed",
            result)
    return conforms(f"{file} unreadable by path and by '..' ({len(paths) - 1} paths); the mounted canary reads")


@case("escape.fs.proc_root")
async def proc_root(ctx: CaseContext) -> Finding:
    """``/proc/<pid>/root`` of every visible process, of the host pids the attacker can guess (the launcher,
    a host process, pid 1), ``/proc/self/root`` and ``/proc/thread-self/root`` do not lead to the host."""
    await _fs_gate(ctx)
    _d, file, content = canary_dir(ctx)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        host_pids = {1, 2, os.getpid(), os.getppid()}
        init = session.metadata.get("init_pid")
        if init and init.isdigit():
            host_pids.add(int(init))
        listing, _ = await run_py(ctx, session.id, _READ, json.dumps([]))
        guest_pids = {int(p) for p in listing.get("pids", [])}
        pids = sorted(guest_pids | host_pids)
        paths = [f"/proc/{p}/root{file}" for p in pids]
        paths += [f"/proc/self/root{file}", f"/proc/thread-self/root{file}", f"/proc/1/root/proc/1/root{file}"]
        paths += [f"/proc/{p}/cwd{file}" for p in pids]
        found, result = await run_py(ctx, session.id, _READ, json.dumps(paths))
    leaks = _leaks(found.get("reads", {}), content)
    if leaks:
        return escaped(f"host canary {file} read through {leaks}")
    require(bool(guest_pids), "the guest listed no process in /proc", result)
    return conforms(f"no /proc/<pid>/root or cwd of {len(pids)} pids (guest {sorted(guest_pids)[:8]}, "
                    f"host {sorted(host_pids)}) reaches {file}")


_FD_WALK = """
import stat
reads, seen = {}, {}
def try_read(path):
    try:
        with open(path, "rb") as f:
            reads[path] = f.read(300).decode(errors="replace")
    except OSError as e:
        reads[path] = "error: " + str(e.strerror or e)
for pid in [n for n in os.listdir("/proc") if n.isdigit()] + ["self", "thread-self"]:
    base = "/proc/%s/fd" % pid
    try:
        fds = os.listdir(base)
    except OSError:
        continue
    for fd in fds:
        path = base + "/" + fd
        try:
            seen[path] = os.readlink(path)
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                names = os.listdir(path)
            except OSError as e:
                names = []
            seen[path] += " -> " + ",".join(sorted(names)[:20])
            for name in names:
                try_read(path + "/" + name)
            try_read(path + "/../" + sys.argv[1])
        elif stat.S_ISREG(st.st_mode):
            try_read(path)
own = sorted(int(n) for n in os.listdir("/proc/self/fd"))
emit({"reads": reads, "seen": seen, "own_fds": own})
"""


@case("escape.fs.leaked_fds")
async def leaked_fds(ctx: CaseContext) -> Finding:
    """Descriptors the launching process holds (inheritable, to a host directory and file) never reach the
    guest: not through ``/proc/<pid>/fd`` of any guest process, and not as the working directory of an exec
    (``cwd=/proc/self/fd/N``, runc CVE-2024-21626)."""
    await _fs_gate(ctx)
    directory, file, content = canary_dir(ctx)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    file_fd = os.open(file, os.O_RDONLY)
    for fd in (dir_fd, file_fd):
        os.set_inheritable(fd, True)
        ctx.on_cleanup(functools.partial(os.close, fd))
    top = max(dir_fd, file_fd) + 8
    spec = ctx.spec()
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _FD_WALK, file.name)
        runner = Respawner(ctx, spec, session.id)
        cwd_hits = []
        for n in range(0, top):
            probe = await runner.attempt("cat canary.txt ../canary.txt 2>/dev/null; pwd -P", f"/proc/self/fd/{n}")
            if probe is not None and content in probe.stdout:
                cwd_hits.append(f"cwd=/proc/self/fd/{n}: {show(probe)}")
    leaks = _leaks(found.get("reads", {}), content)
    if leaks or cwd_hits:
        return escaped(f"the host canary was read through leaked descriptors: {leaks + cwd_hits}")
    seen = found.get("seen", {})
    require(bool(seen), "the guest saw no descriptor at all in /proc", result)
    return conforms(f"host fds {dir_fd} and {file_fd} absent; {len(seen)} guest descriptors checked, none leads "
                    f"to the canary; cwd=/proc/self/fd/0..{top - 1} never did; a fresh command holds fds "
                    f"{found.get('own_fds')}{runner.note()}")


_WRITE = """
import ctypes
targets = json.loads(sys.argv[1])
out = {}
for t in targets:
    try:
        fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.write(fd, b"written-by-guest")
        os.close(fd)
        out[t] = "ok"
    except OSError as e:
        out[t] = "error: " + str(e.strerror or e)
    for what, fn in (("mkdir", lambda: os.mkdir(t + ".d")), ("symlink", lambda: os.symlink("x", t + ".l")),
                     ("mkfifo", lambda: os.mkfifo(t + ".p"))):
        try:
            fn()
            out[t + " " + what] = "ok"
        except OSError as e:
            out[t + " " + what] = "error: " + str(e.strerror or e)
emit({"writes": out})
"""


@case("escape.fs.outside_write")
async def outside_write(ctx: CaseContext) -> Finding:
    """Nothing the guest does creates an entry in a host directory no mount covers: by path, through
    ``/proc/<pid>/root``, or by ``..`` out of a writable mount (the write through that mount is the control)."""
    await _fs_gate(ctx)
    target = ctx.host_dir(0o777)
    rw = ctx.host_dir(0o777)
    up = "/.." * 16
    name = f"escaped-{secrets.token_hex(4)}"
    async with ctx.session(mounts=(mount(rw, RW_TARGET, writable=True),)) as session:
        await need_python(ctx, session.id)
        rw_at = (await mounted_paths(ctx, session))[RW_TARGET]
        targets = [
            f"{target}/{name}-path",
            f"/proc/self/root{target}/{name}-self",
            f"/proc/1/root{target}/{name}-proc1",
            f"{rw_at}{up}{target}/{name}-dotdot",
            f"{rw_at}/control.txt",
        ]
        _found, result = await run_py(ctx, session.id, _WRITE, json.dumps(targets))
    created = sorted(p.name for p in target.iterdir())
    if created:
        return escaped(f"the guest created {created} in host directory {target}")
    require((rw / "control.txt").is_file(), "the control write through the read-write mount did not arrive",
            result)
    return conforms(f"nothing appeared in {target} ({len(targets) - 1} routes); the control write arrived")


@case("escape.fs.mounted_read_admitted")
async def mounted_read_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: a host file under a read-only mount is readable, a subdirectory is listable."""
    directory, _file, content = canary_dir(ctx)
    (directory / "sub").mkdir()
    await _fs_gate(ctx, mount(directory, CANARY_TARGET))
    async with ctx.session(mounts=(mount(directory, CANARY_TARGET),)) as session:
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        result = await ctx.sh(session.id, f"cat {ro}/canary.txt; ls {ro}")
    if content in result.stdout and "sub" in result.stdout.split():
        return conforms(f"{ro}/canary.txt read, directory listed")
    return overrefused(f"the read-only mount was not readable: {show(result)}")


@case("escape.fs.rw_mount_write_admitted")
async def rw_mount_write_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: a read-write mount takes new files, directories and renames, which the host sees."""
    directory = ctx.host_dir(0o777)
    content = token("written-")
    await _fs_gate(ctx, mount(directory, RW_TARGET, writable=True))
    async with ctx.session(mounts=(mount(directory, RW_TARGET, writable=True),)) as session:
        rw = (await mounted_paths(ctx, session))[RW_TARGET]
        script = f"printf %s {content} > {rw}/a.txt && mkdir {rw}/d && mv {rw}/a.txt {rw}/d/b.txt && echo done"
        result = await ctx.sh(session.id, script)
    out = directory / "d" / "b.txt"
    seen = out.read_text(errors="replace") if out.is_file() else None
    if seen == content:
        return conforms("write, mkdir and rename through the read-write mount reached the host")
    return overrefused(f"host sees {seen!r} at {out}: {show(result)}")


_RO_OPS = """
import ctypes, subprocess
d = sys.argv[1]
f = d + "/canary.txt"
libc = ctypes.CDLL(None, use_errno=True)
def reopen_for_write():
    fd = os.open(f, os.O_RDONLY)
    try:
        os.close(os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_APPEND))
    finally:
        os.close(fd)
def remount():
    if libc.mount(None, d.encode(), None, ctypes.c_ulong(32 | 4096), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
def remount_shell():
    r = subprocess.run(["mount", "-o", "remount,rw", d], capture_output=True)
    if r.returncode:
        raise OSError(0, (r.stderr or b"failed").decode(errors="replace").strip()[:80])
def append():
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"x")
    os.close(fd)
ops = {
    "open_wronly": lambda: os.close(os.open(f, os.O_WRONLY)),
    "append": append,
    "open_trunc": lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)),
    "truncate": lambda: os.truncate(f, 0),
    "create": lambda: os.close(os.open(d + "/new.txt", os.O_WRONLY | os.O_CREAT, 0o644)),
    "unlink": lambda: os.unlink(f),
    "rename": lambda: os.rename(f, d + "/moved.txt"),
    "rename_dir": lambda: os.rename(d + "/sub", d + "/sub2"),
    "rmdir": lambda: os.rmdir(d + "/empty"),
    "mkdir": lambda: os.mkdir(d + "/newdir"),
    "chmod": lambda: os.chmod(f, 0o600),
    "chown": lambda: os.chown(f, os.getuid(), os.getgid()),
    "utime": lambda: os.utime(f, (0, 0)),
    "setxattr": lambda: os.setxattr(f, "user.stockade", b"x"),
    "symlink": lambda: os.symlink("x", d + "/ln"),
    "link": lambda: os.link(f, d + "/hl"),
    "mkfifo": lambda: os.mkfifo(d + "/fifo"),
    "reopen_via_proc_fd": reopen_for_write,
    "remount_rw": remount,
    "remount_rw_shell": remount_shell,
}
out = {}
for name, fn in ops.items():
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = "error: " + str(e.strerror or e)
    except Exception as e:
        out[name] = "error: " + repr(e)[:80]
with open(f, "rb") as fh:
    readable = fh.read(200).decode(errors="replace")
emit({"ops": out, "readable": readable})
"""


def _tree(directory: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    state = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        state[str(path.relative_to(directory))] = (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_nlink, data)
    return state


def _xattrs(path: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return os.listxattr(path)
    return []


@case("escape.fs.ro_mount")
async def ro_mount(ctx: CaseContext) -> Finding:
    """A read-only mount resists every write-like operation: open for write, truncate, create, unlink,
    rename, rmdir, mkdir, chmod, chown, utime, setxattr, links, fifos, reopening a read-only fd for writing
    through ``/proc/self/fd``, and remounting read-write (syscall and ``mount``); the host tree is unchanged."""
    directory, file, content = canary_dir(ctx, writable=True)
    (directory / "sub").mkdir(mode=0o777)
    (directory / "sub" / "inner.txt").write_text(content)
    (directory / "empty").mkdir(mode=0o777)
    m = mount(directory, CANARY_TARGET)
    await _fs_gate(ctx, m)
    before, xattrs_before = _tree(directory), _xattrs(file)
    async with ctx.session(mounts=(m,)) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _RO_OPS, (await mounted_paths(ctx, session))[CANARY_TARGET])
    ops: dict[str, str] = found.get("ops", {})
    succeeded = sorted(name for name, outcome in ops.items() if outcome == "ok")
    after = _tree(directory)
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    if _xattrs(file) != xattrs_before:
        changed.append("canary.txt xattrs")
    if succeeded or changed:
        return escaped(f"read-only mount modified: guest operations that succeeded {succeeded}; "
                       f"host entries changed {changed}")
    require(content in str(found.get("readable")), "the read-only mount was not readable", result)
    return conforms(f"all {len(ops)} operations failed (e.g. {ops.get('remount_rw')}); host tree unchanged")


_LINKS = """
import json
plan = json.loads(sys.argv[1])
out = {}
for directory in plan.get("mkdir", []):
    os.makedirs(directory, exist_ok=True)
for name, (target, link) in plan["symlinks"].items():
    try:
        os.symlink(target, link)
        out[name] = "created"
    except OSError as e:
        out[name] = "error: " + str(e.strerror or e)
reads = {}
for path in plan["read"]:
    try:
        with open(path, "rb") as f:
            reads[path] = f.read(300).decode(errors="replace")
    except OSError as e:
        reads[path] = "error: " + str(e.strerror or e)
for name, (src, dst) in plan["hardlinks"].items():
    try:
        os.link(src, dst)
    except OSError as e:
        out[name] = "error: " + str(e.strerror or e)
        continue
    try:
        with open(dst, "ab") as f:
            f.write(b"appended-through-link")
        out[name] = "linked-and-written"
    except OSError as e:
        out[name] = "linked, write failed: " + str(e.strerror or e)
emit({"links": out, "reads": reads})
"""


@case("escape.fs.symlink_out")
async def symlink_out(ctx: CaseContext) -> Finding:
    """Symlinks the guest plants in a writable mount, outputs and /tmp, pointing at a host canary by absolute
    and relative host paths, lead nowhere in the guest, and the backend does not follow them on the host when
    it tears the session down."""
    victim_dir, victim, content = canary_dir(ctx)
    rw = ctx.host_dir(0o777)
    m = mount(rw, RW_TARGET, writable=True)
    await _fs_gate(ctx, m)
    # Enough ".." to reach / from any host directory: resolves to the canary only where host paths are seen.
    relative = "../" * 24 + str(victim).lstrip("/")
    before = _tree(victim_dir)
    async with ctx.session(mounts=(m,)) as session:
        await need_python(ctx, session.id)
        tmp = scratch(ctx)
        outputs = "${STOCKADE_OUTPUTS_DIR:-/mnt/session/outputs}"
        places = ((await mounted_paths(ctx, session))[RW_TARGET],
                  (await ctx.sh(session.id, f'printf %s "{outputs}"')).stdout or "/mnt/session/outputs", tmp)
        links = {}
        for index, where in enumerate(places):
            links[f"{index}-abs-file"] = (str(victim), f"{where}/abs-file")
            links[f"{index}-abs-dir"] = (str(victim_dir), f"{where}/abs-dir")
            links[f"{index}-rel"] = (relative, f"{where}/rel")
        reads = [link for _t, link in links.values() if not link.endswith("-dir")]
        reads += [f"{where}/abs-dir/canary.txt" for where in places]
        plan = json.dumps({"symlinks": links, "read": reads, "hardlinks": {}, "mkdir": [tmp]})
        found, result = await run_py(ctx, session.id, _LINKS, plan)
    leaks = _leaks(found.get("reads", {}), content)
    if leaks:
        return escaped(f"host canary {victim} read through guest symlinks {leaks}")
    if _tree(victim_dir) != before:
        return escaped(f"tearing the session down changed the host directory {victim_dir} the links pointed to")
    planted = [n for n, outcome in found.get("links", {}).items() if outcome == "created"]
    require(bool(planted), "the guest could plant no symlink at all", result)
    return conforms(f"{len(planted)} symlinks planted, none leads to the canary in the guest; the host "
                    "directory is unchanged after terminate")


@case("escape.fs.hardlink_out")
async def hardlink_out(ctx: CaseContext) -> Finding:
    """A hard link from a read-only mount, or from the system view, into a writable mount is refused, so the
    read-only host file cannot be written through it."""
    victim_dir, victim, content = canary_dir(ctx, writable=True)
    rw = ctx.host_dir(0o777)
    mounts = (mount(victim_dir, CANARY_TARGET), mount(rw, RW_TARGET, writable=True))
    await _fs_gate(ctx, *mounts)
    async with ctx.session(mounts=mounts) as session:
        await need_python(ctx, session.id)
        at = await mounted_paths(ctx, session)
        ro, rw_at = at[CANARY_TARGET], at[RW_TARGET]
        plan = {
            "symlinks": {},
            "read": [],
            "hardlinks": {
                "ro-mount": [f"{ro}/canary.txt", f"{rw_at}/hl-canary"],
                "etc-passwd": ["/etc/passwd", f"{rw_at}/hl-passwd"],
                "usr": ["/usr/bin/env", f"{rw_at}/hl-env"],
            },
        }
        found, result = await run_py(ctx, session.id, _LINKS, json.dumps(plan))
    outcomes: dict[str, str] = found.get("links", {})
    problems = [f"{n}: {o}" for n, o in outcomes.items() if o.startswith("linked")]
    if victim.read_text(errors="replace") != content or victim.stat().st_nlink != 1:
        problems.append(f"host canary changed (links {victim.stat().st_nlink})")
    if problems:
        return escaped(f"hard links out of read-only places: {problems}")
    require(len(outcomes) == 3, "the hard-link probe did not run every attempt", result)
    return conforms(f"every hard link refused: {outcomes}")


@case("escape.fs.links_inside_admitted")
async def links_inside_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: symlinks and hard links inside a writable mount work and the host sees them."""
    rw = ctx.host_dir(0o777)
    m = mount(rw, RW_TARGET, writable=True)
    await _fs_gate(ctx, m)
    content = token("inside-")
    async with ctx.session(mounts=(m,)) as session:
        rw_at = (await mounted_paths(ctx, session))[RW_TARGET]
        script = f"cd {rw_at} && printf %s {content} > f && ln -s f s && ln f h && cat s && echo && cat h"
        result = await ctx.sh(session.id, script)
    host_ok = (rw / "s").is_symlink() and (rw / "f").stat().st_nlink == 2
    if result.stdout.count(content) == 2 and host_ok:
        return conforms("symlink and hard link inside the mount work; the host sees both")
    return overrefused(f"links inside a writable mount failed (host ok: {host_ok}): {show(result)}")


@case("escape.fs.dotdot_cwd")
async def dotdot_cwd(ctx: CaseContext) -> Finding:
    """An exec's ``cwd`` full of ``..`` (or naming a host directory) never starts the command in a host
    directory: it is refused or stays inside the guest's view."""
    directory, _file, content = canary_dir(ctx)
    await _fs_gate(ctx)
    cwds = [str(directory), f"{CANARY_TARGET}{'/..' * 16}{directory}", f"/tmp/../../..{directory}",
            f"/proc/1/root{directory}", f"/proc/self/root{directory}"]
    hits, ran = [], 0
    spec = ctx.spec()
    async with ctx.session(spec) as session:
        runner = Respawner(ctx, spec, session.id)
        for cwd in cwds:
            result = await runner.attempt("cat canary.txt; pwd", cwd)
            if result is None:
                continue
            ran += 1
            if content in result.stdout:
                hits.append(f"{cwd}: {show(result)}")
        control = await ctx.sh(runner.session_id, "pwd", cwd="/tmp/../tmp")
    if hits:
        return escaped(f"commands started in the host directory {directory}: {hits}")
    if "/tmp" not in control.stdout:
        return overrefused(f"an ordinary cwd with '..' (/tmp/../tmp) failed: {show(control)}")
    return conforms(f"{len(cwds)} host cwds refused or contained ({ran} ran, none saw the canary){runner.note()}")

