"""The podman backend: the docker backend's code over Podman's compatible API; what differs is checked here."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from _docker_fixtures import PY_IMAGE, PrivateDockerd, check_sealed_read_only_directory, podman_or_skip
from stockade import ExecError, ExecRequest, ExecResult, SandboxError, SandboxSpec
from stockade.backends.docker._host import helper_processes
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


def test_no_conmon_outlives_its_session(backend: PodmanBackend) -> None:
    # Each exec starts two conmon processes on the host that wait Podman's exit_command_delay (300 s here, the
    # default) before leaving, past the container's removal; the backend ends them once the exit code is read.
    sid = anyio.run(backend.provision, SandboxSpec()).id
    container = backend._record(sid)["container"]
    codes = [anyio.run(backend.exec, sid, ExecRequest(command="sh", args=("-c", f"exit {n}"))).exit_code
             for n in range(5)]
    assert codes == [0, 1, 2, 3, 4]  # read before the monitors went
    # Admitted sibling: the container's own conmon (-u names the container, not an exec) is there and found;
    # the execs' are gone.
    monitors = helper_processes("conmon", "-c", container)
    assert monitors and all(helper_processes("conmon", "-u", container) == [pid] for pid in monitors)
    stand_ins: list[subprocess.Popen[bytes]] = []
    try:
        # Stand-ins for exec monitors that outlive their exec (their caller died before it could end them).
        stand_ins += [_sleeping_conmon(container) for _ in range(2)]
        anyio.run(backend.terminate, sid)
        assert helper_processes("conmon", "-c", container) == []
        assert [proc.wait(timeout=10) for proc in stand_ins] == [-9, -9]

        # gc: a crashed caller's container (record gone) is reaped with its monitors.
        orphan = anyio.run(backend.provision, SandboxSpec()).id
        orphan_container = backend._record(orphan)["container"]
        anyio.run(backend.exec, orphan, ExecRequest(command="true"))
        stand_ins.append(_sleeping_conmon(orphan_container))
        backend.store.remove_session(orphan)
        assert backend.gc() == [orphan]
        assert helper_processes("conmon", "-c", orphan_container) == []
        assert stand_ins[-1].wait(timeout=10) == -9
    finally:
        for proc in stand_ins:
            proc.kill()
            proc.wait()


def _sleeping_conmon(container: str) -> subprocess.Popen[bytes]:
    """A stand-in for an exec's conmon waiting out exit_command_delay: same program name, same ``-c`` argument."""
    proc = subprocess.Popen(["conmon", "-c", "import time; time.sleep(300)", "-c", container],
                            executable=sys.executable, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(500):
        if proc.pid in helper_processes("conmon", "-c", container):
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the stand-in conmon did not start")


def test_read_only_directory_is_sealed_socket_refuses_files_read(backend: PodmanBackend, tmp_path: Path) -> None:
    check_sealed_read_only_directory(backend, tmp_path)


def test_failed_provision_leaves_no_sealed_mount(backend: PodmanBackend, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o755)
    spec = SandboxSpec.parse({"image": "stockade/no-such-image:1",
                              "mounts": [{"source": str(ro), "target": "/mnt/ro", "access": "read_only"}]})
    sealed_before: list[bool] = []
    real_create = backend.engine.create

    def create(name: str, config: dict[str, object]) -> str:
        sealed_before.append(str(backend.store.sessions) in Path("/proc/self/mountinfo").read_text())
        return real_create(name, config)

    backend.engine.create = create  # type: ignore[method-assign]
    with pytest.raises(SandboxError, match="no-such-image"):
        anyio.run(backend.provision, spec)
    assert sealed_before == [True]  # the mount was made, and the failure came after it
    assert str(backend.store.sessions) not in Path("/proc/self/mountinfo").read_text()
    assert list(backend.store.sessions.iterdir()) == []
