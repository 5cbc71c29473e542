"""The ``stockade`` command: flags, exit statuses, output and cleanup.

The run path is tested against :class:`HostExecDouble`, a test-only backend registered for one test at a
time. It runs commands straight on the host and confines nothing: it exists to check the CLI's plumbing
(flags -> spec and request, exit statuses, output, session cleanup), never sandboxing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from stockade import registry
from stockade.backend import ExecChunk, SandboxBackend
from stockade.cli import EXIT_INTERRUPTED, EXIT_STOCKADE_ERROR, EXIT_TIMEOUT, main
from stockade.errors import ExecError, SessionNotFound, Unsupported
from stockade.models import (
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
)

DOUBLE = "host-exec-double"
PY = sys.executable


@dataclass
class Calls:
    """What the CLI did to the double, across every instance it created."""

    options: list[dict[str, Any]] = field(default_factory=list)
    specs: list[SandboxSpec] = field(default_factory=list)
    requests: list[ExecRequest] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    closed: int = 0
    exec_error: BaseException | None = None


class HostExecDouble(SandboxBackend):
    """TEST ONLY: runs each command on the host with subprocess. Confines nothing (see the module doc)."""

    name = DOUBLE
    calls: ClassVar[Calls] = Calls()

    def __init__(self, *, resolve: dict[str, str] | None = None) -> None:
        self.calls.options.append({} if resolve is None else {"resolve": resolve})
        self._sessions: dict[str, SandboxSpec] = {}

    def capabilities(self) -> SandboxCapabilities:
        # Honest for a double that confines nothing: the host's own network is all it can offer.
        return SandboxCapabilities(network_unrestricted=True)

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.calls.specs.append(spec)
        session_id = f"double-{len(self.calls.specs)}"
        self._sessions[session_id] = spec
        return SandboxSession(id=session_id, backend=self.name, state=SandboxState.RUNNING)

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        raise Unsupported(self.name, "attach_filesystem")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        raise Unsupported(self.name, "apply_network_policy")

    def _run(self, request: ExecRequest) -> tuple[bytes, bytes, int, bool]:
        timeout = request.timeout.total_seconds() if request.timeout else None
        try:
            done = subprocess.run(
                request.argv,
                input=(request.stdin or "").encode(),
                capture_output=True,
                cwd=request.cwd,
                env={**os.environ, **request.env},
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return b"", b"", 137, True
        return done.stdout, done.stderr, done.returncode, False

    async def _exec_raw(self, session_id: str, request: ExecRequest) -> tuple[bytes, bytes, int, bool]:
        if session_id not in self._sessions:
            raise SessionNotFound(session_id)
        self.calls.requests.append(request)
        if self.calls.exec_error is not None:
            raise self.calls.exec_error
        return await anyio.to_thread.run_sync(self._run, request)

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        out, err, code, timed_out = await self._exec_raw(session_id, request)
        return ExecResult(
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            exit_code=code,
            timed_out=timed_out,
        )

    async def exec_stream(self, session_id: str, request: ExecRequest) -> AsyncIterator[ExecChunk | ExecResult]:
        # Raw bytes, so that the tests can see the CLI pass them through unchanged.
        out, err, code, timed_out = await self._exec_raw(session_id, request)
        yield ExecChunk("stdout", out)
        yield ExecChunk("stderr", err)
        yield ExecResult(exit_code=code, timed_out=timed_out)

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        raise Unsupported(self.name, "snapshot")

    async def resume(self, session_id: str) -> SandboxSession:
        raise Unsupported(self.name, "resume")

    async def terminate(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise SessionNotFound(session_id)
        self.calls.terminated.append(session_id)

    async def aclose(self) -> None:
        self.calls.closed += 1


class NoOptionsDouble(HostExecDouble):
    """TEST ONLY: a backend whose constructor takes no options (like most real ones)."""

    name = "no-options-double"

    def __init__(self) -> None:
        super().__init__()


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Only the doubles are registered while a test runs: the host's real backends must not leak in."""
    monkeypatch.setattr(registry, "entry_points", lambda **_: [])
    monkeypatch.setattr(
        registry,
        "_BUILTIN",
        {DOUBLE: f"{__name__}:HostExecDouble", "no-options-double": f"{__name__}:NoOptionsDouble"},
    )
    monkeypatch.setattr(HostExecDouble, "calls", Calls())
    yield HostExecDouble.calls


def run(*args: str) -> list[str]:
    return ["run", "--backend", DOUBLE, *args]


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stockade: "), err
    return lines[0]


# ------------------------------------------------------------------------------- help, version, usage


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "check", "backends", "capabilities", "doctor", "version"):
        assert command in out
    assert "124" in out and "125" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import stockade

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stockade {stockade.__version__}"
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"stockade {stockade.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        [],
        ["frobnicate"],
        ["run", "--bogus", "--", "true"],
        ["run", "--network", "sometimes", "--", "true"],
        ["run", "--no-network", "--network", "unrestricted", "--", "true"],
        ["run", "--spec", "a.json", "--policy", "b.toml", "--", "true"],
        ["run", "--cpus", "0", "--", "true"],
        ["backends", "--bogus"],
    ],
)
def test_bad_flags_exit_125_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_STOCKADE_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: stockade")
    assert captured.err.splitlines()[-1].startswith("stockade: ")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--env", "BAD"),
        ("--env", "1X=y"),
        ("--memory", "lots"),
        ("--timeout", "soon"),
        ("--pids", "many"),
        ("--resolve", "no-address"),
        ("--resolve", "api.example.com=not-an-ip"),
        ("--allow-host", "*.com"),
        ("--ro", "/tmp:relative"),
    ],
)
def test_bad_flag_values_name_the_flag(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", flag, value, "--", "true"]) == EXIT_STOCKADE_ERROR
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"stockade: argument {flag}: ")


def test_module_entry_point_never_shows_a_traceback(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "stockade.cli", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )

    assert cli("--help").returncode == 0
    bad = cli("--bogus")
    assert bad.returncode == EXIT_STOCKADE_ERROR
    assert bad.stderr.startswith("usage: stockade")
    unknown = cli("run", "--backend", "no-such-backend", "--", "true")
    assert unknown.returncode == EXIT_STOCKADE_ERROR
    assert "no-such-backend" in one_line_error(unknown.stderr)
    for done in (bad, unknown):
        assert "Traceback" not in done.stderr
        assert done.stdout == ""


# ------------------------------------------------------------------------------------- stockade errors


def test_unknown_backend_is_one_line(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "no-such-backend", "--", "true"]) == EXIT_STOCKADE_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line_error(captured.err)
    assert "no-such-backend" in line and DOUBLE in line  # says which backends exist


def test_missing_command(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run()) == EXIT_STOCKADE_ERROR
    assert "CMD" in one_line_error(capsys.readouterr().err)


def test_spec_with_invalid_json_names_the_file(
    tmp_path: Path, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "broken.json"
    spec.write_text("{not json")
    assert main(run("--spec", str(spec), "--", "true")) == EXIT_STOCKADE_ERROR
    line = one_line_error(capsys.readouterr().err)
    assert str(spec) in line and "--spec" in line
    assert calls.specs == []


def test_spec_that_cannot_be_read(tmp_path: Path, calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main(run("--spec", str(missing), "--", "true")) == EXIT_STOCKADE_ERROR
    assert str(missing) in one_line_error(capsys.readouterr().err)


def test_policy_with_unknown_key(tmp_path: Path, calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[limits]\nmemory = "512M"\nmemroy_swap = "1G"\n')
    assert main(run("--policy", str(policy), "--", "true")) == EXIT_STOCKADE_ERROR
    line = one_line_error(capsys.readouterr().err)
    assert "memroy_swap" in line and str(policy) in line
    assert calls.specs == []


def test_allow_host_conflicts_with_no_network(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run("--no-network", "--allow-host", "example.com", "--", "true")) == EXIT_STOCKADE_ERROR
    assert "--allow-host" in one_line_error(capsys.readouterr().err)


def test_resolve_refused_by_a_backend_without_that_option(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--backend", "no-options-double", "--resolve", "api.example.com=127.0.0.1", "--", "true"]
    assert main(argv) == EXIT_STOCKADE_ERROR
    assert one_line_error(capsys.readouterr().err) == ("stockade: backend no-options-double does not accept --resolve")


# ------------------------------------------------------------------------------------------- run path


def test_json_prints_exactly_one_exec_result(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run("--json", "--", PY, "-c", "import sys; print('hi'); print('oops', file=sys.stderr)")) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 1
    result = ExecResult.parse(lines[0])
    assert (result.stdout, result.stderr, result.exit_code, result.timed_out) == ("hi\n", "oops\n", 0, False)


@pytest.mark.parametrize("as_json", [False, True])
def test_exit_status_mirrors_the_command(as_json: bool, calls: Calls) -> None:
    flags = ["--json"] if as_json else []
    assert main(run(*flags, "--", PY, "-c", "raise SystemExit(3)")) == 3


@pytest.mark.parametrize("as_json", [False, True])
def test_timeout_exits_124(as_json: bool, calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--json"] if as_json else []
    status = main(run(*flags, "--timeout", "0.3s", "--", PY, "-c", "import time; time.sleep(30)"))
    assert status == EXIT_TIMEOUT
    assert calls.requests[0].timeout is not None and calls.requests[0].timeout.total_seconds() == 0.3
    captured = capsys.readouterr()
    if as_json:
        assert json.loads(captured.out)["timed_out"] is True
    else:
        assert "timed out" in one_line_error(captured.err)


def test_output_passes_through_as_bytes(calls: Calls, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    script = "import sys; sys.stdout.buffer.write(b'out\\xff\\x00'); sys.stderr.buffer.write(b'err\\xfe')"
    assert main(run("--", PY, "-c", script)) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"out\xff\x00"
    assert captured.err == b"err\xfe"


def test_stdin_is_passed(calls: Calls, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped text\n")))
    assert main(run("--", PY, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())")) == 0
    assert capsys.readouterr().out == "PIPED TEXT\n"
    assert calls.requests[0].stdin == "piped text\n"


def test_request_carries_command_env_and_cwd(tmp_path: Path, calls: Calls) -> None:
    argv = run("--env", "GREETING=a=b", "--env", "EMPTY=", "--cwd", str(tmp_path), "--", "printf", "%s", "x y")
    assert main(argv) == 0
    request = calls.requests[0]
    assert request.argv == ["printf", "%s", "x y"]
    assert request.env == {"GREETING": "a=b", "EMPTY": ""}
    assert request.cwd == str(tmp_path)
    assert request.stdin is None


def test_session_is_terminated_after_a_run(calls: Calls) -> None:
    assert main(run("--", "true")) == 0
    assert calls.terminated == ["double-1"]
    assert calls.closed == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [(ExecError("boom: no such command"), EXIT_STOCKADE_ERROR), (KeyboardInterrupt(), EXIT_INTERRUPTED)],
)
def test_session_is_terminated_when_exec_raises(
    error: BaseException, status: int, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    calls.exec_error = error
    assert main(run("--", "true")) == status
    assert calls.terminated == ["double-1"]
    line = one_line_error(capsys.readouterr().err)
    assert ("boom" in line) if isinstance(error, ExecError) else line == "stockade: interrupted"


_SIGNAL_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import test_cli
from stockade import registry
from stockade.cli import main
registry.entry_points = lambda **_: []
registry._BUILTIN[test_cli.DOUBLE] = "test_cli:HostExecDouble"
status = main(["run", "--backend", test_cli.DOUBLE, "--", "sh", "-c", 'touch "$0"; sleep 1', sys.argv[2]])
print(",".join(test_cli.HostExecDouble.calls.terminated))
sys.exit(status)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_session_is_terminated_on_a_signal(signum: int, tmp_path: Path) -> None:
    started = tmp_path / "started"
    child = subprocess.Popen(
        [PY, "-c", _SIGNAL_DRIVER, str(Path(__file__).parent), str(started)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signum)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signum, err
    assert out.strip() == "double-1"  # terminated before exiting
    name = "interrupted" if signum == signal.SIGINT else "terminated"
    assert err == f"stockade: {name}\n"


def test_resolve_reaches_the_backend_constructor(calls: Calls) -> None:
    argv = run("--resolve", "API.Example.com=127.0.0.1", "--resolve", "v6.example.com=[::1]", "--", "true")
    assert main(argv) == 0
    assert calls.options == [{"resolve": {"api.example.com": "127.0.0.1", "v6.example.com": "::1"}}]


def test_no_backend_options_without_resolve(calls: Calls) -> None:
    assert main(run("--", "true")) == 0
    assert calls.options == [{}]


# ----------------------------------------------------------------------------------- spec building


def test_default_network_denies_all(calls: Calls) -> None:
    assert main(run("--", "true")) == 0
    assert calls.specs[0].network_policy.denies_all


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--no-network"], NetworkPolicy.deny_all()),
        (["--network", "unrestricted"], NetworkPolicy.unrestricted()),
        (
            ["--allow-host", "example.com", "--allow-host", "*.pypi.org:443"],
            NetworkPolicy.limited("example.com", "*.pypi.org:443"),
        ),
    ],
)
def test_network_flags(flags: list[str], expected: NetworkPolicy, calls: Calls) -> None:
    assert main(run(*flags, "--", "true")) == 0
    assert calls.specs[0].network_policy == expected


def test_flags_layer_on_top_of_a_spec(tmp_path: Path, calls: Calls) -> None:
    spec = {
        "network_policy": {"mode": "limited", "allowed_hosts": ["example.com"]},
        "mounts": [{"source": "/srv", "target": "/mnt/srv", "access": "read_only"}],
        "limits": {"memory_mb": 1024, "cpu_count": 4},
        "env": {"FROM_SPEC": "1"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    argv = run(
        "--spec",
        str(path),
        "--rw",
        f"{out}:/mnt/out",
        "--ro",
        "/etc/hostname",
        "--allow-host",
        "pypi.org",
        "--memory",
        "512M",
        "--pids",
        "64",
        "--timeout",
        "30s",
        "--",
        "true",
    )
    assert main(argv) == 0
    got = calls.specs[0]
    assert got.network_policy == NetworkPolicy.limited("example.com", "pypi.org")
    assert got.mounts == (
        FilesystemMount(source="/srv", target="/mnt/srv", access=FilesystemAccess.READ_ONLY),
        FilesystemMount(source="/etc/hostname", target="/etc/hostname", access=FilesystemAccess.READ_ONLY),
        FilesystemMount(source=str(out), target="/mnt/out", access=FilesystemAccess.READ_WRITE),
    )
    assert (got.limits.memory_mb, got.limits.cpu_count, got.limits.pids_max) == (512, 4, 64)
    assert got.limits.wall_time is not None and got.limits.wall_time.total_seconds() == 30
    assert got.env == {"FROM_SPEC": "1"}


def test_flags_layer_on_top_of_a_policy(tmp_path: Path, calls: Calls) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[network]\nunrestricted = true\n[limits]\nmemory = "1G"\ntimeout = "10s"\n')
    assert main(run("--policy", str(policy), "--timeout", "5s", "--", "true")) == 0
    got = calls.specs[0]
    assert got.network_policy == NetworkPolicy.unrestricted()
    assert got.limits.memory_mb == 1024
    assert got.limits.wall_time is not None and got.limits.wall_time.total_seconds() == 5


def test_allow_host_cannot_narrow_an_unrestricted_policy_silently(
    tmp_path: Path, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[network]\nunrestricted = true\n")
    assert main(run("--policy", str(policy), "--allow-host", "pypi.org", "--", "true")) == EXIT_STOCKADE_ERROR
    assert "unrestricted" in one_line_error(capsys.readouterr().err)


def test_flag_mount_over_a_spec_mount_is_refused(
    tmp_path: Path, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"mounts": [{"source": "/srv", "target": "/mnt/x"}]}))
    assert main(run("--spec", str(path), "--ro", "/etc:/mnt/x", "--", "true")) == EXIT_STOCKADE_ERROR
    assert "/mnt/x" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------- backends, capabilities, check


def test_backends_json_shape(calls: Calls, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(registry._BUILTIN, "not-installed", "stockade_no_such_module_xyz:Backend")
    assert main(["backends", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert isinstance(infos, list)
    for info in infos:
        assert set(info) == {"name", "available", "reason"}
    by_name = {info["name"]: info for info in infos}
    assert by_name[DOUBLE] == {"name": DOUBLE, "available": True, "reason": None}
    assert by_name["not-installed"]["available"] is False
    assert "pip install" in by_name["not-installed"]["reason"]


def test_backends_text(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "AVAILABLE", "REASON"]
    assert any(line.split()[:2] == [DOUBLE, "yes"] for line in lines[1:])


def test_capabilities(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capabilities", "--backend", DOUBLE, "--json"]) == 0
    assert SandboxCapabilities.parse(capsys.readouterr().out) == SandboxCapabilities(network_unrestricted=True)
    assert main(["capabilities", "--backend", DOUBLE]) == 0
    out = capsys.readouterr().out
    assert f"backend: {DOUBLE}" in out
    assert any(line.split() == ["network_unrestricted", "yes"] for line in out.splitlines())


def test_check_reports_gaps(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--backend", DOUBLE, "--network", "unrestricted"]) == 0
    capsys.readouterr()
    assert main(["check", "--backend", DOUBLE, "--memory", "1G", "--json"]) == 1
    gaps = json.loads(capsys.readouterr().out)
    assert {gap["field"] for gap in gaps} == {"network_policy", "limits.memory_mb"}
    assert main(["check", "--backend", DOUBLE]) == 1
    assert "network_policy" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- doctor


@dataclass
class FakeReport:
    backend: str
    failed: bool

    def render_text(self) -> str:
        return f"report for {self.backend}: {'FAILED' if self.failed else 'ok'}"

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "failed": self.failed}


@dataclass(frozen=True)
class FakeOptions:
    suites: tuple[str, ...] | None = None
    case_filter: str | None = None


@pytest.fixture
def fake_conformance(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, FakeOptions]]:
    """Stands in for ``stockade.conformance`` so that doctor's plumbing is tested on its own."""
    seen: list[tuple[str, FakeOptions]] = []

    async def run_conformance(backend: SandboxBackend, options: FakeOptions) -> FakeReport:
        seen.append((backend.name, options))
        return FakeReport(backend.name, failed=options.case_filter == "fail")

    module = types.ModuleType("stockade.conformance")
    module.run_conformance = run_conformance  # type: ignore[attr-defined]
    module.ConformanceOptions = FakeOptions  # type: ignore[attr-defined]
    module.Report = FakeReport  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stockade.conformance", module)
    return seen


def test_doctor_runs_every_available_backend(
    calls: Calls, fake_conformance: list[tuple[str, FakeOptions]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--json", "--suite", "fs", "--suite", "net", "--case", "read"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert {report["backend"] for report in reports} == {DOUBLE, "no-options-double"}
    assert fake_conformance[0][1] == FakeOptions(suites=("fs", "net"), case_filter="read")


def test_doctor_exits_1_on_a_failing_verdict(
    calls: Calls, fake_conformance: list[tuple[str, FakeOptions]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--backend", DOUBLE, "--case", "fail"]) == 1
    assert capsys.readouterr().out == f"report for {DOUBLE}: FAILED\n"
    assert fake_conformance == [(DOUBLE, FakeOptions(suites=None, case_filter="fail"))]


def test_doctor_without_any_available_backend(
    monkeypatch: pytest.MonkeyPatch,
    fake_conformance: list[tuple[str, FakeOptions]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(registry, "entry_points", lambda **_: [])
    monkeypatch.setattr(registry, "_BUILTIN", {"not-installed": "stockade_no_such_module_xyz:Backend"})
    assert main(["doctor"]) == EXIT_STOCKADE_ERROR
    line = one_line_error(capsys.readouterr().err)
    assert "not-installed" in line and "pip install" in line
    assert fake_conformance == []
