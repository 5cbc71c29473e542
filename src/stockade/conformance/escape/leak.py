"""Information leaks: the launcher's environment, the host's hostname, host paths in the guest's /proc
(mountinfo, mounts, cgroup), kernel logs and symbols, and another session's /tmp, /dev/shm, abstract sockets
and files.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
from pathlib import Path

from ..canaries import token
from ..context import CaseContext, Finding, case, conforms, escaped, show
from ._declared import declared_absent
from ._support import CANARY_TARGET, RW_TARGET, canary_dir, gated, mount, need_python, require, run_py, scratch

__all__: list[str] = []

_ENVIRON = """
needle = sys.argv[1] + sys.argv[2]  # split: our own argv must not match
found = {}
for pid in [n for n in os.listdir("/proc") if n.isdigit()] + ["self"]:
    for what in ("environ", "cmdline"):
        try:
            with open("/proc/%s/%s" % (pid, what), "rb") as f:
                if needle.encode() in f.read():
                    found["%s/%s" % (pid, what)] = True
        except OSError:
            pass
emit({"found": sorted(found), "env": needle in repr(dict(os.environ)), "path": os.environ.get("PATH", "")})
"""


@case("escape.leak.host_env")
async def host_env(ctx: CaseContext) -> Finding:
    """A variable of the process that launches sessions reaches no guest process: not the command's
    environment, not ``/proc/<pid>/environ`` of anything the guest can see (its supervisor included)."""
    name, value = "STOCKADE_ESCAPE_" + secrets.token_hex(6).upper(), token("hostenv-")
    ctx.set_host_env(name, value)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        await ctx.sh(session.id, "(setsid sleep 20 </dev/null >/dev/null 2>&1 &); true")
        found, result = await run_py(ctx, session.id, _ENVIRON, value[:6], value[6:])
    if found.get("found") or found.get("env") or value in result.stdout:
        return escaped(f"host variable {name} visible in the guest: {found.get('found')}, own env {found.get('env')}")
    require(bool(found.get("path")), "the probe saw no PATH, so its environment was not read", result)
    return conforms(f"{name} is in no guest environment")


@case("escape.leak.hostname")
async def hostname(ctx: CaseContext) -> Finding:
    """The guest sees its own hostname, not the host's, and cannot change the host's (the rename is tried only
    once the guest has shown a hostname of its own, and undone if it reached the host)."""
    host_name = socket.gethostname()

    def restore() -> None:
        if socket.gethostname() != host_name:
            with contextlib.suppress(OSError):
                socket.sethostname(host_name)

    ctx.on_cleanup(restore)
    async with ctx.session() as session:
        seen = await ctx.sh(session.id, "cat /proc/sys/kernel/hostname; uname -n")
        lines = seen.stdout.split()
        require(len(lines) >= 2 and bool(lines[0]), "the guest printed no hostname", seen)
        if host_name in lines[:2] and host_name not in ("localhost", "stockade"):
            shown = f"the guest sees the host's hostname {host_name!r} (no rename tried): {show(seen)}"
            return declared_absent(ctx, "process_isolation", shown) or escaped(shown)
        await ctx.sh(session.id, "hostname stockade-escaped 2>/dev/null; echo set=$?")
    after = socket.gethostname()
    if after != host_name:
        return escaped(f"the guest renamed the host: {host_name!r} -> {after!r}")
    return conforms(f"the guest is {lines[0]!r}, the host {host_name!r} (unchanged after a rename attempt)")


_PATHS = """
texts = {}
for path in ("/proc/self/mountinfo", "/proc/self/mounts", "/proc/self/cgroup", "/proc/1/mountinfo",
             "/proc/self/mountstats", "/proc/1/cgroup", "/proc/self/environ", "/proc/self/cmdline"):
    try:
        with open(path, "rb") as f:
            texts[path] = f.read(1 << 20).decode(errors="replace")
    except OSError as e:
        texts[path] = "error: " + str(e.strerror)
emit({"texts": texts})
"""


@case("escape.leak.host_paths")
async def host_paths(ctx: CaseContext) -> Finding:
    """The guest's /proc (mountinfo, mounts, mountstats, cgroup, environ, cmdline) names no host path: not the
    source of a read-only or a read-write mount, nor the backend's state directory, nor the session's id. A
    backend that declares ``private_mount_sources`` false (its mounts show their host sources) is still held to
    the session's id, which is no path."""
    ro_dir, _f, _c = canary_dir(ctx)
    rw_dir = ctx.host_dir(0o777)
    mounts = (mount(ro_dir, CANARY_TARGET), mount(rw_dir, RW_TARGET, writable=True))
    await gated(ctx, ctx.spec(mounts=mounts), "a spec with mounts")
    async with ctx.session(mounts=mounts) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _PATHS)
    needles = {"read-only mount source": str(ro_dir), "read-write mount source": str(rw_dir),
               "session id": session.id}
    state_dir = session.metadata.get("state_dir")
    if state_dir:
        needles["state dir"] = state_dir
    texts: dict[str, str] = found.get("texts", {})
    require("/proc/self/mountinfo" in texts, "the probe read nothing", result)
    leaks = {(what, path) for path, text in texts.items() for what, needle in needles.items() if needle in text}
    shown = sorted(f"{what} ({needles[what]}) in {path}" for what, path in leaks)
    if any(what == "session id" for what, _path in leaks):
        return escaped(f"the session's id is visible in the guest: {shown}")
    if leaks:
        return declared_absent(ctx, "private_mount_sources", f"host paths in the guest's /proc: {shown}") or escaped(
            f"host paths visible in the guest: {shown}")
    return conforms(f"none of {sorted(needles)} appears in {len(texts)} /proc views")


_KERNEL = """
import subprocess
out = {}
for path in ("/dev/kmsg", "/proc/kmsg", "/proc/kallsyms", "/proc/kcore", "/proc/sched_debug", "/proc/timer_list",
             "/sys/kernel/debug", "/proc/keys", "/proc/sysrq-trigger", "/sys/kernel/security"):
    try:
        if os.path.isdir(path):
            out[path] = "listed %d" % len(os.listdir(path))
            continue
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        out[path] = data.decode(errors="replace")
    except OSError as e:
        out[path] = "error: " + str(e.strerror)
try:
    out["dmesg"] = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
except (OSError, subprocess.SubprocessError) as e:
    out["dmesg"] = "error: " + str(e)
emit({"kernel": out})
"""

def _remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def _plant_kmsg(marker: str) -> bool:
    """Write ``marker`` into the host's kernel log (root only): the canary the guest's log views must lack."""
    try:
        Path("/dev/kmsg").write_text(f"{marker}\n")
    except OSError:
        return False
    return True


_NONZERO_SYMBOL = re.compile(r"^(?!0{8,16}\b)[0-9a-f]{8,16} [tTdDbBrR] ", re.MULTILINE)


@case("escape.leak.kernel")
async def kernel(ctx: CaseContext) -> Finding:
    """The kernel log is closed to the guest (a line the host writes to /dev/kmsg is the canary: not in
    ``dmesg``, /dev/kmsg or /proc/kmsg), and /proc/kallsyms shows no real addresses; /proc/kcore,
    sched_debug, timer_list, keys and debugfs give nothing away."""
    marker = "stockade-kmsg-" + secrets.token_hex(8)
    planted = _plant_kmsg(marker)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _KERNEL, timeout=30)
    out: dict[str, str] = found.get("kernel", {})
    leaks = [what for what, text in out.items() if marker in text]
    if _NONZERO_SYMBOL.search(out.get("/proc/kallsyms", "")):
        leaks.append("/proc/kallsyms shows kernel addresses")
    for path in ("/proc/kcore", "/proc/sched_debug", "/proc/timer_list", "/proc/keys"):
        if not out.get(path, "error").startswith("error") and out.get(path):
            leaks.append(f"{path} readable")
    if out.get("/sys/kernel/debug", "error").startswith("listed") and out["/sys/kernel/debug"] != "listed 0":
        leaks.append("debugfs listable")
    if leaks:
        return escaped(f"kernel information reaches the guest: {leaks}")
    require(bool(out), "the kernel probe read nothing", result)
    canary = "the host's kmsg canary is absent" if planted else "no kmsg canary (not root), logs refused"
    return conforms(f"{canary}; " + ", ".join(f"{k}: {v[:40]!r}" for k, v in list(out.items())[:4]))


_PLANT = """
import socket, threading, time
secret, name = sys.argv[1], sys.argv[2]
for path in (TMP + "/" + name, "/dev/shm/" + name, "/mnt/session/outputs/" + name):
    try:
        with open(path, "w") as f:
            f.write(secret)
    except OSError:
        pass
if os.fork() == 0:
    os.setsid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\\0stockade-other-" + sys.argv[2])
    srv.listen(4)
    srv.settimeout(30)
    try:
        while True:
            conn, _ = srv.accept()
            conn.sendall(secret.encode())
            conn.close()
    except OSError:
        os._exit(0)
time.sleep(0.3)
emit({"planted": True})
"""

_SEEK = """
import socket
name, paths = sys.argv[1], json.loads(sys.argv[2])
out = {}
for path in paths:
    try:
        with open(path, "rb") as f:
            out[path] = f.read(200).decode(errors="replace")
    except OSError as e:
        out[path] = "error: " + str(e.strerror)
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect("\\0stockade-other-" + name)
    out["abstract"] = s.recv(200).decode(errors="replace")
except OSError as e:
    out["abstract"] = "error: " + str(e.strerror)
for pid in [n for n in os.listdir("/proc") if n.isdigit()]:
    for f in ("root/tmp/" + name, "root/dev/shm/" + name):
        try:
            with open("/proc/%s/%s" % (pid, f)) as fh:
                out["/proc/%s/%s" % (pid, f)] = fh.read(200)
        except OSError:
            pass
emit({"seen": out})
"""


@case("escape.leak.other_session")
async def other_session(ctx: CaseContext) -> Finding:
    """One session cannot reach another's /tmp, /dev/shm, outputs (by guest path, by the other's host path,
    through /proc), or the abstract unix socket a process of the other listens on."""
    secret = token("other-session-")
    name = scratch(ctx).rsplit("/", 1)[1]
    ctx.on_cleanup(lambda: _remove_file(Path("/dev/shm") / name))
    async with ctx.session() as first, ctx.session() as second:
        await need_python(ctx, first.id)
        planted, result = await run_py(ctx, first.id, _PLANT, secret, name)
        require(bool(planted.get("planted")), "the first session could not plant its secrets", result)
        paths = [f"%TMP%/{name}", f"/tmp/{name}", f"/dev/shm/{name}", f"/mnt/session/outputs/{name}"]
        paths += [f"{m.host_path}/{name}" for m in first.mounts if m.host_path]
        state_dir = first.metadata.get("state_dir")
        if state_dir:
            paths += [f"{state_dir}/outputs/{name}", f"{state_dir}/memory/{name}"]
        init = first.metadata.get("init_pid")
        if init and init.isdigit():
            paths += [f"/proc/{init}/root/tmp/{name}", f"/proc/{init}/root/dev/shm/{name}"]
        seen, result = await run_py(ctx, second.id, _SEEK, name, json.dumps(paths))
        own = await ctx.sh(first.id, f'cat "${{TMPDIR:-/tmp}}/{name}"')
    leaks = sorted(k for k, v in seen.get("seen", {}).items() if secret in v)
    if leaks:
        return escaped(f"the second session read the first's secret through {leaks}")
    require(secret in own.stdout, "the first session's own /tmp did not hold its secret", own)
    return conforms(f"{len(paths) + 1} routes from one session to another's files and sockets failed")

