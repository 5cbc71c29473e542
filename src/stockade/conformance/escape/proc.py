"""Process escapes: host processes (seen, signalled, traced, read), the session's supervisor, capabilities,
seccomp and no_new_privs on every thread, blocked system calls, TIOCSTI into the caller's terminal
(bubblewrap CVE-2017-5226), ``/proc/self/exe`` (runc CVE-2019-5736) and nested user namespaces.

The canary is a host process with a unique command line (``sleep 600.<random>``): the guest must not find it
in its /proc, and afterwards the host checks it is still running, not stopped and not traced.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import secrets
import shutil
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from ..canaries import token
from ..context import CaseContext, Finding, case, conforms, escaped, not_measured, overrefused, show
from ._canaries import HostProcess
from ._declared import declared_absent
from ._support import (
    CANARY_TARGET,
    alive_after,
    canary_dir,
    gated,
    mount,
    mounted_paths,
    need_python,
    require,
    run_py,
    unconfined,
)
from ._syscalls import ALLOWED, BLOCKED, PROBE

__all__: list[str] = []


def _host_process(ctx: CaseContext) -> HostProcess:
    proc = HostProcess()
    ctx.on_cleanup(proc.close)
    return proc


_SCAN = """
needle, host_pid = sys.argv[1] + sys.argv[2], int(sys.argv[3])  # split: our own argv must not match
found, pids = [], []
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    pids.append(int(name))
    try:
        with open("/proc/%s/cmdline" % name, "rb") as f:
            if needle.encode() in f.read():
                found.append(int(name))
    except OSError:
        pass
try:
    os.kill(host_pid, 0)
    signal0 = "delivered"
except OSError as e:
    signal0 = "error: " + str(e.strerror)
emit({"found": found, "pids": sorted(pids), "signal0": signal0, "host_pid_dir": os.path.exists("/proc/%d" % host_pid)})
"""


async def _scan(ctx: CaseContext, session_id: str, proc: HostProcess) -> dict[str, object]:
    half = len(proc.needle) // 2
    found, result = await run_py(ctx, session_id, _SCAN, proc.needle[:half], proc.needle[half:], str(proc.pid))
    require(bool(found.get("pids")), "the guest listed no process in /proc", result)
    return found


@case("escape.proc.host_visible")
async def host_visible(ctx: CaseContext) -> Finding:
    """No host process is visible in the guest's /proc: not the canary by its command line, not its pid."""
    proc = _host_process(ctx)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found = await _scan(ctx, session.id, proc)
    if found.get("found"):
        seen = f"host process {proc.pid} ('sleep {proc.needle}') visible in the guest as {found['found']}"
        return declared_absent(ctx, "process_isolation", seen) or escaped(seen)
    pids = found.get("pids")
    return conforms(f"the guest sees pids {pids}; the host canary (pid {proc.pid}) is not among them")


_SIGNAL = """
import signal
host_pid = int(sys.argv[1])
out = {}
for sig in ("SIGSTOP", "SIGKILL"):
    try:
        os.kill(host_pid, getattr(signal, sig))
        out[sig] = "delivered"
    except OSError as e:
        out[sig] = "error: " + str(e.strerror)
emit({"signals": out})
"""


@case("escape.proc.signal_host")
async def signal_host(ctx: CaseContext) -> Finding:
    """The guest cannot stop or kill a host process by pid, nor with ``kill -9 -1``; after ``kill -9 -1`` the
    session still runs commands (its supervisor survives).

    ``kill -9 -1`` is sent only once the guest has shown it cannot see or signal the canary (a guest that
    shares the host's pid namespace as root would otherwise kill the host).
    """
    proc = _host_process(ctx)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found = await _scan(ctx, session.id, proc)
        signals, _ = await run_py(ctx, session.id, _SIGNAL, str(proc.pid))
        delivered = [sig for sig, outcome in signals.get("signals", {}).items() if outcome == "delivered"]
        if found.get("signal0") == "delivered" or delivered or proc.harmed():
            return escaped(f"the guest can signal host process {proc.pid}: {found}, {signals}; "
                           f"the canary is {proc.harmed() or 'unharmed'} (kill -9 -1 not tried)")
        if found.get("found"):
            # Visible but not signallable: kill -9 -1 is still not tried (a shared pid namespace is one broken
            # signal scope away from killing the host).
            seen = (f"host process {proc.pid} is visible ({found['found']}) but signals to it are refused "
                    f"({signals.get('signals')}); kill -9 -1 not tried")
            return declared_absent(ctx, "process_isolation", seen) or escaped(seen)
        await ctx.sh(session.id, "kill -9 -1; kill -STOP -1; true", timeout=10)
        await alive_after(ctx, session.id, "kill -9 -1")
    harmed = proc.harmed()
    if harmed:
        return escaped(f"the host canary process {proc.pid} was {harmed}")
    return conforms(f"host pid {proc.pid} unreachable ({signals.get('signals')}); kill -9 -1 harmed neither the "
                    "host nor the session")


@case("escape.proc.signal_own_admitted")
async def signal_own_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: the guest can signal its own processes (a background sleep is killed)."""
    script = "sleep 300 & p=$!; kill -9 $p; wait $p; echo status=$?"
    async with ctx.session() as session:
        result = await ctx.sh(session.id, script)
    if "status=137" in result.stdout:
        return conforms("a background process of the guest was killed by the guest")
    return overrefused(f"the guest could not kill its own background process: {show(result)}")


_TRACE = """
import ctypes
refuse_if_host_root()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
machine = os.uname().machine
nr = {"x86_64": (101, 310), "aarch64": (117, 270)}.get(machine)
out = {}
for pid in [int(p) for p in json.loads(sys.argv[1])]:
    r = {}
    if nr is not None:
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(nr[0]), ctypes.c_long(0x4206), ctypes.c_long(pid), 0, 0)  # SEIZE
        r["ptrace_seize"] = "ok" if ret == 0 else os.strerror(ctypes.get_errno())
        buf = ctypes.create_string_buffer(64)
        class iovec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
        remote = iovec(0x400000, 64)
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(nr[1]), ctypes.c_long(pid), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        r["process_vm_readv"] = ("read %d" % ret) if ret >= 0 else os.strerror(ctypes.get_errno())
    for name in ("mem", "environ", "maps", "fd"):
        path = "/proc/%d/%s" % (pid, name)
        try:
            if name == "fd":
                names = os.listdir(path)
                resolved = 0
                for fd in names:
                    try:
                        os.readlink(path + "/" + fd)
                        resolved += 1
                    except OSError:
                        pass
                r[name] = ("resolved %d of %d" % (resolved, len(names))) if resolved else "error: no fd resolved"
                continue
            with open(path, "rb") as f:
                r[name] = "opened"
                if name == "environ":
                    r["environ_text"] = f.read(65536).decode(errors="replace")
        except (OSError, ValueError) as e:
            r[name] = "error: " + str(getattr(e, "strerror", None) or e)
    out[str(pid)] = r
emit({"targets": out})
"""


def _gained(targets: dict[str, dict[str, str]]) -> list[str]:
    gained = []
    for pid, outcomes in targets.items():
        for what, outcome in outcomes.items():
            if what == "environ_text":
                continue
            # EFAULT from process_vm_readv means the permission check passed and only the address was wrong.
            if outcome in ("ok", "opened", "Bad address") or outcome.startswith(("read ", "resolved ")):
                gained.append(f"pid {pid} {what}: {outcome}")
    return gained


@case("escape.proc.ptrace_host")
async def ptrace_host(ctx: CaseContext) -> Finding:
    """The guest cannot attach to (``PTRACE_SEIZE``), read the memory of (``process_vm_readv``,
    ``/proc/<pid>/mem``), or read the environment or descriptors of a host process, named by its host pid."""
    proc = _host_process(ctx)
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _TRACE, json.dumps([proc.pid, os.getpid()]))
    unconfined(found)
    harmed = proc.harmed()
    gained = _gained(found.get("targets", {}))
    if harmed or gained:
        return escaped(f"host processes reachable: {gained}; canary {harmed or 'unharmed'}")
    require(bool(found.get("targets")), "the trace probe reported no target", result)
    return conforms(f"host pids {proc.pid} and {os.getpid()} (the launcher): every attempt failed "
                    f"({found['targets'][str(proc.pid)]})")


@case("escape.proc.ptrace_supervisor")
async def ptrace_supervisor(ctx: CaseContext) -> Finding:
    """The session's own supervisor (pid 1 of the guest, or whatever started the command) cannot be traced or
    read by a command, so a secret in another exec's request (its environment) stays out of reach.

    A backend that declares ``private_supervisor`` false ends ``not_applicable`` when /proc entries open, unless
    the secret shows in them."""
    secret = token("supervisor-secret-")
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        # Another exec whose request carries the secret, still running while the probe looks.
        async with _background(ctx, session.id, {"STOCKADE_ESCAPE_SECRET": secret}):
            ids, _ = await run_py(ctx, session.id, "emit({'ppid': os.getppid(), 'pid': os.getpid()})")
            targets = sorted({1, int(ids.get("ppid", 1))})
            found, result = await run_py(ctx, session.id, _TRACE, json.dumps(targets))
    unconfined(found)
    outcomes: dict[str, dict[str, str]] = found.get("targets", {})
    gained = _gained(outcomes)
    leaked = [pid for pid, o in outcomes.items() if secret in o.get("environ_text", "")]
    if leaked or gained:
        seen = f"the supervisor is reachable from a command: {gained}; secret in environ of {leaked}"
        # A declared gap covers reading the supervisor, never another exec's secret showing up there.
        return (None if leaked else declared_absent(ctx, "private_supervisor", seen)) or escaped(seen)
    require(bool(outcomes), "the trace probe reported no target", result)
    return conforms(f"supervisor pids {targets}: no attach, no memory, environ or fd access")


@contextlib.asynccontextmanager
async def _background(ctx: CaseContext, session_id: str, env: dict[str, str]) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_quiet_exec, ctx, session_id, env)
        await anyio.sleep(0.2)
        yield
        tg.cancel_scope.cancel()


async def _quiet_exec(ctx: CaseContext, session_id: str, env: dict[str, str]) -> None:
    with contextlib.suppress(Exception):
        await ctx.sh(session_id, "sleep 5", env=env, timeout=6)


_CAPS = """
import threading, subprocess
def fields(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Uid", "Name"):
                    out[k] = v.strip()
    except OSError:
        pass
    return out
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in threads:
    t.start()
# The session's own processes only: this probe, its parent, and the daemon an earlier exec left (found by
# the needle in its command line). Where the guest also sees host processes, those are not its business here.
needle = sys.argv[1] + sys.argv[2]
mine = {str(os.getpid()), str(os.getppid())}
for pid in [n for n in os.listdir("/proc") if n.isdigit()]:
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            if needle.encode() in f.read():
                mine.add(pid)
    except OSError:
        pass
tasks = {}
for pid in sorted(mine):
    try:
        tids = os.listdir("/proc/%s/task" % pid)
    except OSError:
        continue
    for tid in tids:
        tasks["%s/%s" % (pid, tid)] = fields("/proc/%s/task/%s/status" % (pid, tid))
stop.set()
for t in threads:
    t.join()
nested = subprocess.run(["sh", "-c", "exec python3 -I -c 'print(open(\\"/proc/self/status\\").read())'"],
                        capture_output=True, text=True).stdout
emit({"tasks": tasks, "nested": nested})
"""


def _bad_fields(status: dict[str, str]) -> list[str]:
    bad = []
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if key in status and int(status[key], 16) != 0:
            bad.append(f"{key}={status[key]}")
    if status.get("NoNewPrivs") not in (None, "1"):
        bad.append(f"NoNewPrivs={status['NoNewPrivs']}")
    if status.get("Seccomp") not in (None, "2"):
        bad.append(f"Seccomp={status['Seccomp']}")
    return bad


@case("escape.proc.caps_seccomp_every_thread")
async def caps_seccomp_every_thread(ctx: CaseContext) -> Finding:
    """Every thread of the session's processes (a multi-threaded probe, its parent, a daemon an earlier exec
    left, a command two execs deep) has CapInh/CapPrm/CapEff/CapBnd/CapAmb 0, no_new_privs 1 and seccomp mode
    2 (filter)."""
    needle = f"30.{secrets.randbelow(10**9):09d}"
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        # A daemon left behind by an earlier exec: its threads count too.
        await ctx.sh(session.id, f"(setsid sleep {needle} </dev/null >/dev/null 2>&1 &); true")
        found, result = await run_py(ctx, session.id, _CAPS, needle[:5], needle[5:])
    tasks: dict[str, dict[str, str]] = found.get("tasks", {})
    problems = {task: _bad_fields(status) for task, status in tasks.items() if _bad_fields(status)}
    nested = {k: v.strip() for line in str(found.get("nested", "")).splitlines() for k, _, v in [line.partition(":")]}
    nested_bad = _bad_fields(nested)
    if problems or nested_bad:
        return escaped(f"privileged or unfiltered threads: {problems}; a command two execs deep: {nested_bad}")
    readable = [t for t, s in tasks.items() if "CapEff" in s]
    require(len(readable) >= 5 and "Seccomp" in nested, "too few threads had a readable status", result)
    return conforms(f"{len(readable)} threads (of {len(tasks)}) checked: no capabilities, no_new_privs, seccomp "
                    "filter; the nested command too")


def _reached(results: dict[str, str]) -> dict[str, str]:
    blocked = {"EPERM", "ENOSYS", "EACCES", "absent"}
    return {name: outcome for name, outcome in results.items() if outcome not in blocked}


@case("escape.proc.blocked_syscalls")
async def blocked_syscalls(ctx: CaseContext) -> Finding:
    """The dangerous system calls (mount family, namespaces, keyring, bpf, perf, userfaultfd, io_uring,
    ptrace and process_vm_*, handles, kexec and modules, reboot, swap, clock, TIOCSTI and its high-bit variant
    CVE-2019-10063, TIOCLINUX, personality) come back EPERM/ENOSYS; any EFAULT/EBADF/EINVAL/ESRCH means the
    call reached the kernel (see escape.proc.allowed_syscalls_admitted for the probe's control)."""
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, _result = await run_py(ctx, session.id, PROBE, json.dumps(BLOCKED))
    results: dict[str, str] = found.get("results", {})
    if not results:
        return not_measured(f"no syscall table for the guest's architecture {found.get('arch')!r}")
    reached = _reached(results)
    if reached:
        return escaped(f"system calls that reached the kernel: {reached}")
    return conforms(f"all {len(results)} blocked on {found.get('arch')} "
                    f"(e.g. mount {results.get('mount')}, clone3 {results.get('clone3')})")


@case("escape.proc.allowed_syscalls_admitted")
async def allowed_syscalls_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling (and the control of the probe): ordinary calls with the same bad arguments come back
    EFAULT/EBADF, not EPERM, so "blocked" above is the filter and not the probe."""
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, _result = await run_py(ctx, session.id, PROBE, json.dumps(ALLOWED))
    results: dict[str, str] = found.get("results", {})
    if not results:
        return not_measured(f"no syscall table for the guest's architecture {found.get('arch')!r}")
    refused = {n: o for n, o in results.items() if n not in _reached(results)}
    if refused:
        return overrefused(f"ordinary system calls refused: {refused}")
    return conforms(f"all {len(results)} reached the kernel: {results}")


_TIOCSTI = """
import fcntl, termios
payload = sys.argv[1] + "\\n"
out = {}
candidates = ["/dev/tty"]
for pid in [n for n in os.listdir("/proc") if n.isdigit()] + ["self"]:
    try:
        candidates += ["/proc/%s/fd/%s" % (pid, fd) for fd in os.listdir("/proc/%s/fd" % pid)]
    except OSError:
        pass
for path in candidates:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        continue
    try:
        if not os.isatty(fd):
            continue
        for ch in payload:
            fcntl.ioctl(fd, termios.TIOCSTI, ch.encode())
        out[path] = "injected"
    except OSError as e:
        out[path] = "error: " + str(e.strerror)
    finally:
        os.close(fd)
for fd in range(0, 64):
    try:
        if os.isatty(fd):
            fcntl.ioctl(fd, termios.TIOCSTI, b"x")
            out["fd %d" % fd] = "injected"
    except OSError as e:
        out["fd %d" % fd] = "error: " + str(e.strerror)
emit({"ttys": out})
"""


@case("escape.proc.tiocsti")
async def tiocsti(ctx: CaseContext) -> Finding:
    """The guest cannot push input into the caller's terminal (bubblewrap CVE-2017-5226): the launching
    process holds an inheritable pty; whatever the guest finds that is a tty, TIOCSTI into it does not reach
    that pty's input queue."""
    master, slave = os.openpty()
    for fd in (master, slave):
        os.set_inheritable(fd, True)
        ctx.on_cleanup(functools.partial(os.close, fd))
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ICANON  # non-canonical: injected bytes are readable without a newline
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    payload = token("tiocsti-")
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _TIOCSTI, payload)
    injected = b""
    flags = fcntl.fcntl(slave, fcntl.F_GETFL)
    fcntl.fcntl(slave, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError, OSError):
        injected = os.read(slave, 4096)
    if payload.encode() in injected:
        return escaped(f"the guest typed into the caller's terminal: {injected[:80]!r} ({found.get('ttys')})")
    require("ttys" in found, "the TIOCSTI probe did not run", result)
    attempts = found.get("ttys") or "no tty found"
    return conforms(f"nothing reached the caller's pty; the guest's tty attempts: {attempts}")


_EXE = """
import time, subprocess
victim, marker = sys.argv[1], sys.argv[2].encode()
child = subprocess.Popen([victim, "-c", "sleep 1"])
time.sleep(0.3)
out = {}
try:
    path_fd = os.open("/proc/%d/exe" % child.pid, os.O_PATH)
    out["o_path"] = "ok"
except OSError as e:
    path_fd = -1
    out["o_path"] = "error: " + str(e.strerror)
try:
    os.close(os.open("/proc/%d/exe" % child.pid, os.O_WRONLY | os.O_APPEND))
    out["write_while_running"] = "opened"
except OSError as e:
    out["write_while_running"] = "error: " + str(e.strerror)
child.wait()
if path_fd >= 0:
    try:
        fd = os.open("/proc/self/fd/%d" % path_fd, os.O_WRONLY | os.O_APPEND)
        os.write(fd, marker)
        os.close(fd)
        out["write_after_exit"] = "written"
    except OSError as e:
        out["write_after_exit"] = "error: " + str(e.strerror)
for pid in ["self", "1", str(os.getppid())]:
    try:
        # Opened for writing only, never written: these are the host's own binaries.
        os.close(os.open("/proc/%s/exe" % pid, os.O_WRONLY | os.O_APPEND))
        out["exe " + pid] = "opened"
    except OSError as e:
        out["exe " + pid] = "error: " + str(e.strerror)
emit({"exe": out})
"""


def _stage_binary(original: str, target: Path) -> Path:
    shutil.copy(os.path.realpath(original), target)
    target.chmod(0o755)
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@case("escape.proc.proc_self_exe")
async def proc_self_exe(ctx: CaseContext) -> Finding:
    """A binary the host provides read-only (a copy of ``sh`` in a mount) cannot be overwritten through
    ``/proc/<pid>/exe`` while it runs or after it exits (runc CVE-2019-5736), and the guest's own interpreter
    and supervisor binaries do not open for writing."""
    shell = shutil.which("sh")
    if shell is None:
        return not_measured("the host has no sh to stage a canary binary with")
    directory, _f, _c = canary_dir(ctx)
    victim = _stage_binary(shell, directory / "victim-sh")
    before = _digest(victim)
    m = mount(directory, CANARY_TARGET)
    await gated(ctx, ctx.spec(mounts=(m,)), "a spec with mounts")
    marker = "stockade-overwritten-" + secrets.token_hex(6)
    async with ctx.session(mounts=(m,)) as session:
        await need_python(ctx, session.id)
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        found, result = await run_py(ctx, session.id, _EXE, f"{ro}/victim-sh", marker)
    outcomes: dict[str, str] = found.get("exe", {})
    opened = {k: v for k, v in outcomes.items() if v in ("opened", "written")}
    if _digest(victim) != before or opened:
        return escaped(f"binaries writable through /proc/<pid>/exe: {opened}; host copy changed: "
                       f"{_digest(victim) != before}")
    require(bool(outcomes), "the /proc/<pid>/exe probe did not run", result)
    return conforms(f"host binary unchanged; attempts: {outcomes}")


@case("escape.proc.userns_nesting")
async def userns_nesting(ctx: CaseContext) -> Finding:
    """No nested user namespace (``unshare -Ur``, ``unshare(CLONE_NEWUSER)``, bubblewrap inside the guest):
    a fresh user namespace would hand the guest a full set of capabilities again."""
    script = (
        "unshare -Ur id -u 2>&1 | sed 's/^/unshare: /'; "
        "python3 -I -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); "
        "r=l.unshare(0x10000000); print(\"pyunshare:\", r, os.strerror(ctypes.get_errno()))' 2>&1; "
        "command -v bwrap >/dev/null && bwrap --ro-bind / / --unshare-user --uid 0 id -u 2>&1 "
        "| sed 's/^/bwrap: /'; echo stockade-done"
    )
    async with ctx.session() as session:
        result = await ctx.sh(session.id, script)
    lines = result.stdout.splitlines()
    got_root = [line for line in lines if line in ("unshare: 0", "bwrap: 0") or line.startswith("pyunshare: 0 ")]
    if got_root:
        return escaped(f"a nested user namespace was created: {got_root}")
    require("stockade-done" in lines, "the user-namespace probe did not run", result)
    return conforms("every attempt refused: " + "; ".join(line for line in lines if line != "stockade-done"))

