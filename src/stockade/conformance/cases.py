"""The conformance cases. Each is ``async def (ctx) -> Finding`` registered under a dotted id.

Rules every case keeps (the engine enforces the first two):
- it measures before it concludes: no backend call, no ``conforms``; an unexpected exception is
  ``probe_broken``;
- it provisions its own sessions and the engine terminates whatever it left;
- every refusal has an admitted sibling, because a backend that refuses everything passes every refusal case;
- a refusal is judged by a canary (random file content, env value, a listener that records connections) and
  only after the guest proved it ran, never by an exit code alone;
- expectations come from ``backend.capabilities()``: a missing flag means the operation must raise
  Unsupported.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import anyio

from ..errors import ExecError, SandboxError, SessionNotFound, Unsupported
from ..models import (
    MEMORY_MOUNT,
    OUTPUTS_MOUNT,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    ResourceLimits,
    SandboxState,
)
from .canaries import HostListener, host_processes_matching, token
from .context import (
    CaseContext,
    Finding,
    Stop,
    alive_marker,
    case,
    conforms,
    escaped,
    not_applicable,
    not_measured,
    overrefused,
    probe_broken,
    show,
)

__all__: list[str] = []

CANARY_TARGET = "/mnt/canary"
GUEST_TMP = '"${TMPDIR:-/tmp}"'
"""The guest's own scratch directory, as a shell word: /tmp in a private filesystem view, the session's TMPDIR on
a backend without one (whose /tmp is the host's)."""


def _require_alive(alive: bool, what: str, result_text: str) -> None:
    if not alive:
        raise Stop(probe_broken(f"the guest did not run the {what} probe, so the refusal is unmeasured: "
                                f"{result_text}"))


# ---------------------------------------------------------------------------------------------- lifecycle


@case("lifecycle.provision_running")
async def provision_running(ctx: CaseContext) -> Finding:
    """provision returns a running session carrying the backend's name."""
    async with ctx.session() as session:
        problems = []
        if session.state != SandboxState.RUNNING:
            problems.append(f"state is {session.state.value!r}, not 'running'")
        if session.backend != ctx.backend.name:
            problems.append(f"session.backend is {session.backend!r}, backend.name is {ctx.backend.name!r}")
    if problems:
        return overrefused("provision did not return a usable session: " + "; ".join(problems))
    return conforms(f"session {session.id} is running on {session.backend!r}")


@case("lifecycle.exec_simple")
async def exec_simple(ctx: CaseContext) -> Finding:
    """A trivial shell command runs and its output comes back."""
    script, expected = alive_marker()
    async with ctx.session() as session:
        result = await ctx.sh(session.id, script)
    if result.exit_code == 0 and result.stdout.strip() == expected:
        return conforms(f"sh -c printed {expected!r}")
    return overrefused(f"expected exit 0 and {expected!r}: {show(result)}")


@case("lifecycle.unknown_id")
async def unknown_id(ctx: CaseContext) -> Finding:
    """exec, terminate, snapshot and resume on a valid id that was never created raise SessionNotFound."""
    ghost = "conformance-never-" + secrets.token_hex(8)
    accepted: list[str] = []
    wrong: list[str] = []
    for operation in ("exec", "terminate", "snapshot", "resume"):
        try:
            if operation == "exec":
                await ctx.exec(ghost, "true")
            elif operation == "terminate":
                await ctx.terminate(ghost)
            elif operation == "snapshot":
                await ctx.snapshot(ghost)
            else:
                await ctx.resume(ghost)
        except SessionNotFound:
            continue
        except Unsupported as exc:
            # A backend without snapshot/resume may refuse the operation before looking at the id.
            if operation in ("snapshot", "resume") and not getattr(ctx.caps, operation):
                continue
            wrong.append(f"{operation} raised Unsupported although the capability is claimed: {exc}")
        except SandboxError as exc:
            wrong.append(f"{operation} raised {type(exc).__name__} instead of SessionNotFound: {exc}")
        else:
            accepted.append(operation)
    if accepted:
        return escaped(f"accepted {', '.join(accepted)} on never-created session {ghost!r}")
    if wrong:
        return probe_broken("; ".join(wrong))
    return conforms(f"exec, terminate, snapshot and resume on {ghost!r} raise SessionNotFound")


@case("lifecycle.terminate_twice")
async def terminate_twice(ctx: CaseContext) -> Finding:
    """A second terminate raises SessionNotFound."""
    session = await ctx.provision(ctx.spec())
    await ctx.terminate(session.id)
    try:
        await ctx.terminate(session.id)
    except SessionNotFound:
        return conforms("the second terminate raised SessionNotFound")
    return escaped(f"a second terminate of {session.id} succeeded: was the first one complete?")


@case("lifecycle.exec_after_terminate")
async def exec_after_terminate(ctx: CaseContext) -> Finding:
    """exec on a terminated session raises SessionNotFound (and runs nothing)."""
    session = await ctx.provision(ctx.spec())
    alive, before = await ctx.probe(session.id, "true")
    if not alive:
        return overrefused(f"the session could not run a trivial command before terminate: {show(before)}")
    await ctx.terminate(session.id)
    try:
        result = await ctx.sh(session.id, "echo still-here")
    except SessionNotFound:
        return conforms("exec after terminate raised SessionNotFound")
    return escaped(f"exec after terminate still ran: {show(result)}")


@case("lifecycle.files_persist_between_execs")
async def files_persist_between_execs(ctx: CaseContext) -> Finding:
    """A file written to the guest's temp dir (``$TMPDIR``, else /tmp) by one exec is read back by the next."""
    content = token("persist-")
    path = f"{GUEST_TMP}/stockade-persist-{secrets.token_hex(4)}"
    async with ctx.session() as session:
        write = await ctx.sh(session.id, f"printf %s {content} > {path}")
        read = await ctx.sh(session.id, f"cat {path}")
    if read.stdout.strip() == content:
        return conforms(f"{path} written by one exec was read by the next")
    return overrefused(f"the next exec did not see {path}: write {show(write)}; read {show(read)}")


@case("lifecycle.list_sessions")
async def list_sessions(ctx: CaseContext) -> Finding:
    """A live session is listed; a terminated one is not."""
    async with ctx.session() as session:
        try:
            listed = [s.id for s in await ctx.list_sessions()]
        except Unsupported as exc:
            return not_applicable(f"list_sessions is not offered: {exc}")
    if session.id not in listed:
        return overrefused(f"live session {session.id} missing from list_sessions ({len(listed)} listed)")
    after = [s.id for s in await ctx.list_sessions()]
    if session.id in after:
        return escaped(f"session {session.id} is still listed after terminate")
    return conforms("listed while live, gone after terminate")


# --------------------------------------------------------------------------------------------------- exec


@case("exec.exit_code")
async def exit_code(ctx: CaseContext) -> Finding:
    """A non-zero exit is data: ``exit 7`` gives exit_code 7, not an exception."""
    async with ctx.session() as session:
        try:
            result = await ctx.sh(session.id, "exit 7")
        except SandboxError as exc:
            return overrefused(f"exit 7 raised {type(exc).__name__} instead of returning exit_code 7: {exc}")
    if result.exit_code == 7 and not result.timed_out:
        return conforms("exit 7 -> exit_code 7")
    return overrefused(f"expected exit_code 7: {show(result)}")


@case("exec.stdout_stderr_separate")
async def stdout_stderr_separate(ctx: CaseContext) -> Finding:
    """stdout and stderr are captured separately."""
    out, err = token("out-"), token("err-")
    async with ctx.session() as session:
        result = await ctx.sh(session.id, f"echo {out}; echo {err} >&2")
    apart = out in result.stdout and err not in result.stdout
    if apart and err in result.stderr and out not in result.stderr:
        return conforms("stdout and stderr arrived apart")
    return overrefused(f"streams mixed or lost: {show(result)}")


@case("exec.stdin")
async def stdin(ctx: CaseContext) -> Finding:
    """``request.stdin`` reaches the command."""
    data = token("stdin-") + "\n"
    async with ctx.session() as session:
        result = await ctx.exec(session.id, "cat", stdin=data)
    if result.exit_code == 0 and result.stdout == data:
        return conforms("cat echoed stdin")
    return overrefused(f"expected stdout {data!r}: {show(result)}")


@case("exec.cwd")
async def cwd(ctx: CaseContext) -> Finding:
    """``request.cwd`` is the command's working directory."""
    async with ctx.session() as session:
        result = await ctx.sh(session.id, "pwd", cwd="/tmp")
    if result.exit_code == 0 and result.stdout.strip() == "/tmp":
        return conforms("cwd=/tmp -> pwd printed /tmp")
    return overrefused(f"expected /tmp: {show(result)}")


@case("exec.env_passed")
async def env_passed(ctx: CaseContext) -> Finding:
    """``request.env`` is visible to the command."""
    value = token("env-")
    async with ctx.session() as session:
        result = await ctx.sh(session.id, 'printf "%s\\n" "$STOCKADE_CONFORMANCE_FOO"',
                              env={"STOCKADE_CONFORMANCE_FOO": value})
    if result.stdout.strip() == value:
        return conforms("the request's env variable was visible")
    return overrefused(f"expected {value!r}: {show(result)}")


@case("exec.command_not_found")
async def command_not_found(ctx: CaseContext) -> Finding:
    """A missing command raises ExecError or exits 127, promptly."""
    missing = "stockade-no-such-command-" + secrets.token_hex(4)
    async with ctx.session() as session:
        try:
            result = await ctx.exec(session.id, missing, timeout=20)
        except ExecError as exc:
            return conforms(f"ExecError: {exc}")
    if result.exit_code == 127 and not result.timed_out:
        return conforms("exit code 127")
    return probe_broken(f"expected ExecError or exit 127 for a missing command: {show(result)}")


@case("exec.timeout_kills_tree")
async def timeout_kills_tree(ctx: CaseContext) -> Finding:
    """A 1 s timeout on a shell with two background sleeps reports timed_out and leaves no sleep behind."""
    digits = f"{secrets.randbelow(10**6):06d}"
    needle = f"300.{digits}"
    # Split in the scanning script so the scanner's own command line never matches.
    split = f"'300.''{digits}'"
    scan = (
        f"n={split}; k=0\n"
        "for f in /proc/[0-9]*/cmdline; do\n"
        "  c=$(tr '\\000' ' ' < \"$f\" 2>/dev/null) || continue\n"
        "  k=$((k+1))\n"
        '  case "$c" in *"$n"*) echo "left: $c";; esac\n'
        "done\n"
        'echo "scanned=$k"'
    )
    async with ctx.session() as session:
        started = time.monotonic()
        with anyio.move_on_after(25) as late:
            alive, result = await ctx.probe(session.id, f"sleep {needle} & sleep {needle} & wait", timeout=1)
        elapsed = time.monotonic() - started
        if late.cancelled_caught:
            return escaped("an exec with a 1 s timeout had not returned after 25 s")
        if not result.timed_out and not alive:
            return overrefused(f"the command did not run at all: {show(result)}")
        if not result.timed_out:
            return escaped(f"timed_out is false after {elapsed:.1f} s: {show(result)}")
        if elapsed > 11:
            return escaped(f"the 1 s timeout fired only after {elapsed:.1f} s")
        left: list[str] = []
        # The contract says the tree is gone when exec returns; a short grace absorbs SIGKILL delivery only.
        for _attempt in range(5):
            alive, scanned = await ctx.probe(session.id, scan)
            _require_alive(alive, "process scan", show(scanned))
            if "scanned=0" in scanned.stdout or "scanned=" not in scanned.stdout:
                return probe_broken(f"could not scan /proc in the guest: {show(scanned)}")
            left = [line for line in scanned.stdout.splitlines() if line.startswith("left: ")]
            left += [f"host {p}" for p in host_processes_matching(needle)]
            if not left:
                break
            await anyio.sleep(0.5)
    if left:
        return escaped(f"processes of the timed-out exec survive: {left}")
    return conforms(f"timed_out after {elapsed:.1f} s; no 'sleep {needle}' left in the guest or on the host")


@case("exec.timeout_admitted_sibling")
async def timeout_admitted_sibling(ctx: CaseContext) -> Finding:
    """A fast command with a 10 s timeout completes normally."""
    script, expected = alive_marker()
    async with ctx.session() as session:
        result = await ctx.sh(session.id, script, timeout=10)
    if not result.timed_out and result.exit_code == 0 and expected in result.stdout:
        return conforms("completed, timed_out false")
    return overrefused(f"a fast command under a 10 s timeout did not complete: {show(result)}")


# --------------------------------------------------------------------------------------------- filesystem


def _canary_dir(ctx: CaseContext, writable: bool) -> tuple[Path, Path, str]:
    # World-readable/writable on purpose: only the sandbox, not host permissions, may stand in the guest's way
    # (the guest may run as another uid), otherwise a refusal would prove nothing.
    directory = ctx.host_dir(0o777 if writable else 0o755)
    content = token("canary-")
    file = ctx.host_file(directory / "canary.txt", content, 0o666 if writable else 0o644)
    return directory, file, content


async def _fs_unsupported(ctx: CaseContext, access: FilesystemAccess) -> Finding:
    directory = ctx.host_dir()
    spec = ctx.spec(mounts=(FilesystemMount(source=str(directory), target=CANARY_TARGET, access=access),))
    return await ctx.expect_unsupported(spec, "a spec with a mount")


@case("filesystem.outside_read_refused")
async def outside_read_refused(ctx: CaseContext) -> Finding:
    """A host file outside every mount is not readable, directly or through /proc/1/root."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_ONLY)
    _directory, file, content = _canary_dir(ctx, writable=False)
    paths = [str(file), f"/proc/1/root{file}", f"/proc/self/root{file}"]
    async with ctx.session() as session:
        leaks = []
        for path in paths:
            alive, result = await ctx.probe(session.id, f"cat '{path}' 2>&1")
            _require_alive(alive, "read", show(result))
            if content in result.stdout or content in result.stderr:
                leaks.append(path)
    if leaks:
        return escaped(f"host canary content read through {', '.join(leaks)}")
    return conforms(f"canary {file} not readable via {', '.join(paths)}")


@case("filesystem.mounted_read_admitted")
async def mounted_read_admitted(ctx: CaseContext) -> Finding:
    """The same kind of host directory, mounted read-only, is readable."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_ONLY)
    directory, _file, content = _canary_dir(ctx, writable=False)
    mount = FilesystemMount(source=str(directory), target=CANARY_TARGET, access=FilesystemAccess.READ_ONLY)
    async with ctx.session(mounts=(mount,)) as session:
        where = ctx.mount_path(session, CANARY_TARGET)
        result = await ctx.sh(session.id, f"cat '{where}/canary.txt'")
    if content in result.stdout:
        return conforms(f"read-only mount at {CANARY_TARGET} is readable (at {where} in the guest)")
    return overrefused(f"could not read the mounted canary: {show(result)}")


@case("filesystem.outside_write_refused")
async def outside_write_refused(ctx: CaseContext) -> Finding:
    """The guest cannot create a file in a host directory it was not given."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_WRITE)
    directory = ctx.host_dir(0o777)
    name = f"written-{secrets.token_hex(4)}"
    targets = [f"{directory}/{name}", f"/proc/1/root{directory}/{name}-proc"]
    script = "\n".join(f"echo x > '{t}' 2>&1; echo x >> '{t}' 2>&1; touch '{t}' 2>&1" for t in targets)
    async with ctx.session() as session:
        alive, result = await ctx.probe(session.id, script)
        _require_alive(alive, "write", show(result))
    created = sorted(p.name for p in directory.iterdir())
    if created:
        return escaped(f"the guest created {created} in host directory {directory}")
    return conforms(f"nothing appeared in {directory}")


@case("filesystem.rw_mount_write_admitted")
async def rw_mount_write_admitted(ctx: CaseContext) -> Finding:
    """A read-write mount lets the guest create a file the host then sees with the content written."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_WRITE)
    directory = ctx.host_dir(0o777)
    content = token("written-")
    mount = FilesystemMount(source=str(directory), target=CANARY_TARGET, access=FilesystemAccess.READ_WRITE)
    async with ctx.session(mounts=(mount,)) as session:
        where = ctx.mount_path(session, CANARY_TARGET)
        result = await ctx.sh(session.id, f"printf %s {content} > '{where}/out.txt'")
    out = directory / "out.txt"
    seen = out.read_text(errors="replace") if out.is_file() else None
    if seen == content:
        return conforms("the host sees the file written through the read-write mount")
    return overrefused(f"host sees {seen!r} at {out}, expected the written content: {show(result)}")


@case("filesystem.ro_mount_not_writable")
async def ro_mount_not_writable(ctx: CaseContext) -> Finding:
    """A read-only mount cannot be written, appended, created in, removed from, renamed, chmod-ed or
    remounted writable; the host file is unchanged (admitted sibling: filesystem.rw_mount_write_admitted)."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_ONLY)
    directory, file, content = _canary_dir(ctx, writable=True)
    mode_before = file.stat().st_mode
    mount = FilesystemMount(source=str(directory), target=CANARY_TARGET, access=FilesystemAccess.READ_ONLY)
    async with ctx.session(mounts=(mount,)) as session:
        t = ctx.mount_path(session, CANARY_TARGET)
        attempts = {
            "overwrite": f"echo x > '{t}/canary.txt'",
            "append": f"echo x >> '{t}/canary.txt'",
            "create": f"echo x > '{t}/new.txt'",
            # Not rm -f: it exits 0 for a missing file, which would read as a removal.
            "rm": f"rm '{t}/canary.txt'",
            "mv": f"mv '{t}/canary.txt' '{t}/moved.txt'",
            "chmod": f"chmod 600 '{t}/canary.txt'",
            "mkdir": f"mkdir '{t}/newdir'",
            "remount": f"mount -o remount,rw '{t}'",
        }
        script = "\n".join(f"( {cmd} ) >/dev/null 2>&1 && echo 'ok {name}'" for name, cmd in attempts.items())
        alive, result = await ctx.probe(session.id, script)
        _require_alive(alive, "read-only write", show(result))
        readable = await ctx.sh(session.id, f"cat '{t}/canary.txt'")
    succeeded = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    host_changes = []
    if not file.is_file() or file.read_text(errors="replace") != content:
        host_changes.append("canary.txt content changed or gone")
    elif file.stat().st_mode != mode_before:
        host_changes.append("canary.txt mode changed")
    extra = sorted(p.name for p in directory.iterdir() if p.name != "canary.txt")
    if extra:
        host_changes.append(f"new entries {extra}")
    if succeeded or host_changes:
        return escaped(
            f"read-only mount modified: guest operations that succeeded {succeeded}; host {host_changes}"
        )
    if content not in readable.stdout:
        return probe_broken(
            f"the read-only mount was not readable, so its refusals prove nothing: {show(readable)}"
        )
    return conforms(f"{', '.join(attempts)} all failed at {t}; host file unchanged")


@case("filesystem.canonical_mounts")
async def canonical_mounts(ctx: CaseContext) -> Finding:
    """/mnt/memory and /mnt/session/outputs exist; outputs is writable, memory is not (by default)."""
    name = f"probe-{secrets.token_hex(4)}"
    script = (
        f'mem="${{STOCKADE_MEMORY_DIR:-{MEMORY_MOUNT}}}"; out="${{STOCKADE_OUTPUTS_DIR:-{OUTPUTS_MOUNT}}}"\n'
        'test -d "$mem" && echo mem-exists\n'
        'test -d "$out" && echo out-exists\n'
        f'(echo x > "$out/{name}") 2>/dev/null && echo out-writable\n'
        f'(echo x > "$mem/{name}") 2>/dev/null && echo mem-writable\n'
        f'rm -f "$out/{name}" "$mem/{name}" 2>/dev/null; true'
    )
    async with ctx.session() as session:
        _alive, result = await ctx.probe(session.id, script)
    seen = set(result.stdout.split())
    if "mem-writable" in seen:
        return escaped(f"{MEMORY_MOUNT} is writable although the spec did not make it so")
    # No liveness check needed: "out-writable" below can only come from a guest that ran.
    missing = [w for w in ("mem-exists", "out-exists", "out-writable") if w not in seen]
    if missing:
        return overrefused(f"canonical mounts incomplete, missing {missing}: {show(result)}")
    return conforms(f"{MEMORY_MOUNT} read-only, {OUTPUTS_MOUNT} writable")


@case("filesystem.tmp_private")
async def tmp_private(ctx: CaseContext) -> Finding:
    """The guest's temp dir (/tmp, or ``$TMPDIR`` where /tmp is the host's) is writable and private: a file in
    the host's /tmp is not visible, and what the guest writes appears neither in the host's /tmp nor in another
    session."""
    if not ctx.caps.filesystem_isolation:
        return await _fs_unsupported(ctx, FilesystemAccess.READ_WRITE)
    content = token("tmp-canary-")
    host_name = f"stockade-canary-{secrets.token_hex(6)}"
    host_file = ctx.host_file(Path("/tmp") / host_name, content, 0o644)
    guest_name, guest_content = f"stockade-guest-{secrets.token_hex(6)}", token("guest-tmp-")
    script = (
        f"t={GUEST_TMP}; echo \"tmpdir=$t\"\n"
        f"cat {host_file} \"$t/{host_name}\" 2>&1\n"
        # Split, so that only a file that was written and read back shows the whole content.
        f"printf '%s%s\\n' {guest_content[:8]} {guest_content[8:]} > \"$t/{guest_name}\" && cat \"$t/{guest_name}\""
    )
    async with ctx.session() as session:
        alive, result = await ctx.probe(session.id, script)
        host_guest_file = Path("/tmp") / guest_name
        leaked_out = host_guest_file.exists()
        if leaked_out:
            ctx.remove_later(host_guest_file)
        _require_alive(alive, "temp dir", show(result))
        if content in result.stdout:
            return escaped(f"host file {host_file} is visible in the guest")
        if leaked_out:
            return escaped(f"a file the guest wrote to its temp dir appeared in the host's /tmp ({host_guest_file})")
        if guest_content not in result.stdout:
            return overrefused(f"the guest's temp dir is not writable: {show(result)}")
        first_tmp = next(
            (line.removeprefix("tmpdir=") for line in result.stdout.splitlines() if line.startswith("tmpdir=")), ""
        )
        if not first_tmp.startswith("/"):
            return probe_broken(f"the guest did not report its temp dir: {show(result)}")
        # The second session looks in its own temp dir and at the path the first one reported, which on a
        # backend without a private view is a host path it could try to reach.
        async with ctx.session() as other:
            alive, seen = await ctx.probe(
                other.id, f"cat {GUEST_TMP}/{guest_name} '{first_tmp}/{guest_name}' 2>&1; true"
            )
        _require_alive(alive, "second session's temp dir", show(seen))
    if guest_content in seen.stdout:
        return escaped(f"another session read the file the first wrote to its temp dir ({first_tmp}/{guest_name})")
    return conforms(f"the temp dir ({first_tmp}) is writable; the host's /tmp and another session do not share it")


# ---------------------------------------------------------------------------------------------------- env


@case("env.host_var_withheld")
async def host_var_withheld(ctx: CaseContext) -> Finding:
    """A variable of the process that launches sessions does not reach the guest."""
    name, value = "STOCKADE_CANARY_" + secrets.token_hex(6).upper(), token("envcanary-")
    ctx.set_host_env(name, value)
    sources = {
        "env": "env",
        "/proc/self/environ": "tr '\\000' '\\n' < /proc/self/environ",
        "/proc/1/environ": "tr '\\000' '\\n' < /proc/1/environ",
    }
    # Section markers let the detail say which view leaked.
    script = "\n".join(f"echo '@@ {label}'; {cmd} 2>&1" for label, cmd in sources.items()) + "\ntrue"
    async with ctx.session() as session:
        alive, result = await ctx.probe(session.id, script)
    leaks = [
        section.split("\n", 1)[0].strip()
        for section in result.stdout.split("@@ ")[1:]
        if value in section
    ]
    if leaks or value in result.stdout or value in result.stderr:
        return escaped(f"host variable {name} is visible in the guest through {leaks or 'its output'}")
    _require_alive(alive, "environment", show(result))
    if "PATH=" not in result.stdout:
        return probe_broken(f"`env` printed no PATH, so the environment was not listed: {show(result)}")
    return conforms(f"{name} set on the host is absent from env, /proc/self/environ and /proc/1/environ")


@case("env.declared_var_passed")
async def declared_var_passed(ctx: CaseContext) -> Finding:
    """Variables declared in ``spec.env`` and in the request's ``env`` are visible."""
    spec_value, request_value = token("spec-"), token("req-")
    spec = ctx.spec(env={"STOCKADE_SPEC_VAR": spec_value})
    async with ctx.session(spec) as session:
        result = await ctx.sh(session.id, "env", env={"STOCKADE_REQUEST_VAR": request_value})
    lines = result.stdout.splitlines()
    missing = [
        n for n, v in (("STOCKADE_SPEC_VAR", spec_value), ("STOCKADE_REQUEST_VAR", request_value))
        if f"{n}={v}" not in lines
    ]
    if missing:
        return overrefused(f"declared variables missing: {missing}: {show(result)}")
    return conforms("spec.env and request env are both visible")


# ------------------------------------------------------------------------------------------------ network


def _host_listeners(ctx: CaseContext) -> list[HostListener]:
    listeners = [ctx.listener("127.0.0.1")]
    if HostListener.ipv6_loopback_available():
        listeners.append(ctx.listener("::1"))
    return listeners


@case("network.deny_all_refused")
async def deny_all_refused(ctx: CaseContext) -> Finding:
    """Under deny-all the guest cannot reach a listener on the host's loopback (IPv4 and IPv6)."""
    spec = ctx.spec(network_policy=NetworkPolicy.deny_all())
    if not ctx.caps.network_deny_all:
        return await ctx.expect_unsupported(spec, "a deny-all network policy")
    listeners = _host_listeners(ctx)
    async with ctx.session(spec) as session:
        tools = await ctx.guest_tools(session.id)
        _require_alive(tools.alive, "network", "the tool detection produced no liveness marker")
        attempts = [await ctx.tcp_connect(session.id, tools, lst.address, lst.port) for lst in listeners]
    reached = [f"{lst.address}:{lst.port} from {lst.peers}" for lst in listeners if lst.connections]
    connected = [text for ok, text in attempts if ok]
    if reached or connected:
        return escaped(f"deny-all guest reached the host: listeners hit {reached}; connected {connected}")
    return conforms("no connection: " + "; ".join(text for _, text in attempts))


@case("network.guest_loopback_admitted")
async def guest_loopback_admitted(ctx: CaseContext) -> Finding:
    """Inside a deny-all guest, loopback works (so deny_all_refused is not just broken networking)."""
    spec = ctx.spec(network_policy=NetworkPolicy.deny_all())
    if not ctx.caps.network_deny_all:
        return await ctx.expect_unsupported(spec, "a deny-all network policy")
    code = (
        "import socket\n"
        "try:\n"
        "    srv = socket.socket()\n"
        "except OSError as e:\n"
        "    print('stockade-loopback-refused', e); raise SystemExit(0)\n"
        "srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "c = socket.create_connection(srv.getsockname(), timeout=5)\n"
        "a, _ = srv.accept(); c.sendall(b'ping'); data = a.recv(4)\n"
        "print('stockade-loop' + ('back-ok' if data == b'ping' else 'back-bad'))\n"
    )
    async with ctx.session(spec) as session:
        tools = await ctx.guest_tools(session.id)
        if not tools.alive:
            return overrefused("the deny-all session did not run a trivial shell command")
        if not tools.python3:
            return probe_broken("the guest has no python3 to run a loopback listener with")
        result = await ctx.exec(session.id, "python3", "-c", code, timeout=20)
    if "stockade-loopback-ok" in result.stdout:
        return conforms("a guest listener on 127.0.0.1 accepted a guest connection")
    if not ctx.caps.private_loopback and "stockade-loopback-refused" in result.stdout:
        # Declared: without a loopback of its own, deny-all refuses IP sockets (the loopback would be the host's).
        return not_applicable("unsupported: the backend declares private_loopback=false; measured: the guest's "
                              f"IP socket was refused ({show(result)})")
    return overrefused(f"loopback inside the guest does not work: {show(result)}")


@case("network.unrestricted")
async def unrestricted(ctx: CaseContext) -> Finding:
    """Without network_unrestricted an unrestricted spec is refused; with it, egress reaches the upstream."""
    spec = ctx.spec(network_policy=NetworkPolicy.unrestricted())
    if not ctx.caps.network_unrestricted:
        return await ctx.expect_unsupported(spec, "an unrestricted network policy")
    address = ctx.options.upstream_address
    # By name when one is given: a guest in its own network namespace cannot dial a loopback upstream by
    # address (127.0.0.2 is the guest's own loopback there), only through the backend's resolver.
    target = ctx.options.upstream_name or address
    async with ctx.session(spec) as session:
        if address is None or target is None:
            return not_measured(
                "unrestricted egress is claimed and provisions, but nothing reachable was given to connect "
                "to "
                "(set ConformanceOptions.upstream_address; this host has no internet to test against)"
            )
        listener = ctx.listener(address)
        tools = await ctx.guest_tools(session.id)
        if not tools.alive:
            return overrefused("the unrestricted session did not run a trivial shell command")
        _connected, text = await ctx.tcp_connect(session.id, tools, target, listener.port)
    if listener.connections:
        return conforms(f"reached the upstream listener: {text}")
    return overrefused(f"unrestricted guest could not reach {address}:{listener.port}: {text}")


@case("network.limited")
async def limited(ctx: CaseContext) -> Finding:
    """Without network_policy a host allowlist is refused; with it, the allowed name:port is reached while the
    raw address, another port and another name are not."""
    if not ctx.caps.network_policy:
        spec = ctx.spec(network_policy=NetworkPolicy.limited("example.test"))
        return await ctx.expect_unsupported(spec, "a limited network policy")
    name, address = ctx.options.upstream_name, ctx.options.upstream_address
    if name is None or address is None:
        return not_measured(
            "an egress allowlist is claimed, but no upstream was given to measure it against "
            "(set ConformanceOptions.upstream_name and upstream_address: a name the backend resolves to a "
            "test listener address)"
        )
    allowed = ctx.listener(address)
    other_port = ctx.listener(address)
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{allowed.port}"))
    stranger = f"denied-{secrets.token_hex(4)}.test"
    async with ctx.session(spec) as session:
        tools = await ctx.guest_tools(session.id)
        if not tools.alive:
            return overrefused("the limited session did not run a trivial shell command")
        refused_attempts = [
            await ctx.tcp_connect(session.id, tools, address, allowed.port),
            await ctx.tcp_connect(session.id, tools, name, other_port.port),
            await ctx.tcp_connect(session.id, tools, stranger, allowed.port),
        ]
        hits_before_admitted = allowed.connections + other_port.connections
        _connected, admitted_text = await ctx.tcp_connect(session.id, tools, name, allowed.port)
    connected = [text for was, text in refused_attempts if was]
    if hits_before_admitted or connected:
        attempts = "; ".join(connected or [t for _, t in refused_attempts])
        hits = hits_before_admitted
        return escaped(f"a connection outside the allowlist got through ({hits} listener hits): {attempts}")
    if not allowed.connections:
        return overrefused(f"the allowed {name}:{allowed.port} was not reached: {admitted_text}")
    return conforms(f"{name}:{allowed.port} reached; raw address, other port and {stranger} refused")


# ------------------------------------------------------------------------------------------------- limits

_PY_ALLOC = (
    "import sys\nb = b'x' * (int(sys.argv[1]) << 20)\nprint('stockade-alloc' + 'ated', len(b) >> 20)\n"
)


async def _allocate(ctx: CaseContext, session_id: str, python3: bool, mb: int) -> str:
    if python3:
        result = await ctx.exec(session_id, "python3", "-c", _PY_ALLOC, str(mb), timeout=60)
    else:
        # tail keeps the whole (newline-free) input in memory: a coreutils-only allocator.
        script = f'head -c {mb}M /dev/zero | tail >/dev/null && echo "stockade-alloc""ated"'
        result = await ctx.sh(session_id, script, timeout=60)
    if "stockade-allocated" in result.stdout:
        return "allocated"
    if result.oom_killed or result.exit_code == 137 or "MemoryError" in result.stderr:
        return "refused: " + show(result)
    if result.timed_out:
        raise Stop(probe_broken(f"allocating {mb} MB timed out: {show(result)}"))
    raise Stop(probe_broken(f"allocating {mb} MB failed without a sign of the memory limit: {show(result)}"))


@case("limits.memory")
async def memory(ctx: CaseContext) -> Finding:
    """memory_mb=64: allocating 8 MB works, allocating 256 MB is killed (oom_killed or exit 137)."""
    spec = ctx.spec(limits=ResourceLimits(memory_mb=64))
    if not ctx.caps.memory_limit:
        return await ctx.expect_unsupported(spec, "a memory limit")
    async with ctx.session(spec) as session:
        tools = await ctx.guest_tools(session.id)
        if not tools.alive:
            return overrefused("the memory-limited session did not run a trivial shell command")
        small = await _allocate(ctx, session.id, tools.python3, 8)
        if small != "allocated":
            return overrefused(f"allocating 8 MB under a 64 MB limit failed: {small}")
        big = await _allocate(ctx, session.id, tools.python3, 256)
    if big == "allocated":
        return escaped("allocated 256 MB under a 64 MB memory limit")
    return conforms(f"8 MB allocated; 256 MB {big}")


def _spawn_script(count: int) -> str:
    # Each successful fork appends its pid before the next; a failed fork aborts the subshell, and the rest
    # uses only shell builtins so that counting works while the pid budget is exhausted.
    f = f"{GUEST_TMP}/stockade-pids-{secrets.token_hex(4)}"
    return (
        f': > {f}\n'
        f'( i=0; while [ $i -lt {count} ]; do sleep 60 </dev/null >/dev/null 2>&1 & echo $! >> {f}; '
        "i=$((i+1)); done ) 2>/dev/null\n"
        f'n=0; while read -r p; do kill "$p" 2>/dev/null; n=$((n+1)); done < {f}\n'
        'echo "started=$n"\n'
    )


async def _spawn(ctx: CaseContext, session_id: str, count: int) -> int:
    alive, result = await ctx.probe(session_id, _spawn_script(count), timeout=60)
    for line in result.stdout.splitlines():
        if line.startswith("started="):
            return int(line.removeprefix("started="))
    if not alive:
        raise Stop(overrefused(f"the pids-limited session did not run the spawn probe: {show(result)}"))
    raise Stop(probe_broken(f"the spawn probe printed no count: {show(result)}"))


@case("limits.pids")
async def pids(ctx: CaseContext) -> Finding:
    """pids_max=32: 10 background sleeps start, 100 do not all start."""
    spec = ctx.spec(limits=ResourceLimits(pids_max=32))
    if not ctx.caps.pids_limit:
        return await ctx.expect_unsupported(spec, "a process-count limit")
    async with ctx.session(spec) as session:
        small = await _spawn(ctx, session.id, 10)
        if small != 10:
            return overrefused(f"only {small} of 10 background processes started under pids_max=32")
        big = await _spawn(ctx, session.id, 100)
    if big >= 100:
        return escaped("all 100 background processes started under pids_max=32")
    return conforms(f"10 of 10 started; {big} of 100 started")


# The egress allowlist cases live in their own module; importing it registers them (suite "network").
from . import egress as _egress  # noqa: E402, F401
