"""Live mounts on bwrap sessions (``attach_filesystem``): canaries on the host, an admitted sibling for every
refusal, and the read-only flag checked both from the guest and from a process holding every capability of the
guest's user namespace."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stockade import (
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    InvalidRequest,
    LifecycleError,
    SandboxSpec,
    SessionNotFound,
)
from stockade.backends.bwrap import BwrapBackend, probe
from stockade.backends.bwrap._mounts import live_mounts_reason

REASON = probe() or live_mounts_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"bwrap live mounts unavailable: {REASON}")
ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BwrapBackend]:
    b = BwrapBackend(tmp_path / "state")
    yield b
    for session_id in b.store.ids():  # a failed test must not leave sandboxes behind
        anyio.run(b.terminate, session_id)


@pytest.fixture
def canary(tmp_path: Path) -> tuple[Path, str]:
    """A host directory holding one file with random content."""
    directory = tmp_path / "canary"
    directory.mkdir()
    text = f"canary-{secrets.token_hex(8)}"
    (directory / "keep").write_text(text)
    return directory, text


def provision(backend: BwrapBackend, **spec: object) -> str:
    return anyio.run(backend.provision, SandboxSpec.parse(spec)).id


def sh(backend: BwrapBackend, session_id: str, script: str) -> ExecResult:
    return anyio.run(backend.exec, session_id, ExecRequest(command="sh", args=("-c", script)))


def attach(backend: BwrapBackend, session_id: str, source: str, target: str, access: str = "read_only") -> None:
    anyio.run(backend.attach_filesystem, session_id,
              FilesystemMount(source=source, target=target, access=FilesystemAccess(access)))


def guest_mount_options(backend: BwrapBackend, session_id: str, target: str) -> list[str]:
    """The per-mount options of ``target`` as the guest's own /proc/self/mountinfo shows them."""
    info = sh(backend, session_id, "cat /proc/self/mountinfo").stdout
    for line in info.splitlines():
        fields = line.split()
        if fields[4] == target:
            return fields[5].split(",")
    raise AssertionError(f"{target} is not mounted in the guest:\n{info}")


def host_mounts_mentioning(*texts: str) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if any(text in line for text in texts)]


# A guest that escaped seccomp and regained capabilities would still run as a raw syscall, not through mount(8).
_GUEST_REMOUNT = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    MS_REMOUNT, MS_BIND = 32, 4096
    rc = libc.mount(None, sys.argv[1].encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None)
    print("remounted" if rc == 0 else "refused " + os.strerror(ctypes.get_errno()))
""")


def test_read_only_live_mount_readable_not_writable_nor_remountable(
    backend: BwrapBackend, canary: tuple[Path, str]
) -> None:
    directory, text = canary
    sid = provision(backend)
    attach(backend, sid, str(directory), "/mnt/live")
    assert sh(backend, sid, "cat /mnt/live/keep").stdout == text  # admitted: the canary is readable
    attack = sh(backend, sid, textwrap.dedent("""
        echo x > /mnt/live/keep; echo x >> /mnt/live/keep; echo x > /mnt/live/new; rm -f /mnt/live/keep
        mv /mnt/live/keep /mnt/live/moved; chmod 777 /mnt/live/keep; mkdir /mnt/live/d; ln -s / /mnt/live/l
        mount -o remount,rw /mnt/live; mount -o remount,rw,bind /mnt/live
        echo x > /mnt/live/keep 2>/dev/null && echo WROTE
        echo done
    """))
    assert attack.stdout.strip().endswith("done") and "WROTE" not in attack.stdout
    raw = anyio.run(backend.exec, sid, ExecRequest(command="python3", args=("-c", _GUEST_REMOUNT, "/mnt/live")))
    assert raw.stdout.startswith("refused"), raw
    assert (directory / "keep").read_text() == text
    assert sorted(p.name for p in directory.iterdir()) == ["keep"]
    assert (directory / "keep").stat().st_mode & 0o777 != 0o777
    options = guest_mount_options(backend, sid, "/mnt/live")
    assert "ro" in options and "nosuid" in options and "nodev" in options


def test_read_write_live_mount_admits_writes_both_ways(backend: BwrapBackend, tmp_path: Path) -> None:
    directory = tmp_path / "rw"
    directory.mkdir()
    sid = provision(backend)
    attach(backend, sid, str(directory), "/work/rw", "read_write")
    token = secrets.token_hex(8)
    assert sh(backend, sid, f"echo {token} > /work/rw/from-guest").exit_code == 0
    assert (directory / "from-guest").read_text() == f"{token}\n"
    (directory / "from-host").write_text("hello")
    assert sh(backend, sid, "cat /work/rw/from-host").stdout == "hello"
    assert "rw" in guest_mount_options(backend, sid, "/work/rw")


def test_read_only_live_mount_is_locked_even_for_every_capability_of_the_guest_userns(
    backend: BwrapBackend, canary: tuple[Path, str], tmp_path: Path
) -> None:
    directory, text = canary
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sid = provision(backend)
    attach(backend, sid, str(directory), "/mnt/locked")
    attach(backend, sid, str(scratch), "/mnt/scratch", "read_write")
    record = backend.store.read(sid)
    assert record is not None
    # Joins the guest's own user namespace with every capability in it and no seccomp filter: what a guest that
    # escaped its confinement inside the namespace would hold. Single-threaded, hence its own interpreter.
    probe_script = textwrap.dedent("""
        import ctypes, json, os, sys
        from stockade.linux import mounts as k
        pid, locked, sibling = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        libc = ctypes.CDLL(None, use_errno=True)
        def errno_of(fn):
            try:
                fn()
                return 0
            except OSError as e:
                return e.errno
        def remount(path):
            if libc.mount(None, path.encode(), None, ctypes.c_ulong(32 | 4096), None) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        def clear_ro(path):
            k.mount_setattr(-100, path, 0, attr_clr=k.MOUNT_ATTR_RDONLY)
        def write(path):
            with open(path + "/probe-write", "w") as f:
                f.write("x")
        mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
        guest_userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
        k.setns(k.ns_owner(mnt), k.CLONE_NEWUSER)
        k.setns(mnt, k.CLONE_NEWNS)
        k.setns(guest_userns, k.CLONE_NEWUSER)
        out = {"in_place_setattr": errno_of(lambda: clear_ro(locked)),
               "in_place_remount": errno_of(lambda: remount(locked))}
        k.unshare(k.CLONE_NEWNS)  # a private copy of the guest's mounts, owned by the guest's user namespace
        out["copy_setattr"] = errno_of(lambda: clear_ro(locked))
        out["copy_remount"] = errno_of(lambda: remount(locked))
        out["copy_write"] = errno_of(lambda: write(locked))
        out["sibling_set_ro"] = errno_of(lambda: k.mount_setattr(-100, sibling, 0, attr_set=k.MOUNT_ATTR_RDONLY))
        out["sibling_clear_ro"] = errno_of(lambda: clear_ro(sibling))
        out["sibling_write"] = errno_of(lambda: write(sibling))
        print(json.dumps(out))
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe_script, str(record["init_pid"]), "/mnt/locked", "/mnt/scratch"],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    import errno

    # Refused: neither in the sandbox's namespace (owned by the outer user namespace) nor in a copy (locked).
    assert out["in_place_setattr"] == errno.EPERM and out["in_place_remount"] == errno.EPERM
    assert out["copy_setattr"] == errno.EPERM and out["copy_remount"] == errno.EPERM
    assert out["copy_write"] == errno.EROFS
    # Admitted sibling: the same process does remount a mount that was not read-only, so it had the power.
    assert out["sibling_set_ro"] == 0 and out["sibling_clear_ro"] == 0 and out["sibling_write"] == 0
    assert (scratch / "probe-write").read_text() == "x"
    assert (directory / "keep").read_text() == text
    assert sorted(p.name for p in directory.iterdir()) == ["keep"]


def test_single_file_attached_read_only(backend: BwrapBackend, canary: tuple[Path, str]) -> None:
    directory, text = canary
    sid = provision(backend)
    attach(backend, sid, str(directory / "keep"), "/etc-extra/keep.txt")
    result = sh(backend, sid, "cat /etc-extra/keep.txt; echo x > /etc-extra/keep.txt 2>/dev/null && echo WROTE")
    assert result.stdout == text
    assert (directory / "keep").read_text() == text


def test_symlink_sources_refused_real_path_admitted(backend: BwrapBackend, canary: tuple[Path, str],
                                                    tmp_path: Path) -> None:
    directory, text = canary
    link = tmp_path / "link"
    link.symlink_to(directory)
    parent_link = tmp_path / "parent-link"
    parent_link.symlink_to(tmp_path)
    sid = provision(backend)
    with pytest.raises(InvalidRequest, match="symlink"):
        attach(backend, sid, str(link), "/mnt/a")
    with pytest.raises(InvalidRequest, match="symlink"):
        attach(backend, sid, str(parent_link / "canary"), "/mnt/b")
    with pytest.raises(InvalidRequest, match="does not exist"):
        attach(backend, sid, str(tmp_path / "missing"), "/mnt/c")
    listing = sh(backend, sid, "ls /mnt; grep -c /mnt/[abc] /proc/self/mountinfo")
    assert listing.stdout.split() == ["memory", "session", "0"]
    attach(backend, sid, str(directory), "/mnt/d")
    assert sh(backend, sid, "cat /mnt/d/keep").stdout == text


def test_target_through_a_guest_symlink_refused_real_directory_admitted(
    backend: BwrapBackend, canary: tuple[Path, str]
) -> None:
    directory, text = canary
    sid = provision(backend)
    outputs = Path(backend.store.session_dir(sid)) / "outputs"
    # The guest plants symlinks that would carry a mount onto the outputs directory or the system view.
    sh(backend, sid, "ln -s /mnt/session/outputs /tmp/to-outputs; ln -s /usr/lib /tmp/to-lib; mkdir /tmp/real")
    for target in ("/tmp/to-outputs", "/tmp/to-outputs/x", "/tmp/to-lib/x"):
        with pytest.raises(InvalidRequest, match="symlink"):
            attach(backend, sid, str(directory), target)
    assert list(outputs.iterdir()) == []
    info = sh(backend, sid, "cat /proc/self/mountinfo").stdout
    assert "/tmp/to-" not in info and "outputs/x" not in info and "/usr/lib/x" not in info
    attach(backend, sid, str(directory), "/tmp/real/x")
    assert sh(backend, sid, "cat /tmp/real/x/keep").stdout == text


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/mnt/session/outputs", "already mounted"),
        ("/mnt/session/outputs/sub", "inside the mount"),
        ("/mnt", "would hide"),
        ("/mnt/memory", "already mounted"),
        ("/usr/local/x", "system view"),
        ("/etc/x", "system view"),
        ("/run/stockade/x", "system view"),
        ("/tmp", "mount point"),
        ("/mnt/spec", "already mounted"),
    ],
)
def test_colliding_targets_refused(backend: BwrapBackend, canary: tuple[Path, str], target: str, why: str) -> None:
    directory, text = canary
    sid = provision(backend, mounts=[{"source": str(directory), "target": "/mnt/spec"}])
    before = sh(backend, sid, "cat /proc/self/mountinfo").stdout
    with pytest.raises(InvalidRequest, match=why):
        attach(backend, sid, str(directory), target)
    assert sh(backend, sid, "cat /proc/self/mountinfo").stdout == before
    attach(backend, sid, str(directory), "/mnt/free")  # admitted sibling
    assert sh(backend, sid, "cat /mnt/free/keep").stdout == text
    with pytest.raises(InvalidRequest, match="already mounted"):  # a live mount takes its target too
        attach(backend, sid, str(directory), "/mnt/free")


def test_live_mounts_are_recorded_for_other_processes(backend: BwrapBackend, canary: tuple[Path, str]) -> None:
    directory, _ = canary
    sid = provision(backend)
    session = anyio.run(backend.attach_filesystem, sid, FilesystemMount(source=str(directory), target="/mnt/in"))
    assert ("/mnt/in", FilesystemAccess.READ_ONLY, str(directory)) in [
        (m.target, m.access, m.host_path) for m in session.mounts
    ]
    other = BwrapBackend(backend.store.root)  # another process's view of the same state directory
    listed = {s.id: s for s in anyio.run(other.list_sessions)}
    assert "/mnt/in" in [m.target for m in listed[sid].mounts]
    record = other.store.read(sid)
    assert record is not None and record["live_mounts"] == ["/mnt/in"]
    assert "/mnt/in" in [m["target"] for m in record["spec"]["mounts"]]


@pytest.mark.skipif(not ROOT, reason="snapshots need the cgroup freezer, which needs root on this host")
def test_session_owned_live_mount_is_snapshotted_and_restored(backend: BwrapBackend) -> None:
    sid = provision(backend)
    attach(backend, sid, "", "/mnt/scratch", "read_write")
    token = secrets.token_hex(8)
    sh(backend, sid, f"echo {token} > /mnt/scratch/kept")
    snap = anyio.run(backend.snapshot, sid)
    manifest = json.loads((Path(snap.metadata["path"]) / "manifest.json").read_text())
    assert manifest["owned_mounts"] == ["/mnt/scratch"]
    anyio.run(backend.terminate, sid)
    fork = provision(backend, from_snapshot=snap.snapshot_id, mounts=manifest["spec"]["mounts"])
    assert sh(backend, fork, "cat /mnt/scratch/kept").stdout == f"{token}\n"


def test_terminate_leaves_no_mount_on_the_host(backend: BwrapBackend, canary: tuple[Path, str]) -> None:
    directory, _ = canary
    sid = provision(backend)
    sdir = str(backend.store.session_dir(sid))
    attach(backend, sid, str(directory), "/mnt/ro")
    attach(backend, sid, "", "/mnt/owned", "read_write")
    # Nothing is mounted on the host even while the session lives: the mounts exist in its namespace only.
    assert host_mounts_mentioning(str(directory), sdir) == []
    record = backend.store.read(sid)
    assert record is not None
    guest_ns = os.readlink(f"/proc/{record['init_pid']}/ns/mnt")
    anyio.run(backend.terminate, sid)
    assert host_mounts_mentioning(str(directory), sdir) == []
    holders = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                if os.readlink(proc_dir / "ns/mnt") == guest_ns:
                    holders.append(proc_dir.name)
            except OSError:
                pass
    assert holders == []
    assert not Path(sdir).exists()


def test_unknown_and_dead_sessions(backend: BwrapBackend, canary: tuple[Path, str]) -> None:
    directory, _ = canary
    with pytest.raises(SessionNotFound):
        attach(backend, "never-created-" + secrets.token_hex(4), str(directory), "/mnt/x")
    sid = provision(backend)
    record = backend.store.read(sid)
    assert record is not None
    os.kill(record["init_pid"], 9)
    deadline = time.monotonic() + 10
    while anyio.run(backend.get_session, sid).metadata.get("health") != "dead":
        assert time.monotonic() < deadline, "the killed sandbox was never reported dead"
        time.sleep(0.05)
    with pytest.raises(LifecycleError, match="not running"):
        attach(backend, sid, str(directory), "/mnt/x")
    live = provision(backend)  # admitted sibling
    attach(backend, live, str(directory), "/mnt/x")


def test_capability_flag_matches(backend: BwrapBackend) -> None:
    assert backend.capabilities().live_mounts


# ------------------------------------------------------------------------------------- sealed read-only mounts

_CONNECT = textwrap.dedent("""
    import socket, sys
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    try:
        c.connect(sys.argv[1])
        print("answered " + c.recv(16).decode())
    except OSError as exc:
        print("refused " + type(exc).__name__)
""")


class _Daemon:
    """A host unix listener standing in for a daemon (docker.sock): greets and counts every connection."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.greeting = f"hi-{secrets.token_hex(4)}"
        self.count = 0
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)  # any uid may connect: only the mount can stop it
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.sendall(self.greeting.encode())
            conn.close()

    def close(self) -> None:
        import socket

        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _connect(backend: BwrapBackend, session_id: str, path: str) -> str:
    result = anyio.run(backend.exec, session_id, ExecRequest(command="python3", args=("-c", _CONNECT, path)))
    assert result.exit_code == 0, result
    return result.stdout.strip()


@pytest.mark.parametrize("live", [False, True], ids=["provisioned", "attached-live"])
def test_host_daemon_socket_in_read_only_mount_refuses_guest(
    backend: BwrapBackend, canary: tuple[Path, str], tmp_path: Path, live: bool
) -> None:
    directory, text = canary
    daemon = _Daemon(directory / "daemon.sock")
    rw = tmp_path / "rw"
    rw.mkdir()
    rw_daemon = _Daemon(rw / "daemon.sock")
    try:
        mounts = [{"source": str(rw), "target": "/mnt/rw", "access": "read_write"}]
        if not live:
            mounts.append({"source": str(directory), "target": "/mnt/ro", "access": "read_only"})
        sid = provision(backend, mounts=mounts)
        if live:
            attach(backend, sid, str(directory), "/mnt/ro")
        # Admitted: the files of the read-only mount read, and a daemon socket in a read-write mount (which the
        # caller granted for writing) answers, so the probe can tell a refusal from a broken connect.
        assert sh(backend, sid, "cat /mnt/ro/keep; echo; ls /mnt/ro").stdout.split() == [text, "daemon.sock", "keep"]
        assert _connect(backend, sid, "/mnt/rw/daemon.sock") == f"answered {rw_daemon.greeting}"
        assert rw_daemon.count == 1
        # Refused: the socket is listed in the read-only mount, but connecting reaches no host daemon.
        outcome = _connect(backend, sid, "/mnt/ro/daemon.sock")
        assert outcome.startswith("refused"), outcome
        assert daemon.count == 0
        # The mount shows neither the host path of its source nor a writable flag.
        info = sh(backend, sid, "cat /proc/self/mountinfo").stdout
        line = next(line for line in info.splitlines() if line.split()[4] == "/mnt/ro")
        assert str(directory) not in line and " overlay " in line, line
        assert "ro" in guest_mount_options(backend, sid, "/mnt/ro")
        session = anyio.run(backend.get_session, sid)
        assert "unsealed_mounts" not in session.metadata
    finally:
        daemon.close()
        rw_daemon.close()


def test_nested_mounts_keep_the_spec_order(backend: BwrapBackend, canary: tuple[Path, str], tmp_path: Path) -> None:
    """Mounts after a sealed one are placed after it, so a read-write mount inside a read-only one stays
    writable and one around it does not hide it."""
    directory, text = canary
    (directory / "out").mkdir()
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    sid = provision(backend, mounts=[
        {"source": str(directory), "target": "/data", "access": "read_only"},
        {"source": str(out), "target": "/data/out", "access": "read_write"},
        {"source": str(work), "target": "/work", "access": "read_write"},
        {"source": str(directory), "target": "/work/ref", "access": "read_only"},
    ])
    result = sh(backend, sid, "echo made > /data/out/new && cat /data/keep && echo && cat /work/ref/keep && echo && "
                              "echo w > /work/w && ! touch /data/nope 2>/dev/null && "
                              "! touch /work/ref/nope 2>/dev/null")
    assert result.exit_code == 0, result
    assert result.stdout.split() == [text, text]
    assert (out / "new").read_text() == "made\n"
    assert (work / "w").read_text() == "w\n"
    assert sorted(p.name for p in directory.iterdir()) == ["keep", "out"]


def test_guest_proc_names_no_state_dir_session_id_or_read_only_source(
    backend: BwrapBackend, canary: tuple[Path, str], tmp_path: Path
) -> None:
    """The session's own directories (outputs, memory, an owned mount, live or not), its generated /etc files
    and the agent reach the guest without their host paths; only a read-write mount of a host directory (a
    bind, declared by ``private_mount_sources`` false) shows its source. The owned directories still work both
    ways: what the guest writes is on the host, and a unix socket the guest binds there answers the guest."""
    directory, _text = canary
    rw = tmp_path / "rw"
    rw.mkdir()
    sid = provision(backend, memory_writable=True, mounts=[
        {"source": str(directory), "target": "/mnt/ro", "access": "read_only"},
        {"source": str(rw), "target": "/mnt/rw", "access": "read_write"},
        {"source": "", "target": "/mnt/owned", "access": "read_write"},
    ])
    attach(backend, sid, "", "/mnt/live", "read_write")
    sdir = backend.store.session_dir(sid)
    script = ("cat /proc/self/mountinfo /proc/1/mountinfo /proc/self/cgroup; "
              "for d in /mnt/session/outputs /mnt/memory /mnt/owned /mnt/live; do echo x > $d/f && mkdir $d/d && "
              "mv $d/f $d/d/g || echo FAILED $d; done; cd /mnt/session/outputs && "
              "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.bind(\"sock\"); s.listen(); "
              "c = socket.socket(socket.AF_UNIX); c.connect(\"sock\"); print(\"connected\")'")
    result = sh(backend, sid, script)
    assert result.exit_code == 0 and "FAILED" not in result.stdout and "connected" in result.stdout, result
    for needle in (sid, str(sdir), str(backend.store.root), str(directory), str(Path(SRC))):
        assert needle not in result.stdout, (needle, result.stdout)
    assert str(rw) in result.stdout  # the declared gap: if this stops showing, the capability can say so
    for owned in ("outputs", "memory", "mounts/2"):
        assert (sdir / owned / "d" / "g").read_text() == "x\n", owned
    live = next(p for p in (sdir / "mounts").iterdir() if p.name.startswith("live-"))
    assert (live / "d" / "g").read_text() == "x\n"
    session = anyio.run(backend.get_session, sid)
    assert "unsealed_mounts" not in session.metadata
    assert backend.capabilities().private_mount_sources is False
    anyio.run(backend.terminate, sid)
    assert not sdir.exists()
