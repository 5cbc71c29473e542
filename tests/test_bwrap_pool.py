"""The bwrap warm pool: pooled sandboxes serve plain specs, and never outlive their owner or leak into listings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from stockade.backends.bwrap import BwrapBackend, probe
from stockade.backends.bwrap._pool import POOL_PREFIX, poolable
from stockade.errors import InvalidRequest
from stockade.models import ExecRequest, NetworkPolicy, SandboxSpec

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"bwrap backend unavailable: {REASON}")


def _sh(backend: BwrapBackend, sid: str, script: str) -> str:
    result = anyio.run(backend.exec, sid, ExecRequest.parse({"command": "sh", "args": ["-c", script]}))
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _pids_of(backend: BwrapBackend, session_or_pool_id: str) -> tuple[int, int]:
    record = backend.store.read(session_or_pool_id)
    assert record is not None
    return int(record["bwrap_pid"]), int(record["init_pid"])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(*pids: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def test_poolable_specs() -> None:
    assert poolable(SandboxSpec())
    assert poolable(SandboxSpec(env={"A": "1"}, network_policy=NetworkPolicy.limited("example.com")))
    assert not poolable(SandboxSpec.parse({"mounts": [{"source": "", "target": "/work", "access": "read_write"}]}))
    assert not poolable(SandboxSpec.parse({"limits": {"memory_mb": 64}}))
    assert not poolable(SandboxSpec.parse({"limits": {"tmp_mb": 16}}))


def test_pooled_session_serves_a_plain_spec(tmp_path: Path) -> None:
    async def go() -> None:
        backend = BwrapBackend(tmp_path / "state", pool_size=2)
        async with backend:
            await backend.prefill()
            pooled = backend.store.pool_ids()
            assert len(pooled) == 2
            assert await backend.list_sessions() == []  # pool sandboxes are nobody's session
            session = await backend.provision(SandboxSpec(env={"GREETING": "hello"}, session_id="pool-user-1"))
            assert session.id == "pool-user-1"
            assert session.id not in backend.store.pool_ids()
            script = "echo $GREETING > /mnt/session/outputs/out; cat /mnt/session/outputs/out"
            result = await backend.exec(session.id, ExecRequest.parse({"command": "sh", "args": ["-c", script]}))
            assert result.stdout == "hello\n"
            outputs = next(m for m in session.mounts if m.target == "/mnt/session/outputs")
            assert Path(outputs.host_path or "").parent.name == "pool-user-1"
            assert (Path(outputs.host_path or "") / "out").read_text() == "hello\n"
            assert [s.id for s in await backend.list_sessions()] == ["pool-user-1"]
            await backend.terminate(session.id)
        # aclose terminated what was left in the pool, and the refill it had started.
        assert backend.store.pool_ids() == []

    anyio.run(go)


def test_pool_is_skipped_for_specs_it_cannot_serve(tmp_path: Path) -> None:
    async def go() -> None:
        backend = BwrapBackend(tmp_path / "state", pool_size=1)
        async with backend:
            await backend.prefill()
            [pool_id] = backend.store.pool_ids()
            spec = SandboxSpec.parse({"mounts": [{"source": "", "target": "/work", "access": "read_write"}]})
            session = await backend.provision(spec)
            assert backend.store.pool_ids() == [pool_id]  # untouched
            assert any(m.target == "/work" for m in session.mounts)
            await backend.terminate(session.id)

    anyio.run(go)


def test_reserved_ids_are_refused(tmp_path: Path) -> None:
    backend = BwrapBackend(tmp_path / "state")
    with pytest.raises(InvalidRequest, match="reserved"):
        anyio.run(backend.provision, SandboxSpec(session_id=POOL_PREFIX + "x"))


def test_pool_of_a_dead_owner_is_reaped_by_gc(tmp_path: Path) -> None:
    state = tmp_path / "state"
    script = (
        "import anyio, sys\n"
        "from stockade.backends.bwrap import BwrapBackend\n"
        "b = BwrapBackend(sys.argv[1], pool_size=1)\n"
        "anyio.run(b.prefill)\n"
        "print(b.store.pool_ids()[0])\n"
    )
    # The owner exits without aclose(): its pool sandbox stays behind until someone runs gc().
    out = subprocess.run([sys.executable, "-c", script, str(state)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pool_id = out.stdout.strip()
    backend = BwrapBackend(state)
    pids = _pids_of(backend, pool_id)
    live = anyio.run(backend.provision, SandboxSpec())
    try:
        reaped = backend.gc()
        assert reaped == [pool_id]
        assert _wait_gone(*pids)
        assert [s.id for s in anyio.run(backend.list_sessions)] == [live.id]  # a live session is left alone
    finally:
        anyio.run(backend.terminate, live.id)


def test_pooled_session_with_egress_gets_its_gateway(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("this test reads the guest's state through /proc as root")

    async def go() -> dict[str, str]:
        backend = BwrapBackend(tmp_path / "state", pool_size=1)
        async with backend:
            await backend.prefill()
            session = await backend.provision(SandboxSpec(network_policy=NetworkPolicy.limited("example.com")))
            env = (await backend.exec(session.id, ExecRequest(command="env"))).stdout
            info = await backend.get_session(session.id)
            await backend.terminate(session.id)
            assert "HTTPS_PROXY=" in env
            return dict(info.metadata)

    metadata = anyio.run(go)
    assert metadata["gateway"] == "running"
