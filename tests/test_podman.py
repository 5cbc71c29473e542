"""The podman backend: the docker backend's code over Podman's compatible API; what differs is checked here."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from _docker_fixtures import PY_IMAGE, PrivateDockerd, podman_or_skip
from stockade import ExecError, ExecRequest, ExecResult, SandboxSpec
from stockade.backends.podman import PodmanBackend


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[PodmanBackend]:
    service: PrivateDockerd = podman_or_skip()
    b = PodmanBackend(service.url, image=service.image(PY_IMAGE), state_dir=tmp_path / "state")
    yield b
    for session_id in b.store.ids():
        anyio.run(b.terminate, session_id)
    assert b.engine.list_labelled(f"stockade.state={b.store.root}") == []
    b.engine.close()


def test_podman_confines_and_snapshots_files(backend: PodmanBackend) -> None:
    assert not backend.capabilities().memory_snapshot
    sid = anyio.run(backend.provision, SandboxSpec()).id

    def run(cmd: str) -> ExecResult:
        return anyio.run(backend.exec, sid, ExecRequest(command="sh", args=("-c", cmd)))

    status = run("id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t'").stdout.split()
    assert status == ["1000", "CapEff:0000000000000000", "NoNewPrivs:1", "Seccomp:2"]
    token = secrets.token_hex(6)
    run(f"echo {token} > /tmp/t")
    snap = anyio.run(backend.snapshot, sid)
    clone = anyio.run(backend.provision, SandboxSpec(from_snapshot=snap.snapshot_id)).id
    out = anyio.run(backend.exec, clone, ExecRequest(command="cat", args=("/tmp/t",)))
    assert out.stdout == f"{token}\n"
    with pytest.raises(ExecError):  # catatonit's exec failure is reported like tini's
        anyio.run(backend.exec, sid, ExecRequest(command="stockade-no-such-command"))
