"""The escape suite's machinery, judged with test-double backends that fail in known ways.

A backend that refuses everything must not pass a single attack (nothing goes green unmeasured); a backend
that runs commands straight on the host must be caught by the canaries. Only attacks that are harmless on the
host itself (reads, loopback connections, files in directories the case made) are run against the latter.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from stockade import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    InvalidRequest,
    LifecycleError,
    NetworkPolicy,
    SandboxBackend,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
    SessionNotFound,
    Unsupported,
)
from stockade.conformance import (
    CaseResult,
    ConformanceOptions,
    Verdict,
    list_cases,
    run_case,
    run_conformance,
    select_cases,
    suites,
)
from stockade.conformance.escape import _support
from stockade.conformance.pytest_plugin import ESCAPE_OPTIONS, make_escape_tests

ISOLATING = SandboxCapabilities(
    local_process_sandbox=True,
    filesystem_isolation=True,
    process_isolation=True,
    network_deny_all=True,
    resource_limits=True,
    memory_limit=True,
    pids_limit=True,
)

ExecFn = Callable[[SandboxSpec, ExecRequest], Awaitable[ExecResult]]


class FakeBackend(SandboxBackend):
    """Keeps the lifecycle contract; what exec does is pluggable."""

    name = "fake-escape"

    def __init__(self, exec_fn: ExecFn) -> None:
        self.exec_fn = exec_fn
        self.sessions: dict[str, SandboxSpec] = {}

    def capabilities(self) -> SandboxCapabilities:
        return ISOLATING

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.refuse_gaps(spec)
        session_id = spec.session_id or secrets.token_hex(16)
        if session_id in self.sessions:
            raise InvalidRequest(f"session {session_id!r} exists", field="session_id")
        self.sessions[session_id] = spec
        return SandboxSession(id=session_id, backend=self.name, state=SandboxState.RUNNING)

    def _spec(self, session_id: str) -> SandboxSpec:
        if session_id not in self.sessions:
            raise SessionNotFound(session_id)
        return self.sessions[session_id]

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        self._spec(session_id)
        raise Unsupported(self.name, "attach_filesystem")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        self._spec(session_id)
        raise Unsupported(self.name, "apply_network_policy")

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return await self.exec_fn(self._spec(session_id), request)

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        self._spec(session_id)
        raise Unsupported(self.name, "snapshot")

    async def resume(self, session_id: str) -> SandboxSession:
        self._spec(session_id)
        raise Unsupported(self.name, "resume")

    async def terminate(self, session_id: str) -> None:
        self._spec(session_id)
        del self.sessions[session_id]


async def refuses(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    return ExecResult(exit_code=1)


KILL_ALL_SEEN: list[str] = []


async def on_host(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    """No isolation at all, except that ``kill -9 -1`` is recorded instead of run (it would kill the host)."""
    if any("kill -9 -1" in arg for arg in request.argv):
        KILL_ALL_SEEN.append(" ".join(request.argv))
        return ExecResult(exit_code=0)
    return await anyio.to_thread.run_sync(_run_on_host, spec, request)


def _run_on_host(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    timeout = request.timeout.total_seconds() if request.timeout else 60
    try:
        proc = subprocess.run(
            request.argv, input=request.stdin, capture_output=True, text=True, cwd=request.cwd,
            env={**os.environ, **spec.env, **request.env}, timeout=timeout, check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecResult(exit_code=127, stderr=str(exc))
    return ExecResult(stdout=proc.stdout, stderr=proc.stderr, exit_code=proc.returncode)


def one(backend: SandboxBackend, case_id: str) -> CaseResult:
    async def main() -> CaseResult:
        return await run_case(backend, case_id, ConformanceOptions(timeout=60))

    return anyio.run(main)


ESCAPE_IDS = select_cases(ESCAPE_OPTIONS)

# ------------------------------------------------------------------------------------------------ selection


def test_escape_suite_is_opt_in() -> None:
    assert "escape" not in suites()
    assert suites(include_opt_in=True)[-1] == "escape"
    assert not [c for c in list_cases() if c.startswith("escape.")]
    assert select_cases() == list_cases()
    assert select_cases(ConformanceOptions(suites=("escapes",))) == ESCAPE_IDS


def test_escape_ids_are_grouped_and_cover_the_issue() -> None:
    assert len(ESCAPE_IDS) == len(set(ESCAPE_IDS)) >= 60
    for case_id in ESCAPE_IDS:
        parts = case_id.split(".")
        assert len(parts) == 3 and parts[0] == "escape", case_id
        assert parts[1] in {"fs", "proc", "net", "res", "leak", "life", "input"}, case_id
    for required in (
        "escape.fs.proc_root", "escape.fs.leaked_fds", "escape.fs.ro_mount", "escape.fs.symlink_out",
        "escape.fs.hardlink_out", "escape.fs.mknod", "escape.fs.dev", "escape.fs.setuid", "escape.fs.proc_sys",
        "escape.fs.mount_syscalls", "escape.fs.attach_race", "escape.proc.ptrace_host",
        "escape.proc.ptrace_supervisor", "escape.proc.signal_host", "escape.proc.blocked_syscalls",
        "escape.proc.allowed_syscalls_admitted", "escape.proc.tiocsti", "escape.proc.proc_self_exe",
        "escape.proc.userns_nesting", "escape.net.tcp_loopback", "escape.net.udp_loopback",
        "escape.net.raw_packet_icmp", "escape.net.unix_abstract", "escape.net.unix_pathname",
        "escape.net.dns_loopback", "escape.res.fork_bomb", "escape.res.memory_bomb", "escape.res.disk_fill",
        "escape.res.stdout_flood", "escape.res.daemons_after_terminate", "escape.leak.host_env",
        "escape.leak.host_paths", "escape.leak.other_session", "escape.life.concurrent_execs",
        "escape.life.snapshot_during_writes", "escape.input.http",
    ):
        assert required in ESCAPE_IDS, required


def test_dotted_prefix_and_unknown_suite() -> None:
    net = select_cases(ConformanceOptions(suites=("escape.net",)))
    assert net and all(c.startswith("escape.net.") for c in net)
    with pytest.raises(InvalidRequest, match="escapes"):
        select_cases(ConformanceOptions(suites=("escape.nope",)))


# --------------------------------------------------------------------------------------------- pytest plugin


def _parametrize(test: Callable[[str], None]) -> Any:
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    assert len(marks) == 1
    return marks[0].args


def test_make_escape_tests_marks_known_failures_strict() -> None:
    plain = make_escape_tests(lambda: FakeBackend(refuses))
    assert _parametrize(plain) == ("conformance_case", ESCAPE_IDS)
    known = make_escape_tests(lambda: FakeBackend(refuses), known_failures={"escape.fs.dev": "escape: because"})
    params = _parametrize(known)[1]
    marked = [p for p in params if not isinstance(p, str)]
    assert len(params) == len(ESCAPE_IDS) and len(marked) == 1
    assert marked[0].values == ("escape.fs.dev",)
    (mark,) = marked[0].marks
    assert mark.name == "xfail" and mark.kwargs == {"strict": True, "reason": "escape: because"}
    with pytest.raises(ValueError, match="not selected"):
        make_escape_tests(lambda: FakeBackend(refuses), known_failures={"escape.fs.nope": "x"})


# ------------------------------------------------------------------------------------------------ the doubles

# Cases that measure the backend's API alone (no guest command): a faithful fake may pass them.
API_ONLY = {
    "escape.life.terminate_racing_terminate",
    "escape.life.terminate_during_provision",
    "escape.life.session_ids",
    "escape.input.session_ids",
    "escape.input.http",
}


def test_refusing_backend_passes_no_attack() -> None:
    backend = FakeBackend(refuses)
    lease = Path("/proc/sys/fs/lease-break-time").read_text()

    async def main() -> list[CaseResult]:
        return (await run_conformance(backend, ConformanceOptions(suites=("escape",), timeout=60))).cases

    results = {r.case: r for r in anyio.run(main)}
    assert set(results) == set(ESCAPE_IDS)
    green = {c for c, r in results.items() if r.verdict is Verdict.CONFORMS}
    assert green <= API_ONLY, {c: results[c].detail for c in green - API_ONLY}
    for case_id in ("escape.fs.outside_read", "escape.proc.blocked_syscalls", "escape.net.tcp_loopback"):
        assert results[case_id].verdict is Verdict.PROBE_BROKEN, results[case_id]
    for sibling in ("escape.proc.signal_own_admitted", "escape.res.output_admitted"):
        assert results[sibling].verdict is Verdict.OVERREFUSED, results[sibling]
    # Not offered, and refused honestly: not_applicable, never conforms.
    assert results["escape.fs.attach_race"].verdict is Verdict.NOT_APPLICABLE
    assert results["escape.fs.attach_race"].detail.startswith("unsupported")
    assert backend.sessions == {}
    assert Path("/proc/sys/fs/lease-break-time").read_text() == lease


@pytest.mark.parametrize(
    ("case_id", "evidence"),
    [
        ("escape.fs.outside_read", "canary"),
        ("escape.fs.proc_root", "canary"),
        ("escape.fs.leaked_fds", "leaked descriptors"),
        ("escape.fs.outside_write", "created"),
        ("escape.net.tcp_loopback", "127.0.0.1"),
        ("escape.net.udp_loopback", "arrived"),
        ("escape.net.dns_loopback", "reached host resolvers"),
        ("escape.net.unix_pathname", "daemon sockets reached"),
        ("escape.net.unix_abstract", "abstract socket"),
        ("escape.leak.host_env", "STOCKADE_ESCAPE_"),
        ("escape.proc.host_visible", "visible in the guest"),
    ],
)
def test_host_backend_is_caught_by_the_canaries(case_id: str, evidence: str) -> None:
    backend = FakeBackend(on_host)
    result = one(backend, case_id)
    assert result.verdict is Verdict.ESCAPED, result
    assert evidence in result.detail, result.detail
    assert backend.sessions == {}


def test_kill_all_is_never_sent_where_the_host_is_visible() -> None:
    KILL_ALL_SEEN.clear()
    result = one(FakeBackend(on_host), "escape.proc.signal_host")
    assert result.verdict is Verdict.ESCAPED and "kill -9 -1 not tried" in result.detail, result
    assert KILL_ALL_SEEN == []


def test_host_root_gate_recognises_an_unconfined_probe() -> None:
    # The guard in front of the destructive probes (mount, pivot_root, filling every mount), checked without
    # running any of them: here, on the host, it must say "unconfined" exactly when we are root with
    # capabilities in the initial user namespace.
    code = _support.source("emit({'host_root': host_root()})")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    found = _support.parse(ExecResult(stdout=out, exit_code=0))
    identity = Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    expected = identity and os.geteuid() == 0
    assert found == {"host_root": expected}


class DeclaringBackend(FakeBackend):
    """Runs on the host, but declares what it cannot isolate (process_isolation, private_loopback,
    private_mount_sources, private_supervisor false)."""

    def capabilities(self) -> SandboxCapabilities:
        return ISOLATING.model_copy(update={"process_isolation": False, "private_loopback": False,
                                            "private_mount_sources": False, "private_supervisor": False})


@pytest.mark.parametrize("case_id", ["escape.proc.host_visible", "escape.leak.hostname"])
def test_a_declared_gap_is_not_applicable_and_says_what_was_measured(case_id: str) -> None:
    """The same leak is an escape for a backend claiming isolation (above) and not_applicable for one that
    declares the gap; either way the detail carries the measurement."""
    if case_id == "escape.leak.hostname" and os.uname().nodename in ("localhost", "stockade"):
        pytest.skip("the host's own hostname is one the case cannot tell from a guest's")
    declared = one(DeclaringBackend(on_host), case_id)
    assert declared.verdict is Verdict.NOT_APPLICABLE, declared
    assert "declares process_isolation=false" in declared.detail and "measured:" in declared.detail
    claimed = one(FakeBackend(on_host), case_id)
    assert claimed.verdict is Verdict.ESCAPED, claimed


def test_a_declared_gap_does_not_excuse_a_signal_that_lands() -> None:
    """Host processes visible is declared; a SIGSTOP/SIGKILL delivered to one is still an escape."""
    KILL_ALL_SEEN.clear()
    result = one(DeclaringBackend(on_host), "escape.proc.signal_host")
    assert result.verdict is Verdict.ESCAPED and "can signal host process" in result.detail, result
    assert KILL_ALL_SEEN == []


def test_a_declared_missing_loopback_still_needs_working_unix_sockets() -> None:
    async def no_ip(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
        # The host, with every IP socket refused the way a seccomp filter would.
        blocker = ("import socket\n_orig = socket.socket.__init__\n"
                   "def _init(self, family=-1, *a, **k):\n"
                   "    if family in (socket.AF_INET, socket.AF_INET6):\n"
                   "        raise PermissionError(1, 'Operation not permitted')\n"
                   "    _orig(self, family, *a, **k)\n"
                   "socket.socket.__init__ = _init\n")
        argv = list(request.argv)
        if "python" in os.path.basename(argv[0]) and "-c" in argv:
            i = argv.index("-c")
            argv[i + 1] = blocker + argv[i + 1]
        return await on_host(spec, request.model_copy(update={"command": argv[0], "args": tuple(argv[1:])}))

    declared = one(DeclaringBackend(no_ip), "escape.net.guest_local_admitted")
    assert declared.verdict is Verdict.NOT_APPLICABLE, declared
    assert "private_loopback=false" in declared.detail
    claimed = one(FakeBackend(no_ip), "escape.net.guest_local_admitted")
    assert claimed.verdict is Verdict.OVERREFUSED, claimed


def _binds_showing(backend_sessions: Callable[[], list[str]], *, with_id: bool) -> ExecFn:
    """A guest whose mountinfo names each mount's host source, as binds do (and, ``with_id``, the session id)."""
    async def run(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
        if "mountinfo" not in " ".join(request.argv):
            return await on_host(spec, request)
        lines = [f"1 0 8:1 {m.source} {m.target} rw - ext4 /dev/sda rw" for m in spec.mounts]
        if with_id:
            lines += [f"2 0 8:1 /var/lib/stockade/sessions/{sid}/outputs /mnt/session/outputs rw - ext4 /dev/sda rw"
                      for sid in backend_sessions()]
        report = {"texts": {"/proc/self/mountinfo": "\n".join(lines)}}
        return ExecResult(stdout="stockade-escape-" + "result " + json.dumps(report) + "\n", exit_code=0)
    return run


def test_host_paths_declared_gap_covers_mount_sources_but_never_the_session_id() -> None:
    """Mount sources in mountinfo: an escape for a backend claiming private_mount_sources, not_applicable with
    the measurement for one declaring it false; the session id shown is an escape for both."""
    declaring = DeclaringBackend(on_host)
    declaring.exec_fn = _binds_showing(lambda: list(declaring.sessions), with_id=False)
    declared = one(declaring, "escape.leak.host_paths")
    assert declared.verdict is Verdict.NOT_APPLICABLE, declared
    assert "private_mount_sources=false" in declared.detail and "read-write mount source" in declared.detail
    claiming = FakeBackend(on_host)
    claiming.exec_fn = _binds_showing(lambda: list(claiming.sessions), with_id=False)
    assert one(claiming, "escape.leak.host_paths").verdict is Verdict.ESCAPED
    leaking = DeclaringBackend(on_host)
    leaking.exec_fn = _binds_showing(lambda: list(leaking.sessions), with_id=True)
    result = one(leaking, "escape.leak.host_paths")
    assert result.verdict is Verdict.ESCAPED and "session's id" in result.detail, result


def _result(report: dict[str, Any]) -> ExecResult:
    return ExecResult(stdout="stockade-escape-" + "result " + json.dumps(report) + "\n", exit_code=0)


def _readable_supervisor(*, leaks_secret: bool) -> ExecFn:
    """A guest whose pid 1 /proc entries open (as under gVisor); ``leaks_secret``: another exec's secret shows
    in them too."""
    secrets_seen: list[str] = []

    async def run(spec: SandboxSpec, request: ExecRequest) -> ExecResult:
        if "STOCKADE_ESCAPE_SECRET" in request.env:
            secrets_seen.append(request.env["STOCKADE_ESCAPE_SECRET"])
            return ExecResult(exit_code=0)
        if "process_vm_readv" not in " ".join(request.argv):
            return await on_host(spec, request)
        environ = "PATH=/bin\0" + (f"STOCKADE_ESCAPE_SECRET={secrets_seen[-1]}\0" if leaks_secret else "")
        return _result({"targets": {"1": {"ptrace_seize": "Operation not permitted", "mem": "error: denied",
                                          "environ": "opened", "environ_text": environ, "maps": "opened",
                                          "fd": "resolved 3 of 3"}}})
    return run


def test_supervisor_declared_gap_covers_reading_it_but_never_another_execs_secret() -> None:
    declared = one(DeclaringBackend(_readable_supervisor(leaks_secret=False)), "escape.proc.ptrace_supervisor")
    assert declared.verdict is Verdict.NOT_APPLICABLE, declared
    assert "private_supervisor=false" in declared.detail and "pid 1 environ: opened" in declared.detail
    claimed = one(FakeBackend(_readable_supervisor(leaks_secret=False)), "escape.proc.ptrace_supervisor")
    assert claimed.verdict is Verdict.ESCAPED, claimed
    leaking = one(DeclaringBackend(_readable_supervisor(leaks_secret=True)), "escape.proc.ptrace_supervisor")
    assert leaking.verdict is Verdict.ESCAPED and "secret in environ of ['1']" in leaking.detail, leaking


class _OomEndsSession(FakeBackend):
    """The memory bomb is OOM-killed and takes the session with it (as under gVisor)."""

    def __init__(self, *, stopped: bool) -> None:
        super().__init__(on_host)
        self.stopped = stopped  # False: the limit is not enforced at all
        self.dead: set[str] = set()

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        self._spec(session_id)
        if session_id in self.dead:
            raise LifecycleError(f"session {session_id!r} is not running (killed for exceeding its memory limit)")
        if "256" not in request.argv:
            return await super().exec(session_id, request)
        if not self.stopped:
            return ExecResult(stdout="".join(f"allocated {n}\n" for n in range(8, 257, 8)), exit_code=0)
        self.dead.add(session_id)
        return ExecResult(stdout="allocated 8\nallocated 16\n", exit_code=137, oom_killed=True)


class _DeclaresOom(_OomEndsSession):
    def capabilities(self) -> SandboxCapabilities:
        return ISOLATING.model_copy(update={"oom_keeps_session": False})


def test_memory_bomb_declared_gap_covers_a_lost_session_but_never_an_unenforced_limit() -> None:
    declared = one(_DeclaresOom(stopped=True), "escape.res.memory_bomb")
    assert declared.verdict is Verdict.NOT_APPLICABLE, declared
    assert "oom_keeps_session=false" in declared.detail and "took the session" in declared.detail
    claimed = one(_OomEndsSession(stopped=True), "escape.res.memory_bomb")
    assert claimed.verdict is Verdict.OVERREFUSED and "took the session" in claimed.detail, claimed
    unenforced = one(_DeclaresOom(stopped=False), "escape.res.memory_bomb")
    assert unenforced.verdict is Verdict.ESCAPED, unenforced


def test_sandbox_tree_follows_the_named_process_and_its_descendants() -> None:
    """The host processes that hold a guest (gVisor's sandbox) are found from ``sandbox_pid`` with every
    descendant, and count as gone once they exit; no or a bad pid names nothing."""
    from stockade.conformance.escape._canaries import sandbox_tree, still_running

    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        tree: dict[int, int] = {}
        for _ in range(50):  # until both children are there
            tree = sandbox_tree({"sandbox_pid": str(proc.pid)})
            if len(tree) == 3:
                break
            time.sleep(0.05)
        assert proc.pid in tree and len(tree) == 3, tree
        assert still_running(tree) == sorted(tree)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
    for _ in range(50):
        if not still_running(tree):
            break
        time.sleep(0.05)
    assert still_running(tree) == []
    assert still_running({os.getpid(): 1}) == []  # same pid, another start time: not the same process
    assert sandbox_tree({}) == {} and sandbox_tree({"sandbox_pid": "x"}) == {}
