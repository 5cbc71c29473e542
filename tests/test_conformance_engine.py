"""The conformance engine's verdict logic, judged with test-double backends that fail in known ways.

The doubles live here only: a broken backend must never pass, a backend that refuses everything must be caught
by the admitted siblings, and a backend that runs everything on the host must be caught by the canaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
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
    FAILING,
    CaseResult,
    ConformanceOptions,
    Report,
    Verdict,
    engine,
    host_info,
    list_cases,
    run_case,
    run_conformance,
    suites,
)
from stockade.conformance.context import CaseContext, CaseDef, Finding, conforms, escaped
from stockade.conformance.pytest_plugin import make_conformance_tests, verdict_outcome

ISOLATING = SandboxCapabilities(
    local_process_sandbox=True,
    filesystem_isolation=True,
    process_isolation=True,
    network_deny_all=True,
    resource_limits=True,
    memory_limit=True,
    pids_limit=True,
)

ExecFn = Callable[["FakeBackend", SandboxSpec, ExecRequest], Awaitable[ExecResult]]


class FakeBackend(SandboxBackend):
    """Keeps the lifecycle contract faithfully; what exec does and what provision admits are pluggable."""

    name = "fake"

    def __init__(
        self,
        exec_fn: ExecFn,
        caps: SandboxCapabilities = ISOLATING,
        *,
        honest: bool = True,
        provision_delay: float = 0.0,
    ) -> None:
        self.exec_fn = exec_fn
        self.caps = caps
        self.honest = honest
        self.provision_delay = provision_delay
        self.sessions: dict[str, SandboxSpec] = {}
        self.provisioned = 0
        self.terminated: list[str] = []

    def capabilities(self) -> SandboxCapabilities:
        return self.caps

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        if self.provision_delay:
            await anyio.sleep(self.provision_delay)
        if self.honest:
            self.refuse_gaps(spec)
        session_id = secrets.token_hex(8)
        self.sessions[session_id] = spec
        self.provisioned += 1
        return SandboxSession(id=session_id, backend=self.name, state=SandboxState.RUNNING)

    def _spec(self, session_id: str) -> SandboxSpec:
        if session_id not in self.sessions:
            raise SessionNotFound(session_id)
        return self.sessions[session_id]

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        raise Unsupported(self.name, "attach_filesystem")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        raise Unsupported(self.name, "apply_network_policy")

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return await self.exec_fn(self, self._spec(session_id), request)

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        self._spec(session_id)
        raise Unsupported(self.name, "snapshot")

    async def resume(self, session_id: str) -> SandboxSession:
        self._spec(session_id)
        raise Unsupported(self.name, "resume")

    async def terminate(self, session_id: str) -> None:
        self._spec(session_id)
        del self.sessions[session_id]
        self.terminated.append(session_id)


async def exec_raises(backend: FakeBackend, spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    raise RuntimeError("agent exploded")


async def exec_refuses(backend: FakeBackend, spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    return ExecResult(exit_code=1)


async def exec_hangs(backend: FakeBackend, spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def exec_on_host(backend: FakeBackend, spec: SandboxSpec, request: ExecRequest) -> ExecResult:
    """No isolation at all: the command runs on the host with the host's environment, files and network."""
    return await anyio.to_thread.run_sync(run_on_host, spec, request, True)


async def exec_on_host_killing_child_only(
    backend: FakeBackend, spec: SandboxSpec, request: ExecRequest
) -> ExecResult:
    """Like exec_on_host, but a timeout kills only the direct child and leaves its descendants running."""
    return await anyio.to_thread.run_sync(run_on_host, spec, request, False)


LEAKED_GROUPS: list[int] = []


def run_on_host(spec: SandboxSpec, request: ExecRequest, kill_tree: bool) -> ExecResult:
    timeout = request.timeout.total_seconds() if request.timeout else None
    proc = subprocess.Popen(
        request.argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=request.cwd,
        env={**os.environ, **spec.env, **request.env},
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(request.stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        if kill_tree:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            LEAKED_GROUPS.append(proc.pid)  # the test kills the group afterwards
            proc.kill()
        proc.wait()
        # Descendants may still hold the pipes open: do not wait for EOF.
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return ExecResult(exit_code=137, timed_out=True)
    return ExecResult(stdout=out, stderr=err, exit_code=proc.returncode)


def conformance(backend: SandboxBackend, **options: Any) -> Report:
    async def main() -> Report:
        return await run_conformance(backend, ConformanceOptions(**options))

    return anyio.run(main)


def one(backend: SandboxBackend, case_id: str, **options: Any) -> CaseResult:
    async def main() -> CaseResult:
        return await run_case(backend, case_id, ConformanceOptions(**options))

    return anyio.run(main)


def by_case(report: Report) -> dict[str, CaseResult]:
    return {result.case: result for result in report.cases}


def canary_dirs() -> set[str]:
    return {p.name for p in Path("/var/tmp").glob("stockade-conformance-*")}


# ---------------------------------------------------------------------------------------------- the cases


def test_case_ids_are_unique_dotted_and_cover_every_suite() -> None:
    ids = list_cases()
    assert len(ids) == len(set(ids))
    for case_id in ids:
        suite, _, name = case_id.partition(".")
        assert suite and name, case_id
        assert case_id == case_id.lower() and " " not in case_id
    assert suites() == ["lifecycle", "exec", "filesystem", "env", "network", "limits"]
    for required in (
        "lifecycle.provision_running",
        "lifecycle.unknown_id",
        "lifecycle.terminate_twice",
        "lifecycle.exec_after_terminate",
        "lifecycle.files_persist_between_execs",
        "lifecycle.list_sessions",
        "exec.exit_code",
        "exec.command_not_found",
        "exec.timeout_kills_tree",
        "exec.timeout_admitted_sibling",
        "filesystem.outside_read_refused",
        "filesystem.mounted_read_admitted",
        "filesystem.outside_write_refused",
        "filesystem.rw_mount_write_admitted",
        "filesystem.ro_mount_not_writable",
        "filesystem.canonical_mounts",
        "filesystem.tmp_private",
        "env.host_var_withheld",
        "env.declared_var_passed",
        "network.deny_all_refused",
        "network.guest_loopback_admitted",
        "network.unrestricted",
        "network.limited",
        "limits.memory",
        "limits.pids",
    ):
        assert required in ids


def test_selection_by_suite_and_filter() -> None:
    backend = FakeBackend(exec_refuses)
    report = conformance(backend, suites=("network",))
    assert {r.case.split(".")[0] for r in report.cases} == {"network"}
    report = conformance(backend, case_filter="terminate")
    assert [r.case for r in report.cases] == [c for c in list_cases() if "terminate" in c]
    with pytest.raises(ValueError, match="unknown suites"):
        conformance(backend, suites=("nope",))


# ------------------------------------------------------------------------------------------- the doubles


def test_exec_that_raises_is_probe_broken_never_conforms() -> None:
    backend = FakeBackend(exec_raises)
    before = canary_dirs()
    results = by_case(conformance(backend, suites=("exec", "filesystem", "env", "network", "limits")))
    for result in results.values():
        # Only the capability-honesty checks, which never exec, may pass.
        assert result.verdict is not Verdict.CONFORMS or result.detail.startswith("capabilities lack"), result
    assert results["exec.exit_code"].verdict is Verdict.PROBE_BROKEN
    assert "RuntimeError" in results["exec.exit_code"].detail
    assert results["filesystem.outside_read_refused"].verdict is Verdict.PROBE_BROKEN
    assert results["env.host_var_withheld"].verdict is Verdict.PROBE_BROKEN
    assert results["network.deny_all_refused"].verdict is Verdict.PROBE_BROKEN
    assert backend.sessions == {}, "every provisioned session is terminated"
    assert backend.provisioned == len(backend.terminated)
    assert canary_dirs() == before, "host canary directories are removed"
    assert not [k for k in os.environ if k.startswith("STOCKADE_CANARY_")], "host env is restored"


def test_backend_refusing_everything_fails_through_admitted_siblings() -> None:
    report = conformance(FakeBackend(exec_refuses))
    results = by_case(report)
    for sibling in (
        "lifecycle.exec_simple",
        "lifecycle.files_persist_between_execs",
        "exec.exit_code",
        "exec.timeout_admitted_sibling",
        "filesystem.mounted_read_admitted",
        "filesystem.rw_mount_write_admitted",
        "filesystem.canonical_mounts",
        "env.declared_var_passed",
        "network.guest_loopback_admitted",
        "limits.memory",
        "limits.pids",
    ):
        assert results[sibling].verdict is Verdict.OVERREFUSED, results[sibling]
    # The refusals cannot pass either: the guest never proved it ran, so nothing was measured.
    for refusal in ("filesystem.outside_read_refused", "filesystem.outside_write_refused",
                    "env.host_var_withheld", "network.deny_all_refused"):
        assert results[refusal].verdict is Verdict.PROBE_BROKEN, results[refusal]
        assert "did not run" in results[refusal].detail
    assert report.failed


def test_leaky_backend_is_caught_by_the_canaries() -> None:
    backend = FakeBackend(exec_on_host)
    before = canary_dirs()
    results = {
        case_id: one(backend, case_id, timeout=60)
        for case_id in (
            "filesystem.outside_read_refused",
            "filesystem.outside_write_refused",
            "env.host_var_withheld",
            "network.deny_all_refused",
            "exec.exit_code",
        )
    }
    read = results["filesystem.outside_read_refused"]
    assert read.verdict is Verdict.ESCAPED and "canary content read" in read.detail, read
    assert results["filesystem.outside_write_refused"].verdict is Verdict.ESCAPED
    env = results["env.host_var_withheld"]
    assert env.verdict is Verdict.ESCAPED and "STOCKADE_CANARY_" in env.detail
    net = results["network.deny_all_refused"]
    assert net.verdict is Verdict.ESCAPED and "127.0.0.1" in net.detail, net
    # Honest about what it does do: a leak does not make the plain exec cases fail.
    assert results["exec.exit_code"].verdict is Verdict.CONFORMS
    assert canary_dirs() == before
    assert backend.sessions == {}


def test_timeout_that_leaves_descendants_is_escaped() -> None:
    backend = FakeBackend(exec_on_host_killing_child_only)
    try:
        result = one(backend, "exec.timeout_kills_tree", timeout=60)
    finally:
        for group in LEAKED_GROUPS:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    assert result.verdict is Verdict.ESCAPED, result
    assert "survive" in result.detail and "sleep 300." in result.detail
    honest = one(FakeBackend(exec_on_host), "exec.timeout_kills_tree", timeout=60)
    assert honest.verdict is Verdict.CONFORMS, honest


def test_unrestricted_provisioned_despite_capabilities_is_escaped() -> None:
    lying = FakeBackend(exec_refuses, honest=False)
    result = one(lying, "network.unrestricted")
    assert result.verdict is Verdict.ESCAPED
    assert "network_unrestricted" in result.detail
    assert lying.sessions == {}, "the session it should not have made is terminated too"
    honest = one(FakeBackend(exec_refuses), "network.unrestricted")
    assert honest.verdict is Verdict.CONFORMS and "Unsupported" in honest.detail


def test_capability_flags_set_the_expectation() -> None:
    no_limits = SandboxCapabilities(**{**ISOLATING.model_dump(), "memory_limit": False, "pids_limit": False})
    assert one(FakeBackend(exec_refuses, no_limits), "limits.memory").verdict is Verdict.CONFORMS
    assert one(FakeBackend(exec_refuses, no_limits, honest=False), "limits.pids").verdict is Verdict.ESCAPED

    class RefusesClaimedLimits(FakeBackend):
        async def provision(self, spec: SandboxSpec) -> SandboxSession:
            if spec.limits.memory_mb is not None:
                raise Unsupported(self.name, "limits.memory_mb")
            return await super().provision(spec)

    refused = one(RefusesClaimedLimits(exec_refuses), "limits.memory")
    assert refused.verdict is Verdict.OVERREFUSED and "capabilities admit" in refused.detail


def test_upstream_cases_are_not_measured_without_an_upstream() -> None:
    caps = SandboxCapabilities(**{**ISOLATING.model_dump(), "network_policy": True})
    result = one(FakeBackend(exec_refuses, caps), "network.limited")
    assert result.verdict is Verdict.NOT_MEASURED
    assert "upstream_name" in result.detail


def test_case_timeout_is_probe_broken_and_still_terminates() -> None:
    backend = FakeBackend(exec_hangs)
    result = one(backend, "exec.exit_code", timeout=0.5)
    assert result.verdict is Verdict.PROBE_BROKEN
    assert result.detail.startswith("case timed out")
    assert backend.provisioned == 1 and backend.sessions == {}


def test_hanging_provision_times_out() -> None:
    result = one(FakeBackend(exec_refuses, provision_delay=30), "lifecycle.provision_running", timeout=0.3)
    assert result.verdict is Verdict.PROBE_BROKEN and "timed out" in result.detail


# --------------------------------------------------------------------------------------- engine's own rules


def run_fake_case(fn: Callable[[CaseContext], Awaitable[Any]]) -> CaseResult:
    backend = FakeBackend(exec_refuses)

    async def main() -> CaseResult:
        return await engine._run(backend, CaseDef("test.fake", fn, ""), ConformanceOptions(timeout=5))

    return anyio.run(main)


def test_conforms_without_measuring_is_probe_broken() -> None:
    async def lazy(ctx: CaseContext) -> Finding:
        return conforms("looks fine to me")

    result = run_fake_case(lazy)
    assert result.verdict is Verdict.PROBE_BROKEN and "without calling the backend" in result.detail


def test_unexpected_exception_and_missing_verdict_are_probe_broken() -> None:
    async def crashes(ctx: CaseContext) -> Finding:
        async with ctx.session():
            raise KeyError("oops")

    async def forgets(ctx: CaseContext) -> None:
        async with ctx.session():
            pass

    crashed = run_fake_case(crashes)
    assert crashed.verdict is Verdict.PROBE_BROKEN and "KeyError" in crashed.detail
    assert run_fake_case(forgets).verdict is Verdict.PROBE_BROKEN


def test_failing_verdicts_pass_through_unchanged() -> None:
    async def leaks(ctx: CaseContext) -> Finding:
        return escaped("found the canary")

    assert run_fake_case(leaks).verdict is Verdict.ESCAPED


# ------------------------------------------------------------------------------------------------- report


def test_report_json_shape_and_summary() -> None:
    report = Report(
        backend="fake",
        host={"kernel": "6.1", "uid": 0},
        cases=[
            CaseResult("a.one", Verdict.CONFORMS, "ok", 1.5),
            CaseResult("a.two", Verdict.ESCAPED, "canary seen", 2.0),
            CaseResult("b.one", Verdict.NOT_MEASURED, "no upstream", 0.1),
            CaseResult("b.two", Verdict.CONFORMS, "ok", 3.0),
        ],
    )
    data = report.to_json()
    assert set(data) == {"backend", "host", "cases", "summary"}
    assert data["backend"] == "fake" and data["host"] == {"kernel": "6.1", "uid": 0}
    assert data["cases"][1] == {
        "case": "a.two", "verdict": "escaped", "detail": "canary seen", "duration_ms": 2.0
    }
    assert data["summary"] == {
        "conforms": 2,
        "escaped": 1,
        "overrefused": 0,
        "not_measured": 1,
        "not_applicable": 0,
        "probe_broken": 0,
        "total": 4,
    }
    json.dumps(data)
    assert report.failed
    text = report.render_text(width=100)
    assert "a.two" in text and "escaped" in text and "FAILED" in text
    ok = Report("fake", {}, [CaseResult("a.one", Verdict.NOT_APPLICABLE, "n/a", 0.0)])
    assert not ok.failed and ok.render_text().splitlines()[-1].startswith("ok")


def test_failing_set() -> None:
    assert {Verdict.ESCAPED, Verdict.OVERREFUSED, Verdict.PROBE_BROKEN} == FAILING
    assert Verdict("conforms") is Verdict.CONFORMS and Verdict.CONFORMS.value == "conforms"


def test_host_info() -> None:
    info = host_info()
    assert info["uid"] == os.getuid() and info["kernel"] and info["python"]
    assert "cgroup" in info
    json.dumps(info)


# ------------------------------------------------------------------------------------------ pytest plugin


@pytest.mark.parametrize(
    ("verdict", "outcome"),
    [
        (Verdict.CONFORMS, "pass"),
        (Verdict.NOT_APPLICABLE, "pass"),
        (Verdict.NOT_MEASURED, "skip"),
        (Verdict.ESCAPED, "fail"),
        (Verdict.OVERREFUSED, "fail"),
        (Verdict.PROBE_BROKEN, "fail"),
    ],
)
def test_plugin_maps_verdicts(verdict: Verdict, outcome: str) -> None:
    got, message = verdict_outcome(CaseResult("x.y", verdict, "because reasons", 1.0))
    assert got == outcome
    assert "because reasons" in message and "x.y" in message


def test_plugin_makes_one_test_per_case() -> None:
    test = make_conformance_tests(lambda: FakeBackend(exec_refuses))
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    assert len(marks) == 1
    assert marks[0].args == ("conformance_case", list_cases())
    test("lifecycle.terminate_twice")  # conforms on the fake: returns without failing
    with pytest.raises(pytest.fail.Exception, match="overrefused"):
        test("lifecycle.exec_simple")
