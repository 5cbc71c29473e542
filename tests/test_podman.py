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

from _docker_fixtures import PY_IMAGE, PrivateDockerd, podman_or_skip
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
    """A host daemon's unix socket in a read-only directory does not answer the guest (the directory is a sealed
    overlay mounted under the session's directory); its files read (admitted sibling), a read-write directory's
    socket still answers, and terminate leaves no mount behind."""
    import socket

    ro, rw = tmp_path / "ro", tmp_path / "rw"
    token = secrets.token_hex(8)
    listeners = []
    for d in (ro, rw):
        d.mkdir(mode=0o755)
        (d / "canary").write_text(token)
        (d / "canary").chmod(0o644)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(d / "sock"))
        (d / "sock").chmod(0o777)
        srv.listen()
        listeners.append(srv)
    spec = SandboxSpec.parse({"mounts": [{"source": str(ro), "target": "/mnt/ro", "access": "read_only"},
                                         {"source": str(rw), "target": "/mnt/rw", "access": "read_write"}]})
    sid = anyio.run(backend.provision, spec).id
    code = ("import socket\nfor d in ('/mnt/ro', '/mnt/rw'):\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n        s.connect(d + '/sock'); print(d, 'connected')\n"
            "    except OSError as e:\n        print(d, 'refused', e.errno)\n"
            "    print(d, open(d + '/canary').read())\n")
    out = anyio.run(backend.exec, sid, ExecRequest(command="python3", args=("-c", code)))
    lines = out.stdout.splitlines()
    assert lines[0].startswith("/mnt/ro refused") and lines[1] == f"/mnt/ro {token}", out
    assert lines[2] == "/mnt/rw connected" and lines[3] == f"/mnt/rw {token}", out
    sealed = backend.store.session_dir(sid) / "sealed"
    assert any(p.name for p in sealed.iterdir()) and str(sealed) in Path("/proc/self/mountinfo").read_text()
    anyio.run(backend.terminate, sid)
    reached: list[str] = []
    for srv, name in zip(listeners, ("ro", "rw"), strict=True):
        srv.setblocking(False)  # a connect() that got through waits in the backlog
        try:
            srv.accept()[0].close()
            reached.append(name)
        except BlockingIOError:
            pass
    assert reached == ["rw"]
    assert str(sealed) not in Path("/proc/self/mountinfo").read_text()
    assert not sealed.exists()
    for srv in listeners:
        srv.close()


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
