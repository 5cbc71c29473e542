"""Resource escapes: fork bomb, memory bomb, filling /tmp and every other guest-writable place, descriptor
exhaustion, a CPU spin past its timeout, daemons left after terminate, zombies, a 10 GiB output flood, and
stdin the command never reads.

Every attack is bounded twice: by the limit it runs under, and by its own size (a "bomb" stops at a few times
the limit), so a backend that fails to enforce the limit is caught without the host paying for it. Host-side
figures (process counts, resident memory) are sampled while the attack runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path

import anyio

from ...errors import LifecycleError, SandboxError
from ...models import ResourceLimits
from ..context import CaseContext, Finding, case, conforms, escaped, not_measured, overrefused, show
from ._canaries import Sampler, host_rss_bytes, processes_with, sandbox_tree, still_running
from ._declared import declared_absent
from ._support import alive_after, gated, need_python, parse, require, run_py, source, unconfined, wait_until

__all__: list[str] = []

MiB = 1 << 20
FLOOD_SECONDS = 5  # the flood's size is 10 GiB; this bounds its cost where the backend is slower than that

_BOMB = """
import time
limit, needle = int(sys.argv[1]), sys.argv[2]
made, failed = 0, 0
for _ in range(4 * limit):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    made += 1
emit({"made": made, "failed": failed})
"""


@case("escape.res.fork_bomb")
async def fork_bomb(ctx: CaseContext) -> Finding:
    """Under pids_max=64 a fork loop of 256 gets at most 64 processes (counted in the guest and on the host),
    the session works again once they exit, and nothing of it outlives terminate."""
    limit = 64
    spec = ctx.spec(limits=ResourceLimits(pids_max=limit))
    await gated(ctx, spec, "a process-count limit")
    needle = "stockade-bomb-" + secrets.token_hex(6)
    ctx.on_cleanup(lambda: _kill_needle(needle))
    sampler = Sampler(lambda: len(processes_with(needle)))
    ctx.on_cleanup(sampler.close)
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _BOMB, str(limit), needle, timeout=30)
        host_peak = sampler.stop()
        recovered = await _retry_alive(ctx, session.id)
    gone = await wait_until(lambda: not processes_with(needle), 5)
    made = int(found.get("made", 0))
    if made >= limit or host_peak > limit:
        return escaped(f"{made} forks succeeded under pids_max={limit} (host saw {host_peak} at once)")
    if not gone:
        return escaped(f"bomb processes outlived terminate: {processes_with(needle)}")
    if not recovered:
        return overrefused("the session never ran a command again after the bomb's processes exited")
    require(made > 0, "the bomb could not fork at all", result)
    return conforms(f"{made} of {4 * limit} forks succeeded ({found.get('failed')} refused), host peak "
                    f"{host_peak}; the session recovered")


async def _retry_alive(ctx: CaseContext, session_id: str, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            result = await ctx.sh(session_id, "echo stockade-back", timeout=10)
        except SandboxError:
            result = None
        if result is not None and "stockade-back" in result.stdout:
            return True
        await anyio.sleep(0.5)
    return False


_ALLOC = """
import time
step, total = int(sys.argv[1]), int(sys.argv[2])
chunks = []
for i in range(total // step):
    chunk = bytearray(step << 20)
    for j in range(0, len(chunk), 4096):
        chunk[j] = 1
    chunks.append(chunk)
    sys.stdout.write("allocated %d\\n" % ((i + 1) * step))
    sys.stdout.flush()
emit({"allocated": total})
"""


@case("escape.res.memory_bomb")
async def memory_bomb(ctx: CaseContext) -> Finding:
    """Under memory_mb=64, touching 256 MiB is stopped (OOM kill or MemoryError) before the guest holds much
    more than 64 MiB (sampled on the host), and the session then allocates 16 MiB again (unless the backend
    declares ``oom_keeps_session`` false and the OOM kill ended the session: ``not_applicable``)."""
    limit = 64
    spec = ctx.spec(limits=ResourceLimits(memory_mb=limit))
    await gated(ctx, spec, "a memory limit")
    needle = "stockade-membomb-" + secrets.token_hex(6)
    ctx.on_cleanup(lambda: _kill_needle(needle))

    def guest_rss() -> int:
        return sum(host_rss_bytes(pid) for pid in processes_with(needle))

    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        sampler = Sampler(guest_rss)
        ctx.on_cleanup(sampler.close)
        big = await ctx.exec(session.id, "python3", "-I", "-c", source(_ALLOC), "8", str(4 * limit), needle,
                             timeout=60)
        peak = sampler.stop()
        try:
            small, _ = await run_py(ctx, session.id, _ALLOC, "8", "16", timeout=60)
        except LifecycleError as exc:
            if not big.oom_killed:
                raise
            small = {"session": str(exc)}  # the OOM kill took the session (judged below)
    reached = [line for line in big.stdout.splitlines() if line.startswith("allocated")]
    if f"allocated {4 * limit}" in reached or peak > (limit + 24) * MiB:
        return escaped(f"memory_mb={limit} not enforced: {reached[-1:] or 'nothing'}; host saw {peak // MiB} MiB")
    if "session" in small:
        measured = f"the bomb was OOM-killed at {reached[-1] if reached else 'the start'} MiB and took the session"
        return declared_absent(ctx, "oom_keeps_session", measured) or overrefused(f"{measured}: {small['session']}")
    if small.get("allocated") != 16:
        return overrefused(f"after the bomb, 16 MiB could not be allocated: {small}")
    stopped = "oom_killed" if big.oom_killed else ("MemoryError" if "MemoryError" in big.stderr else show(big, 120))
    return conforms(f"stopped at {reached[-1] if reached else 'the start'} MiB ({stopped}); host peak "
                    f"{peak // MiB} MiB; 16 MiB allocate afterwards")


_FILL = """
import errno
refuse_if_host_root()
size = int(sys.argv[1]) << 20
declared = set(json.loads(sys.argv[2]))
places = [TMP, "/tmp", "/var/tmp", "/dev/shm", "/dev", "/run", "/run/stockade", "/", "/mnt", "/home", "/root",
          os.environ.get("HOME", "/tmp")]
with open("/proc/self/mountinfo") as f:
    places += [line.split()[4] for line in f]
out = {}
block = b"\\0" * (1 << 20)
for place in dict.fromkeys(places):
    if place in declared or any(place.startswith(d + "/") for d in declared) or place.startswith(("/proc", "/sys")):
        continue
    path = os.path.join(place, ".stockade-fill-" + sys.argv[3])
    written = 0
    try:
        with open(path, "wb") as f:
            while written < size:
                written += f.write(block)
                f.flush()
    except OSError as e:
        pass
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if written:
        out[place] = written >> 20
emit({"written_mib": out})
"""


@case("escape.res.disk_fill")
async def disk_fill(ctx: CaseContext) -> Finding:
    """With tmp_mb=8, no guest-writable place except the declared mounts takes more than 8 MiB: /tmp (or
    $TMPDIR) is full at its size, and /dev/shm, /dev, /var/tmp, /run, / and every other mount point are not a
    way around it (each would be host memory or disk the spec never granted)."""
    limit = 8
    spec = ctx.spec(limits=ResourceLimits(tmp_mb=limit))
    await gated(ctx, spec, "a /tmp size")
    declared = ["/mnt/session/outputs", "/mnt/memory"]
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _FILL, str(3 * limit), json.dumps(declared),
                                     secrets.token_hex(4), timeout=60)
    unconfined(found)
    written: dict[str, int] = found.get("written_mib", {})
    over = {place: mib for place, mib in written.items() if mib > limit + 1}
    if over:
        return escaped(f"writable places beyond tmp_mb={limit} MiB (MiB accepted of {3 * limit}): {over}")
    require(bool(written), "the guest could not write anywhere, not even its temporary directory", result)
    return conforms(f"accepted MiB per place (of {3 * limit} tried): {written}")


_FDS = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
cap = min(hard if hard != resource.RLIM_INFINITY else 1 << 17, 1 << 17)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
except (ValueError, OSError):
    cap = soft
fds = []
try:
    while len(fds) < cap:
        fds.append(os.open("/dev/null", os.O_RDONLY))
    reason = "cap"
except OSError as e:
    reason = str(e.strerror)
emit({"opened": len(fds), "reason": reason, "hard": hard})
"""


@case("escape.res.fd_exhaustion")
async def fd_exhaustion(ctx: CaseContext) -> Finding:
    """A guest that opens descriptors until it cannot (soft limit raised to the hard one) stops at a per-process
    limit; the session and a second session keep working."""
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _FDS, timeout=60)
        await alive_after(ctx, session.id, "descriptor exhaustion")
        async with ctx.session() as other:
            second = await ctx.sh(other.id, "echo stockade-second")
    if "stockade-second" not in second.stdout:
        return escaped(f"a second session could not run a command after the exhaustion: {show(second)}")
    require(int(found.get("opened", 0)) > 0, "the guest opened no descriptor", result)
    return conforms(f"stopped after {found.get('opened')} descriptors ({found.get('reason')}, hard limit "
                    f"{found.get('hard')}); the session and another one work")


_SPIN = """
import time
needle = sys.argv[1]
for _ in range(2):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("python3", ["python3", "-c", "while True: pass", needle])
        os._exit(0)
    os.wait()
emit({"daemons": 2})
while True:
    pass
"""


@case("escape.res.cpu_spin_timeout")
async def cpu_spin_timeout(ctx: CaseContext) -> Finding:
    """A busy loop that outlives its 1 s timeout, with two double-forked busy daemons (setsid), is timed out
    and every spinning process of that exec is gone afterwards (checked on the host)."""
    needle = "stockade-spin-" + secrets.token_hex(6)
    ctx.on_cleanup(lambda: _kill_needle(needle))
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        result = await ctx.exec(session.id, "python3", "-I", "-c", source(_SPIN), needle, timeout=1)
        gone = await wait_until(lambda: not processes_with(needle), 5)
        left = processes_with(needle)
    if not result.timed_out:
        return escaped(f"the spinning exec was not timed out: {show(result)}")
    if not gone:
        return escaped(f"spinning processes survived the timeout: pids {left}")
    require(parse(result) is not None, "the spinner never started its daemons", result)
    return conforms("timed out; both double-forked spinning daemons are gone")


_DAEMONS = """
import signal
needle = sys.argv[1]
def daemon(code):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            os.execvpe("python3", ["python3", "-c", code, needle], dict(os.environ, STOCKADE_NEEDLE=needle))
        os._exit(0)
    os.wait()
daemon("import signal, time\\nfor s in (1, 2, 15): signal.signal(s, signal.SIG_IGN)\\ntime.sleep(600)")
daemon("import ctypes, os, time\\nctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\\n"
       "os.fork() or time.sleep(600)\\ntime.sleep(600)")
daemon("import os\\nos.execvp('sleep', ['sleep', '600'])")
emit({"started": 3})
"""


# The guest's own count of the daemons (their environment carries the needle), once they have started.
_IN_GUEST = """
import time
needle = sys.argv[1].encode()
deadline = time.monotonic() + 5
while True:
    running = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open("/proc/%s/environ" % pid, "rb") as f:
                    running += needle in f.read()
            except OSError:
                pass
    if running >= 3 or time.monotonic() > deadline:
        break
    time.sleep(0.1)
emit({"running": running})
"""


def _kill_needle(needle: str) -> None:
    """Cleanup for a backend that failed a case: the processes carrying our needle are ours to end."""
    for pid in set(processes_with(needle)) | set(_environ_has(needle)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _environ_has(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@case("escape.res.daemons_after_terminate")
async def daemons_after_terminate(ctx: CaseContext) -> Finding:
    """Daemons a command leaves behind (double-forked, setsid, ignoring SIGTERM/SIGHUP, one a child subreaper
    with a child of its own, one exec'd into ``sleep``) are gone from the host after terminate."""
    needle = "stockade-daemon-" + secrets.token_hex(6)
    ctx.on_cleanup(lambda: _kill_needle(needle))

    def alive() -> list[int]:
        return sorted(set(processes_with(needle)) | set(_environ_has(needle)))

    session = await ctx.provision(ctx.spec())
    await need_python(ctx, session.id)
    _found, result = await run_py(ctx, session.id, _DAEMONS, needle)
    before = alive()
    # Where the guest's processes are not host processes (gVisor), they live only inside the sandbox's host
    # processes, which the backend names: those must go.
    sandbox = sandbox_tree(session.metadata) if not before else {}
    running = 0
    if sandbox:
        seen, _ = await run_py(ctx, session.id, _IN_GUEST, needle)
        running = int(seen.get("running", 0))
    await ctx.terminate(session.id)
    gone = await wait_until(lambda: not alive(), 5)
    if not gone:
        return escaped(f"{len(alive())} daemons outlived terminate: pids {alive()}")
    if before:
        return conforms(f"{len(before)} daemon processes before terminate, none after")
    if not sandbox or running < 3:
        return not_measured("the guest's processes are not visible from the host, so survivors cannot be "
                            f"counted there ({show(result)}; {running} seen in the guest)")
    if not await wait_until(lambda: not still_running(sandbox), 10):
        return escaped(f"the sandbox holding {running} daemon processes outlived terminate: host pids "
                       f"{still_running(sandbox)}")
    return conforms(f"{running} daemon processes seen in the guest (not host processes); the sandbox holding "
                    f"them ({len(sandbox)} host processes) is gone after terminate")


_ZOMBIES = """
import time
pids = []
for _ in range(40):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pids.append(pid)
time.sleep(0.5)
zombies = 0
for pid in pids:
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                zombies += 1
    except (OSError, IndexError):
        pass
emit({"zombies_while_parent_lives": zombies, "pids": pids})
"""

# Only the probe's own children are counted: where the guest sees the host's processes (no pid namespace),
# zombies of unrelated host work must not count against the backend.
_COUNT_Z = """
z = 0
for pid in json.loads(sys.argv[1]):
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                z += 1
    except (OSError, IndexError):
        pass
emit({"zombies": z})
"""


@case("escape.res.zombies")
async def zombies(ctx: CaseContext) -> Finding:
    """40 children that exit while their parent never waits are zombies only as long as the parent lives:
    once it exits, the session's supervisor reaps them, so they cannot pile up and eat the pid budget."""
    async with ctx.session() as session:
        await need_python(ctx, session.id)
        made, result = await run_py(ctx, session.id, _ZOMBIES)
        left: dict[str, object] = {}

        async def reaped() -> bool:
            nonlocal left
            left, _ = await run_py(ctx, session.id, _COUNT_Z, json.dumps(made.get("pids", [])))
            return left.get("zombies") == 0

        ok = False
        for _ in range(20):
            if await reaped():
                ok = True
                break
            await anyio.sleep(0.25)
    require(int(str(made.get("zombies_while_parent_lives", 0))) >= 40, "the probe made no zombies", result)
    if not ok:
        return overrefused(f"orphaned zombies are never reaped ({left.get('zombies')} left): the session will run "
                           "out of pids")
    return conforms(f"{made['zombies_while_parent_lives']} zombies while the parent lived, none after it exited")


_FLOOD = """
import os, sys
block = b"x" * (1 << 20)
n, total = 0, int(sys.argv[1]) << 20
while n < total:
    n += os.write(1, block)
    if n % (1 << 30) == 0:
        sys.stderr.write("stockade-flood-gib %d\\n" % (n >> 30))
        sys.stderr.flush()
sys.stderr.write("stockade-flood-done\\n")
"""


@case("escape.res.stdout_flood")
async def stdout_flood(ctx: CaseContext) -> Finding:
    """A 10 GiB stdout flood under output_limit_bytes=1 MiB, cut by a 5 s timeout if it is not done by then:
    captured output stays at the limit, ``truncated`` is reported, and the host side's resident memory grows by
    at most a few times the limit (sampled while the flood runs)."""
    limit = MiB
    spec = ctx.spec(limits=ResourceLimits(output_limit_bytes=limit))
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        sampler = Sampler(host_rss_bytes)
        ctx.on_cleanup(sampler.close)
        result = await ctx.exec(session.id, "python3", "-I", "-c", _FLOOD, str(10 << 10), timeout=FLOOD_SECONDS)
        peak = sampler.stop()
    growth = peak - sampler.first
    captured = len(result.stdout.encode())
    gib = [line for line in result.stderr.splitlines() if line.startswith("stockade-flood-gib")]
    if captured > limit + 64 * 1024 or growth > 64 * MiB + 8 * limit:
        return escaped(f"output not bounded: {captured} bytes captured, host memory grew {growth // MiB} MiB")
    if not result.truncated:
        return escaped(f"the flood was cut to {captured} bytes without truncated being reported")
    if "stockade-flood-done" in result.stderr:
        how = "all 10 GiB written"
    else:
        written = f"{gib[-1].split()[-1]} GiB" if gib else "less than 1 GiB"
        how = f"{written} written before the {FLOOD_SECONDS} s timeout"
    return conforms(f"{how}; {captured} bytes kept, truncated reported, host memory +{growth // MiB} MiB")


@case("escape.res.output_admitted")
async def output_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: 300 KiB of output under the default limits arrive complete, not truncated."""
    async with ctx.session() as session:
        result = await ctx.sh(session.id, "head -c 307200 /dev/zero | tr '\\0' 'y'")
    if result.stdout == "y" * 307200 and not result.truncated:
        return conforms("300 KiB arrived whole")
    return overrefused(f"got {len(result.stdout)} bytes, truncated={result.truncated}: {show(result, 80)}")


@case("escape.res.stdin_unread")
async def stdin_unread(ctx: CaseContext) -> Finding:
    """8 MiB of stdin to a command that never reads it, or closes it after 10 bytes, neither hangs the exec
    nor the session; 1 MiB to ``cat`` comes back whole (control)."""
    big = "z" * (8 * MiB)
    async with ctx.session() as session:
        ignored = await ctx.sh(session.id, "sleep 0.2; echo ignored-ok", stdin=big, timeout=30)
        head = await ctx.sh(session.id, "head -c 10 >/dev/null; echo head-ok", stdin=big, timeout=30)
        echoed = await ctx.exec(session.id, "cat", stdin="q" * MiB, timeout=30)
    problems = [f"{name}: {show(r, 80)}" for name, r, mark in (("ignored", ignored, "ignored-ok"),
                                                               ("head", head, "head-ok"))
                if r.timed_out or mark not in r.stdout]
    if problems:
        return overrefused(f"unread stdin hung or broke the exec: {problems}")
    if echoed.stdout != "q" * MiB:
        return overrefused(f"1 MiB of stdin did not come back from cat: {len(echoed.stdout)} bytes")
    return conforms("unread and half-read 8 MiB stdin returned at once; cat echoed 1 MiB")

