"""Lifecycle escapes: a command that outlives its session's terminate, terminates that race each other or a
provision, a cancelled provision, cross-talk between concurrent execs, snapshots taken while the guest writes
and plants symlinks, confinement after resume and after restore, guessable session ids, and a failed start
that takes the session down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import string
import time
from datetime import timedelta

import anyio

from ...errors import LifecycleError, SandboxError, SessionNotFound, Unsupported
from ...models import OUTPUTS_MOUNT, NetworkPolicy, ResourceLimits, SandboxSession, SandboxState
from ..context import (
    CaseContext,
    Finding,
    Stop,
    case,
    conforms,
    escaped,
    not_applicable,
    not_measured,
    overrefused,
    probe_broken,
    show,
)
from ._canaries import processes_of_session, processes_with, sandbox_tree, still_running
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
    wait_until,
)

__all__: list[str] = []


@case("escape.life.exec_racing_terminate")
async def exec_racing_terminate(ctx: CaseContext) -> Finding:
    """terminate while an exec runs: the exec returns (result or error) instead of hanging, its process is
    gone from the host, and the next exec raises SessionNotFound."""
    needle = f"600.{secrets.randbelow(10**9):09d}"
    session = await ctx.provision(ctx.spec())
    # Where the guest's processes are not host processes (gVisor), they live only inside the sandbox's host
    # processes, which the backend names: those must go with the session.
    sandbox = sandbox_tree(session.metadata)
    seen_inside = False
    outcome: list[str] = []

    async def running() -> None:
        try:
            result = await ctx.exec(session.id, "sleep", needle, timeout=60)
            outcome.append(f"returned {show(result, 60)}")
        except SandboxError as exc:
            outcome.append(f"raised {type(exc).__name__}")

    with anyio.move_on_after(30) as hung:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running)
            started = await wait_until(lambda: bool(processes_with(needle)) or bool(outcome), 5)
            started = started and not outcome
            if not started and sandbox and not outcome:
                seen_inside = await _running_in_guest(ctx, session.id, needle)
            await ctx.terminate(session.id)
    left = await wait_until(lambda: not processes_with(needle), 5)
    sandbox_left = still_running(sandbox) if not await wait_until(lambda: not still_running(sandbox), 10) else []
    try:
        await ctx.exec(session.id, "true")
    except SessionNotFound:
        after = "SessionNotFound"
    else:
        return escaped("exec after terminate still ran")
    if hung.cancelled_caught:
        return overrefused("the running exec never returned after terminate")
    if not left:
        return escaped(f"the exec's process outlived terminate: {processes_with(needle)}")
    if sandbox_left:
        return escaped(f"the sandbox holding the exec's process outlived terminate: host pids {sandbox_left}")
    if started:
        return conforms(f"the running exec {outcome[0] if outcome else 'ended'}; its process is gone; next exec: "
                        f"{after}")
    if seen_inside:
        return conforms(f"the running exec {outcome[0] if outcome else 'ended'}; its process (seen in the guest, "
                        f"not a host process) went with the sandbox's {len(sandbox)} host processes; next exec: "
                        f"{after}")
    return not_measured(f"the exec's process was never seen on the host, so its end is unmeasured ({outcome})")


async def _running_in_guest(ctx: CaseContext, session_id: str, needle: str) -> bool:
    """Whether another exec sees the ``sleep <needle>`` process in the guest's /proc (retried for 5 s)."""
    pattern = "^sleep " + needle.replace(".", "[.]")
    script = (f"for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\" 2>/dev/null; echo; done "
              f"| grep -c '{pattern}'")
    for _ in range(10):
        try:
            result = await ctx.exec(session_id, "sh", "-c", script, timeout=10)
        except SandboxError:
            return False
        if result.stdout.strip() not in ("", "0"):
            return True
        await anyio.sleep(0.5)
    return False


@case("escape.life.terminate_racing_terminate")
async def terminate_racing_terminate(ctx: CaseContext) -> Finding:
    """Two terminates at once: one succeeds, the other raises SessionNotFound; never both succeed."""
    session = await ctx.provision(ctx.spec())
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await ctx.backend.terminate(session.id)
            outcomes.append("ok")
        except SessionNotFound:
            outcomes.append("SessionNotFound")
        except SandboxError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    ctx.calls += 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    ctx.live.pop(session.id, None)
    if outcomes.count("ok") > 1:
        return escaped(f"both concurrent terminates succeeded: {outcomes}")
    if sorted(outcomes) != ["SessionNotFound", "ok"]:
        return probe_broken(f"unexpected outcomes of two concurrent terminates: {outcomes}")
    return conforms("one terminate succeeded, the other raised SessionNotFound")


@case("escape.life.concurrent_execs")
async def concurrent_execs(ctx: CaseContext) -> Finding:
    """20 execs at once in one session, each printing 300 lines of its own token: every result holds exactly
    its own lines, nothing of another's."""
    tokens = [secrets.token_hex(6) for _ in range(20)]
    results: dict[str, str] = {}
    errors: list[str] = []
    async with ctx.session() as session:

        async def one(tok: str) -> None:
            script = f'i=0; while [ $i -lt 300 ]; do echo "{tok}-$i"; i=$((i+1)); done'
            try:
                results[tok] = (await ctx.sh(session.id, script, timeout=60)).stdout
            except SandboxError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        async with anyio.create_task_group() as tg:
            for tok in tokens:
                tg.start_soon(one, tok)
    mixed = [tok for tok, out in results.items() if any(o in out for o in tokens if o != tok)]
    wrong = [tok for tok, out in results.items() if out.splitlines() != [f"{tok}-{i}" for i in range(300)]]
    if mixed:
        return escaped(f"output of one exec appeared in another's result: {mixed}")
    if errors:
        return overrefused(f"{len(errors)} of 20 concurrent execs failed: {errors[:3]}")
    if wrong:
        return overrefused(f"{len(wrong)} of 20 concurrent execs lost or reordered their own output")
    return conforms("20 concurrent execs, 300 lines each, no cross-talk")


@case("escape.life.failed_start_keeps_session")
async def failed_start_keeps_session(ctx: CaseContext) -> Finding:
    """An exec that cannot start (missing command, missing cwd), with and without a timeout, fails alone: the
    session runs the next command. Two dozen attempts, because the failure this guards against can be a race."""
    outcomes: dict[str, int] = {}
    missing = "stockade-no-such-command-" + secrets.token_hex(3)
    attempts = [("cwd missing", "true", "/nonexistent-escape"), ("command missing", missing, None)]
    async with ctx.session() as session:
        for i in range(24):
            what, command, cwd = attempts[i % 2]
            timeout = 10.0 if i % 4 >= 2 else None
            try:
                result = await ctx.exec(session.id, command, cwd=cwd, timeout=timeout)
                outcome = f"exit {result.exit_code}"
            except SandboxError as exc:
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            try:
                after = await ctx.sh(session.id, "echo stockade-still-alive", timeout=10)
            except SandboxError as exc:
                return overrefused(f"a failed start ({what}, timeout={timeout}, attempt {i + 1}) took the session "
                                   f"down: {type(exc).__name__}: {exc}")
            if "stockade-still-alive" not in after.stdout:
                return overrefused(f"after a failed start the session stopped running commands: {show(after)}")
    return conforms(f"24 failed starts ({outcomes}); the session ran a command after each")


_PLANT = """
import time
victim_dir, victim_file, seconds, tmp, outputs = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
os.makedirs(tmp)
os.symlink(victim_file, tmp + "/abs-file")
os.symlink(victim_dir, outputs + "/abs-dir")
os.symlink("../" * 20 + victim_file.lstrip("/"), outputs + "/rel-file")
if os.fork() == 0:
    os.setsid()
    # Let go of the exec's stdio: the writer outlives the exec, and a backend may rightly refuse to snapshot a
    # process that still holds an exec's pipes (gVisor does); this case is about the files, not that.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    deadline, n = time.monotonic() + seconds, 0
    os.mkdir(tmp + "/swap-dir")
    os.symlink(victim_dir, tmp + "/swap-link")
    while time.monotonic() < deadline:
        n += 1
        with open(outputs + "/counter.txt", "w") as f:
            f.write(str(n))
        try:
            os.rename(tmp + "/swap-dir", tmp + "/swap-tmp")
            os.rename(tmp + "/swap-link", tmp + "/swap-dir")
            os.rename(tmp + "/swap-tmp", tmp + "/swap-link")
        except OSError:
            pass
    os._exit(0)
emit({"planted": True})
"""


async def _snapshot_gate(ctx: CaseContext, session_id: str) -> None:
    if ctx.caps.snapshot:
        return
    try:
        await ctx.snapshot(session_id)
    except Unsupported as exc:
        raise Stop(not_applicable(f"unsupported: no snapshot capability, and snapshot refuses ({exc})")) from exc
    raise Stop(escaped("capabilities lack snapshot, yet snapshot succeeded"))


_GREP = """
needle = sys.argv[1]
hits, files = [], 0
for root in json.loads(sys.argv[2]):
    for base, dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            if os.path.islink(path):
                continue
            files += 1
            try:
                with open(path, "rb") as f:
                    if needle.encode() in f.read(1 << 20):
                        hits.append(path)
            except OSError:
                pass
emit({"hits": hits, "files": files})
"""


@case("escape.life.snapshot_during_writes")
async def snapshot_during_writes(ctx: CaseContext) -> Finding:
    """Snapshots taken while the guest writes and swaps a directory in its temp dir with a symlink to a host
    directory (and has planted absolute and relative symlinks to a host file) capture no host file: a session
    restored from them holds no canary content, and the host files are unchanged."""
    victim_dir, victim, content = canary_dir(ctx)
    async with ctx.session() as session:
        await _snapshot_gate(ctx, session.id)
        await need_python(ctx, session.id)
        outputs = (await mounted_paths(ctx, session))[OUTPUTS_MOUNT]
        planted, result = await run_py(ctx, session.id, _PLANT, str(victim_dir), str(victim), "3", scratch(ctx),
                                       outputs)
        require(bool(planted.get("planted")), "the guest planted nothing", result)
        snapshots = []
        for _ in range(3):
            await anyio.sleep(0.3)
            snapshots.append(await ctx.snapshot(session.id))
    hits: list[str] = []
    for snap in snapshots:
        try:
            restored = await ctx.provision(ctx.spec(from_snapshot=snap.snapshot_id))
        except SandboxError as exc:
            return overrefused(f"a snapshot with planted symlinks cannot be restored: {type(exc).__name__}: {exc}")
        except Exception as exc:  # a foreign exception escaping provision is itself a finding
            return overrefused(f"restoring a snapshot with planted symlinks failed with {type(exc).__name__}: {exc}")
        # %TMP% is the guest's temp dir (where the probe planted its scratch), /tmp in a private view.
        roots = ["%TMP%", (await mounted_paths(ctx, restored))[OUTPUTS_MOUNT]]
        found, _ = await run_py(ctx, restored.id, _GREP, content, json.dumps(roots))
        hits += found.get("hits", [])
        await ctx.terminate(restored.id)
    if hits or victim.read_text() != content:
        return escaped(f"host file content captured into snapshots: {hits}")
    return conforms(f"{len(snapshots)} snapshots during writes and symlink swaps; restored sessions hold no host "
                    "content")


_PROBE_POLICY = """
import socket
out = {}
try:
    with open(sys.argv[1] + "/canary.txt", "a") as f:
        f.write("x")
    out["ro_write"] = "written"
except OSError as e:
    out["ro_write"] = "error: " + str(e.strerror)
try:
    out["outside_read"] = open(sys.argv[2]).read(100)
except OSError as e:
    out["outside_read"] = "error: " + str(e.strerror)
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=3).close()
    out["tcp"] = "connected"
except OSError as e:
    out["tcp"] = "error: " + str(e)
emit(out)
"""


async def _check_policy(ctx: CaseContext, session: SandboxSession, victim: str, content: str, listener_port: int,
                        memory: bool) -> list[str]:
    session_id = session.id
    ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
    found, _ = await run_py(ctx, session_id, _PROBE_POLICY, ro, victim, str(listener_port))
    problems = []
    if found.get("ro_write") == "written":
        problems.append("the read-only mount took a write")
    if content in str(found.get("outside_read")):
        problems.append("the outside canary was read")
    if found.get("tcp") == "connected":
        problems.append("the host listener was reached")
    if memory:
        big = await ctx.exec(session_id, "python3", "-I", "-c", "b = bytearray(256 << 20)\nprint('allocated')",
                             timeout=60)
        if "allocated" in big.stdout:
            problems.append("256 MiB allocated under memory_mb=64")
    return problems


@case("escape.life.policy_after_resume")
async def policy_after_resume(ctx: CaseContext) -> Finding:
    """A suspended session (idle suspension enabled; suspended through the backend's ``suspend()`` where it
    has one, else by waiting) resumed by the next exec still enforces its spec: read-only mount, nothing
    outside, deny-all network, memory limit."""
    ro_dir, _rf, _rc = canary_dir(ctx, writable=True)
    _vd, victim, content = canary_dir(ctx)
    memory = ctx.caps.memory_limit
    spec = ctx.spec(mounts=(mount(ro_dir, CANARY_TARGET),), network_policy=NetworkPolicy.deny_all(),
                    limits=ResourceLimits(idle_timeout=timedelta(seconds=1), memory_mb=64 if memory else None))
    await gated(ctx, spec, "suspend on idle with mounts and deny-all")
    listener = ctx.listener("127.0.0.1")
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)

        async def suspended() -> bool:
            ctx.calls += 1
            current = await ctx.backend.get_session(session.id)
            return current.state is SandboxState.SUSPENDED

        # The backend's own suspend() (an extension some backends have) gets there at once; otherwise idleness.
        suspend = getattr(ctx.backend, "suspend", None)
        if callable(suspend):
            ctx.calls += 1
            await suspend(session.id)
        seen = False
        for _ in range(60):
            try:
                if await suspended():
                    seen = True
                    break
            except Unsupported:
                break
            await anyio.sleep(0.25)
        if not seen:
            return not_measured("the session was not seen suspended within 15 s of idleness (or get_session is "
                                "not offered), so there was nothing to resume")
        problems = await _check_policy(ctx, session, str(victim), content, listener.port, memory)
    if problems or listener.connections:
        return escaped(f"after resume: {problems}")
    return conforms("suspended, resumed by exec; mount, filesystem, network" +
                    (" and memory limits" if memory else "") + " still enforced")


@case("escape.life.policy_after_restore")
async def policy_after_restore(ctx: CaseContext) -> Finding:
    """A session restored from a snapshot of a more permissive one (the mount read-write there, no memory
    limit) enforces its own, narrower spec: the mount read-only, nothing outside, deny-all, memory limit."""
    ro_dir, _rf, _rc = canary_dir(ctx, writable=True)
    _vd, victim, content = canary_dir(ctx)
    memory = ctx.caps.memory_limit
    listener = ctx.listener("127.0.0.1")
    wide = ctx.spec(mounts=(mount(ro_dir, CANARY_TARGET, writable=True),))
    await gated(ctx, wide, "a spec with mounts")
    async with ctx.session(wide) as session:
        await _snapshot_gate(ctx, session.id)
        outputs = (await mounted_paths(ctx, session))[OUTPUTS_MOUNT]
        await ctx.sh(session.id, f"echo before > '{outputs}/state.txt'")
        snap = await ctx.snapshot(session.id)
    narrow = ctx.spec(mounts=(mount(ro_dir, CANARY_TARGET),), network_policy=NetworkPolicy.deny_all(),
                      limits=ResourceLimits(memory_mb=64 if memory else None), from_snapshot=snap.snapshot_id)
    async with ctx.session(narrow) as restored:
        await need_python(ctx, restored.id)
        outputs = (await mounted_paths(ctx, restored))[OUTPUTS_MOUNT]
        state = await ctx.sh(restored.id, f"cat '{outputs}/state.txt'")
        problems = await _check_policy(ctx, restored, str(victim), content, listener.port, memory)
    if problems or listener.connections:
        return escaped(f"after restore: {problems}")
    require("before" in state.stdout, "the restored session did not hold the snapshot's files", state)
    return conforms("restored files present; the narrower spec is enforced" + (" (memory too)" if memory else ""))


@case("escape.life.terminate_during_provision")
async def terminate_during_provision(ctx: CaseContext) -> Finding:
    """terminate called again and again while provision of that id runs, and provisions cancelled early and
    half way through (by anyio's cancellation, and by asyncio's own where the engine runs on asyncio, as
    ``asyncio.wait_for`` or Ray cancelling a task does): none leaves a live session or its processes behind,
    then or a while later."""
    # 0: raced by terminate; 1: cancelled at once; 2: cancelled half way; 3, 4: by asyncio's cancellation, half
    # and a quarter of the way.
    ids = [f"escape-{secrets.token_hex(8)}" for _ in range(5)]
    provisioned: list[str] = []

    async def provision(sid: str) -> None:
        with contextlib.suppress(SandboxError):
            provisioned.append((await ctx.backend.provision(ctx.spec(session_id=sid))).id)

    async def provision_natively_cancelled(sid: str, after: float) -> None:
        with contextlib.suppress(SandboxError, asyncio.TimeoutError):
            provisioned.append((await asyncio.wait_for(ctx.backend.provision(ctx.spec(session_id=sid)), after)).id)

    # How long a whole provision takes here, so "half way" is half way on any backend (the quicker of two: the
    # first one on a backend may be a cold start).
    takes = []
    for _ in range(2):
        started = time.monotonic()
        async with ctx.session(ctx.spec()):
            takes.append(time.monotonic() - started)
    whole = min(takes)
    ctx.calls += 5
    landed = False
    native = _on_asyncio()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(provision, ids[0])
            for _ in range(400):
                try:
                    await ctx.backend.terminate(ids[0])
                    landed = True
                    break
                except (SessionNotFound, LifecycleError):  # not there yet, or still being placed
                    await anyio.sleep(0.01)
        # Cancelled provisions: whatever the backend does with them, once the caller has not been handed a
        # session, none may be left running.
        for sid, after in ((ids[1], 0.03), (ids[2], whole / 2)):
            with anyio.move_on_after(after):
                await provision(sid)
        if native:
            await provision_natively_cancelled(ids[3], whole / 2)
            await provision_natively_cancelled(ids[4], whole / 4)
        for sid in provisioned:  # the caller was handed these: ending them is its job, not a leak
            if sid != ids[0] or not landed:
                with contextlib.suppress(SessionNotFound):
                    await ctx.backend.terminate(sid)

        async def leftovers() -> dict[str, list[int]]:
            found = {sid: processes_of_session(sid) for sid in ids}
            with contextlib.suppress(Unsupported):
                listed = {s.id for s in await ctx.backend.list_sessions()}
                found.update({f"{sid} (listed)": [0] for sid in ids if sid in listed})
            return {sid: pids for sid, pids in found.items() if pids}

        # A provision cancelled while its work goes on elsewhere (a worker thread, a node) may finish after
        # the caller was told it was cancelled: allow it to be ended, then look again for one made late.
        left = await leftovers()
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            await anyio.sleep(0.1)
            left = await leftovers()
        if not left:
            await anyio.sleep(2)
            left = await leftovers()
    finally:
        with anyio.CancelScope(shield=True):
            for sid in ids:
                with contextlib.suppress(SandboxError):
                    await ctx.backend.terminate(sid)
    if left:
        return escaped(f"sessions or processes left behind: {left} (terminate during provision landed: {landed}; "
                       f"provision handed over {provisioned})")
    if not landed:
        return probe_broken("terminate never found the session being provisioned")
    handed = [i for i, sid in enumerate(ids) if i and sid in provisioned]
    return conforms(f"terminate landed while provisioning and left nothing; provisions cancelled at 0.03 s and "
                    f"half way ({whole / 2:.2f} s){', and by asyncio half and a quarter of the way' if native else ''} "
                    f"left nothing (handed over anyway: {handed or 'none'})")


@case("escape.life.terminate_cancelled")
async def terminate_cancelled(ctx: CaseContext) -> Finding:
    """terminate cancelled part way through (by anyio's cancellation, and by asyncio's own where the engine runs
    on asyncio), while an exec runs in the session: afterwards the session is either still there, and the next
    terminate ends it, or ends on its own; never claimed but left running, its processes alive while every later
    terminate is told the session is gone."""
    first = await ctx.provision(ctx.spec())
    started = time.monotonic()
    await ctx.terminate(first.id)
    whole = time.monotonic() - started  # so the cancellations land part way on any backend
    ways = ["anyio", "asyncio"] if _on_asyncio() else ["anyio"]
    # Early points hit the gap between claiming the session and ending it; later ones the ending itself.
    points = (0.0003, 0.0006, 0.001, whole / 4, whole / 2)
    tries = [(way, after) for after in points for way in ways]
    budget = time.monotonic() + 35  # of the case's 60 s: a slow backend tries fewer points, and says so
    left: list[str] = []
    seen = trees = tried = 0
    for way, after in tries:
        if left or time.monotonic() > budget:  # one leak is the verdict; more would only run out the clock
            break
        tried += 1
        needle = f"600.{secrets.randbelow(10**9):09d}"
        session = await ctx.provision(ctx.spec())
        sandbox = sandbox_tree(session.metadata)
        trees += bool(sandbox)
        returned = anyio.Event()

        async def sleeping(sid: str = session.id, needle: str = needle, returned: anyio.Event = returned) -> None:
            with contextlib.suppress(SandboxError):
                await ctx.exec(sid, "sleep", needle, timeout=15)  # bounds a hang where a session is left
            returned.set()

        ctx.calls += 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeping)
            seen += await wait_until(functools.partial(_running, needle), 5)
            if way == "anyio":
                with anyio.move_on_after(after):
                    await ctx.backend.terminate(session.id)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ctx.backend.terminate(session.id), after)
            with contextlib.suppress(SessionNotFound):  # the caller's retry
                await ctx.backend.terminate(session.id)
            ctx.live.pop(session.id, None)
            with anyio.move_on_after(10):  # the exec returns once its session is gone
                await returned.wait()
            hung = not returned.is_set()
            if hung:  # what the backend left running: killed, so that the exec's worker thread lets go
                problem = f"processes {processes_with(needle)}, sandbox {still_running(sandbox)}"
                for pid in processes_with(needle) + still_running(sandbox):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            tg.cancel_scope.cancel()
        gone = await wait_until(functools.partial(_ended, needle, sandbox), 5)
        if not hung:
            problem = f"processes {processes_with(needle)}, sandbox {still_running(sandbox)}"
        listed = False
        with contextlib.suppress(Unsupported):
            listed = session.id in {s.id for s in await ctx.backend.list_sessions()}
        if not gone or listed or hung:
            left.append(f"{way} cancelled at {after:.4f} s: {problem}, listed {listed}, the exec "
                        f"{'never returned' if hung else 'returned'}")
        if listed:
            with contextlib.suppress(SandboxError):
                await ctx.backend.terminate(session.id)
    if left:
        return escaped(f"a cancelled terminate and its retry left the session running: {left}")
    if not seen and not trees:
        return not_measured("the exec's process was never seen on the host and the backend names no sandbox "
                            "process, so what a cancelled terminate left is unmeasured")
    return conforms(f"{tried} of {len(tries)} terminates cancelled at 0.0003 s to half way ({whole / 2:.3f} s), "
                    f"by {' and '.join(ways)}: after a retry nothing of the session runs or is listed")


def _running(needle: str) -> bool:
    return bool(processes_with(needle))


def _ended(needle: str, sandbox: dict[int, int]) -> bool:
    return not processes_with(needle) and not still_running(sandbox)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        return False
    return True


_ALPHABET = set(string.ascii_letters + string.digits + "-_")


@case("escape.life.session_ids")
async def session_ids(ctx: CaseContext) -> Finding:
    """Minted session ids are long, random-looking and unrelated (no shared prefix, no counter), and a
    neighbour of a live id (last character changed) is not a session."""
    minted = []
    for _ in range(3):
        session = await ctx.provision(ctx.spec())
        minted.append(session.id)
    problems = []
    for sid in minted:
        if len(sid) < 16 or not set(sid) <= _ALPHABET | {"."}:
            problems.append(f"{sid!r} is short or oddly spelled")
    for a in minted:
        for b in minted:
            if a < b:
                common = len(_common_prefix(a, b))
                if common >= 8:
                    problems.append(f"{a!r} and {b!r} share {common} leading characters")
    neighbour = minted[0][:-1] + ("0" if minted[0][-1] != "0" else "1")
    try:
        await ctx.exec(neighbour, "true")
        problems.append(f"the neighbour id {neighbour!r} ran a command")
    except SessionNotFound:
        pass
    if problems:
        return escaped("guessable session ids: " + "; ".join(problems))
    return conforms(f"3 ids like {minted[0]!r}: unrelated; a neighbour id is unknown")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]

