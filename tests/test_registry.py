"""The backend registry (names -> lazy imports, entry points, probes) and the sync facade."""

from __future__ import annotations

import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

import stockade
from stockade import registry, sync
from stockade.backend import SandboxBackend
from stockade.errors import BackendUnavailable, InvalidRequest, SessionNotFound, Unsupported
from stockade.models import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
)


class DoubleBackend(SandboxBackend):
    """A test-only backend: records calls, keeps sessions in a dict. Not shipped."""

    name = "double"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.sessions: dict[str, SandboxSession] = {}
        self.calls: list[tuple[str, Any]] = []
        self.closed = False
        self.loop_threads: set[int] = set()

    def _note(self, op: str, arg: Any = None) -> None:
        self.calls.append((op, arg))
        self.loop_threads.add(threading.get_ident())

    def _get(self, session_id: str) -> SandboxSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    def capabilities(self) -> SandboxCapabilities:
        return SandboxCapabilities(local_process_sandbox=True, network_deny_all=True)

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self._note("provision", spec)
        session = SandboxSession(id=spec.session_id or "s-1", backend=self.name, state=SandboxState.RUNNING)
        self.sessions[session.id] = session
        return session

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        self._note("attach_filesystem", mount)
        self._get(session_id)
        raise Unsupported(self.name, "attach_filesystem")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        self._note("apply_network_policy", policy)
        return self._get(session_id)

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        self._note("exec", request)
        self._get(session_id)
        return ExecResult(stdout=" ".join(request.argv), exit_code=len(request.args))

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        self._note("snapshot", session_id)
        self._get(session_id)
        return SandboxSnapshot(session_id=session_id, backend=self.name, snapshot_id="snap-1")

    async def resume(self, session_id: str) -> SandboxSession:
        self._note("resume", session_id)
        return self._get(session_id)

    async def terminate(self, session_id: str) -> None:
        self._note("terminate", session_id)
        self._get(session_id)
        del self.sessions[session_id]

    async def list_sessions(self) -> list[SandboxSession]:
        self._note("list_sessions")
        return list(self.sessions.values())

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._note("network_log", limit)
        self._get(session_id)
        return [{"decision": "deny", "name": "example.com"}][: limit or None]

    async def aclose(self) -> None:
        self.closed = True


def fake_module(name: str, probe_reason: str | None = None, *, crash: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)
    module.DoubleBackend = DoubleBackend  # type: ignore[attr-defined]
    module.NotABackend = object  # type: ignore[attr-defined]

    def probe() -> str | None:
        if crash:
            raise OSError("probe exploded")
        return probe_reason

    module.probe = probe  # type: ignore[attr-defined]
    return module


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty registry (no builtins, no installed entry points), restored afterwards."""
    monkeypatch.setattr(registry, "_BUILTIN", {})
    monkeypatch.setattr(registry, "_EXTRAS", {})
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    yield


def install(monkeypatch: pytest.MonkeyPatch, module_name: str, **kwargs: Any) -> None:
    monkeypatch.setitem(sys.modules, module_name, fake_module(module_name, **kwargs))


# --- open_backend -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_registry")
def test_open_backend_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("double", "_stockade_test_ok:DoubleBackend")
    backend = stockade.open_backend("double", flavour="x")
    assert isinstance(backend, DoubleBackend)
    assert backend.options == {"flavour": "x"}
    assert registry.backend_class("double") is DoubleBackend


@pytest.mark.usefixtures("clean_registry")
def test_register_builtin_is_cleaned_up_by_fixture() -> None:
    assert registry._BUILTIN == {}


@pytest.mark.usefixtures("clean_registry")
def test_unknown_name_lists_known(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("double", "_stockade_test_ok:DoubleBackend")
    registry.register_builtin("other", "_stockade_test_ok:DoubleBackend")
    with pytest.raises(InvalidRequest) as info:
        stockade.open_backend("dubble")
    assert info.value.field == "backend"
    assert "unknown backend 'dubble'; known backends: double, other" in str(info.value)


@pytest.mark.usefixtures("clean_registry")
def test_unknown_name_with_nothing_registered() -> None:
    with pytest.raises(InvalidRequest, match="known backends: none"):
        stockade.open_backend("x")


@pytest.mark.usefixtures("clean_registry")
def test_probe_reason_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    install(
        monkeypatch,
        "_stockade_test_noprobe",
        probe_reason="bubblewrap is not installed: apt-get install bubblewrap",
    )
    registry.register_builtin("weak", "_stockade_test_noprobe:DoubleBackend")
    with pytest.raises(BackendUnavailable) as info:
        stockade.open_backend("weak")
    assert info.value.backend == "weak"
    assert info.value.reason == "bubblewrap is not installed: apt-get install bubblewrap"
    assert "backend 'weak' is not available: bubblewrap is not installed" in str(info.value)
    [listed] = stockade.available_backends()
    assert listed == registry.BackendInfo(
        "weak", False, "bubblewrap is not installed: apt-get install bubblewrap"
    )
    assert listed.to_json() == {
        "name": "weak",
        "available": False,
        "reason": "bubblewrap is not installed: apt-get install bubblewrap",
    }


@pytest.mark.usefixtures("clean_registry")
def test_crashing_probe_refuses_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_crash", crash=True)
    registry.register_builtin("crashy", "_stockade_test_crash:DoubleBackend")
    with pytest.raises(BackendUnavailable, match="probe failed: OSError"):
        stockade.open_backend("crashy")
    [listed] = stockade.available_backends()
    assert not listed.available
    assert listed.reason is not None and "probe exploded" in listed.reason


@pytest.mark.usefixtures("clean_registry")
def test_import_failure_names_the_extra() -> None:
    registry.register_builtin("docker", "_stockade_test_no_such_module:DockerBackend", extra="docker")
    with pytest.raises(BackendUnavailable) as info:
        stockade.open_backend("docker")
    assert info.value.backend == "docker"
    assert "pip install 'stockade[docker]'" in str(info.value)
    assert "_stockade_test_no_such_module" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
    [listed] = stockade.available_backends()
    assert not listed.available
    assert listed.reason is not None and "pip install 'stockade[docker]'" in listed.reason


@pytest.mark.usefixtures("clean_registry")
def test_import_failure_defaults_extra_to_name() -> None:
    registry.register_builtin("ray", "_stockade_test_no_such_module:RayBackend")
    with pytest.raises(BackendUnavailable, match=r"pip install 'stockade\[ray\]'"):
        registry.backend_class("ray")


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize(
    "target", ["_stockade_test_ok:Missing", "_stockade_test_ok:NotABackend", "_stockade_test_ok"]
)
def test_target_that_is_not_a_backend_class(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("odd", target)
    with pytest.raises(BackendUnavailable, match="does not name a SandboxBackend subclass"):
        registry.backend_class("odd")


@pytest.mark.usefixtures("clean_registry")
def test_entry_point_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_plugin")
    ep = EntryPoint(
        name="plugin", value="_stockade_test_plugin:DoubleBackend", group=registry.ENTRY_POINT_GROUP
    )
    seen: list[str] = []

    def fake_entry_points(group: str) -> list[EntryPoint]:
        seen.append(group)
        return [ep]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    assert isinstance(stockade.open_backend("plugin"), DoubleBackend)
    assert seen and set(seen) == {"stockade.backends"}
    assert [i.name for i in stockade.available_backends()] == ["plugin"]


@pytest.mark.usefixtures("clean_registry")
def test_builtin_wins_over_entry_point_of_same_name(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("double", "_stockade_test_ok:DoubleBackend")
    ep = EntryPoint(name="double", value="_stockade_test_elsewhere:Other", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    assert registry.backend_class("double") is DoubleBackend


# --- default backend --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_registry")
def test_default_picks_first_available(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_bad", probe_reason="no kvm")
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("microvm", "_stockade_test_bad:DoubleBackend")
    registry.register_builtin("missing", "_stockade_test_no_such_module:X")
    registry.register_builtin("first-ok", "_stockade_test_ok:DoubleBackend")
    registry.register_builtin("second-ok", "_stockade_test_ok:DoubleBackend")
    assert stockade.default_backend_name() == "first-ok"
    assert isinstance(stockade.open_backend(), DoubleBackend)
    infos = stockade.available_backends()
    assert [(i.name, i.available) for i in infos] == [
        ("microvm", False),
        ("missing", False),
        ("first-ok", True),
        ("second-ok", True),
    ]


@pytest.mark.usefixtures("clean_registry")
def test_default_raises_when_none_available(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_bad", probe_reason="no kvm")
    registry.register_builtin("microvm", "_stockade_test_bad:DoubleBackend")
    with pytest.raises(BackendUnavailable) as info:
        stockade.default_backend_name()
    assert "no backend can run on this host" in str(info.value)
    assert "microvm: no kvm" in str(info.value)
    with pytest.raises(BackendUnavailable):
        stockade.open_backend()


@pytest.mark.usefixtures("clean_registry")
def test_default_raises_when_nothing_registered() -> None:
    with pytest.raises(BackendUnavailable, match="no backend is registered"):
        stockade.default_backend_name()


# --- the sync facade --------------------------------------------------------------------------------------


@pytest.fixture
def facade() -> Iterator[tuple[sync.SyncBackend, DoubleBackend]]:
    double = DoubleBackend()
    with sync.SyncBackend(double) as backend:
        yield backend, double
    assert double.closed


def test_sync_forwards_calls(facade: tuple[sync.SyncBackend, DoubleBackend]) -> None:
    backend, double = facade
    assert backend.name == "double"
    assert backend.backend is double
    assert backend.capabilities() == double.capabilities()
    session = backend.provision(SandboxSpec(session_id="s-7"))
    assert session.id == "s-7" and session.state is SandboxState.RUNNING
    assert backend.provision().id == "s-1"  # no spec: the default spec
    result = backend.exec("s-7", ExecRequest(command="echo", args=("a", "b")))
    assert result == ExecResult(stdout="echo a b", exit_code=2)
    assert backend.apply_network_policy("s-7", NetworkPolicy.deny_all()) == session
    assert backend.snapshot("s-7").snapshot_id == "snap-1"
    assert backend.resume("s-7") == session
    assert backend.get_session("s-7") == session
    assert {s.id for s in backend.list_sessions()} == {"s-1", "s-7"}
    assert backend.network_log("s-7", 1) == [{"decision": "deny", "name": "example.com"}]
    backend.terminate("s-7")
    assert [op for op, _ in double.calls] == [
        "provision",
        "provision",
        "exec",
        "apply_network_policy",
        "snapshot",
        "resume",
        "list_sessions",
        "list_sessions",
        "network_log",
        "terminate",
    ]
    # The async methods ran on the facade's loop thread, not on the caller's.
    assert threading.get_ident() not in double.loop_threads


def test_sync_propagates_errors_with_their_types(facade: tuple[sync.SyncBackend, DoubleBackend]) -> None:
    backend, _ = facade
    with pytest.raises(SessionNotFound) as info:
        backend.terminate("nope")
    assert info.value.session_id == "nope"
    with pytest.raises(SessionNotFound):
        backend.exec("nope", ExecRequest(command="x"))
    backend.provision(SandboxSpec(session_id="s-2"))
    with pytest.raises(Unsupported) as unsupported:
        backend.attach_filesystem("s-2", FilesystemMount(target="/x"))
    assert unsupported.value.operation == "attach_filesystem"
    backend.terminate("s-2")
    with pytest.raises(SessionNotFound):
        backend.terminate("s-2")  # a second terminate raises


def test_sync_check_and_close_twice() -> None:
    double = DoubleBackend()
    backend = sync.SyncBackend(double)
    gaps = backend.check(SandboxSpec(network_policy=NetworkPolicy.limited("x.example.com")))
    assert [g.capability for g in gaps] == ["network_policy"]
    backend.close()
    backend.close()
    assert double.closed
    with pytest.raises(RuntimeError, match="closed"):
        backend.resume("s-1")


@pytest.mark.usefixtures("clean_registry")
def test_sync_open_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "_stockade_test_ok")
    registry.register_builtin("double", "_stockade_test_ok:DoubleBackend")
    with sync.open_backend("double", flavour="y") as backend:
        assert isinstance(backend.backend, DoubleBackend)
        assert backend.backend.options == {"flavour": "y"}


@pytest.mark.usefixtures("clean_registry")
def test_sync_open_backend_errors_before_starting_a_thread() -> None:
    before = threading.active_count()
    with pytest.raises(InvalidRequest):
        sync.open_backend("nope")
    assert threading.active_count() == before


def test_async_context_manager_closes() -> None:
    import anyio

    double = DoubleBackend()

    async def main() -> None:
        async with double as backend:
            assert backend is double
            await backend.provision(SandboxSpec())
            chunks = [c async for c in backend.exec_stream("s-1", ExecRequest(command="echo", args=("hi",)))]
            assert chunks[-1] == ExecResult(stdout="echo hi", exit_code=1)
            assert chunks[0] == stockade.ExecChunk("stdout", b"echo hi")

    anyio.run(main)
    assert double.closed


def test_unclosed_facade_does_not_hang_interpreter_exit() -> None:
    # anyio's start_blocking_portal joins its thread at exit: a script that forgot close() hung forever.
    script = (
        "from stockade.sync import SyncBackend\n"
        "from tests.test_registry import DoubleBackend\n"
        "b = SyncBackend(DoubleBackend())\n"
        "print(b.provision().id)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "s-1"
