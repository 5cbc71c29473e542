"""The landlock backend: what its issue's "done when" lists, each judged by canaries, with admitted siblings.

Run as root, sessions use a per-session uid (the backend's default there); the unprivileged path is covered by
``test_landlock_unprivileged.py``.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stockade import (
    ExecError,
    ExecRequest,
    ExecResult,
    InvalidRequest,
    SandboxSpec,
    SandboxState,
    SessionNotFound,
    Unsupported,
)
from stockade.backend import ExecChunk
from stockade.backends.landlock import LandlockBackend, probe
from stockade.linux import landlock

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"landlock backend unavailable: {REASON}")
ROOT = os.geteuid() == 0
ABI = landlock.abi_version()


def _host_dir(mode: int = 0o755) -> Path:
    # Under /var/tmp: searchable by the per-session uid, and not anything a session is given.
    path = Path(tempfile.mkdtemp(prefix="stockade-ll-test-", dir="/var/tmp"))
    path.chmod(mode)
    return path


@pytest.fixture
def host_dir() -> Iterator[Path]:
    path = _host_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend() -> Iterator[LandlockBackend]:
    state = _host_dir(0o700)
    b = LandlockBackend(state)
    yield b
    for session_id in b.store.ids():  # a failed test must not leave sessions behind
        anyio.run(b.terminate, session_id)
    shutil.rmtree(state, ignore_errors=True)


def run(backend: LandlockBackend, session_id: str, *argv: str, **kw: object) -> ExecResult:
    return anyio.run(backend.exec, session_id, ExecRequest.parse({"command": argv[0], "args": list(argv[1:]), **kw}))


def sh(backend: LandlockBackend, session_id: str, script: str, **kw: object) -> ExecResult:
    return run(backend, session_id, "sh", "-c", script, **kw)


def provision(backend: LandlockBackend, **spec: object) -> str:
    return anyio.run(backend.provision, SandboxSpec.parse(spec)).id


def host_paths(backend: LandlockBackend, session_id: str) -> dict[str, str]:
    """Mount target -> the host path the guest reaches it at (this backend always reports one)."""
    out = {}
    for mount in anyio.run(backend.get_session, session_id).mounts:
        assert mount.host_path is not None
        out[mount.target] = mount.host_path
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------------------- filesystem


def test_outside_canary_unreadable_and_ro_mount_readable(backend: LandlockBackend, host_dir: Path) -> None:
    outside, mounted = host_dir / "outside", host_dir / "mounted"
    outside.mkdir(mode=0o755)
    mounted.mkdir(mode=0o755)
    secret, shared = f"canary-{secrets.token_hex(12)}", f"shared-{secrets.token_hex(12)}"
    (outside / "secret").write_text(secret)
    (mounted / "data").write_text(shared)
    for f in (outside / "secret", mounted / "data"):
        f.chmod(0o644)  # only Landlock may stand in the way, not file modes
    sid = provision(backend, mounts=[{"source": str(mounted), "target": "/mnt/data", "access": "read_only"}],
                    env={"DATA_DIR": "/mnt/data"})
    refused = sh(backend, sid, f"echo ran; cat {outside}/secret /proc/1/root{outside}/secret 2>&1; ls {outside} 2>&1;"
                               " cat /root/.bashrc /etc/shadow 2>&1; true")
    assert refused.stdout.startswith("ran\n")
    assert secret not in refused.stdout + refused.stderr
    assert "Permission denied" in refused.stdout
    # Admitted sibling: the mount is granted at its host path, and the guest path in env is translated.
    admitted = sh(backend, sid, 'cat "$DATA_DIR/data"; echo; cat /mnt/data/data 2>/dev/null || echo no-guest-path')
    assert admitted.stdout.splitlines() == [shared, "no-guest-path"]
    assert host_paths(backend, sid)["/mnt/data"] == str(mounted)


def test_write_outside_refused_rw_mount_and_outputs_admitted(backend: LandlockBackend, host_dir: Path) -> None:
    outside, rw = host_dir / "outside", host_dir / "rw"
    for d in (outside, rw):
        d.mkdir()
        d.chmod(0o777)  # writable by anyone as far as file modes go
    victim = outside / "victim"
    victim.write_text("original")
    victim.chmod(0o666)
    sid = provision(backend, mounts=[{"source": str(rw), "target": "/mnt/rw", "access": "read_write"}])
    attack = sh(backend, sid, textwrap.dedent(f"""
        echo ran
        echo x > {outside}/new; echo x >> {victim}; echo x > {victim}; truncate -s 0 {victim}
        touch {outside}/touched; mkdir {outside}/dir; ln -s / {outside}/link; ln {victim} $HOME/hard
        mv {victim} $HOME/stolen; rm -f {victim}
        true
    """))
    assert attack.stdout == "ran\n"
    assert victim.read_text() == "original" and sorted(p.name for p in outside.iterdir()) == ["victim"]
    outputs = Path(host_paths(backend, sid)["/mnt/session/outputs"])
    content = secrets.token_hex(8)
    wrote = sh(backend, sid, f'printf {content} > /mnt/rw/guest-path 2>/dev/null; printf {content} > {rw}/a; '
                             f'printf {content} > "$STOCKADE_OUTPUTS_DIR/b"; echo {content} > "$TMPDIR/c" && '
                             'cat "$TMPDIR/c"', cwd="/mnt/session/outputs")
    assert wrote.exit_code == 0 and wrote.stdout == f"{content}\n"
    assert (rw / "a").read_text() == content and (outputs / "b").read_text() == content
    assert not (rw / "guest-path").exists()


def test_ro_mount_not_writable(backend: LandlockBackend, host_dir: Path) -> None:
    ro = host_dir / "ro"
    ro.mkdir()
    ro.chmod(0o777)
    keep = ro / "keep"
    keep.write_text("original")
    keep.chmod(0o666)
    sid = provision(backend, mounts=[{"source": str(ro), "target": "/mnt/ro", "access": "read_only"}])
    attempts = {
        "overwrite": f"echo x > {keep}",
        "append": f"echo x >> {keep}",
        "truncate": f"truncate -s 0 {keep}",
        "create": f"echo x > {ro}/new",
        "mkdir": f"mkdir {ro}/dir",
        "rm": f"rm {keep}",
        "mv": f"mv {keep} {ro}/moved",
        "symlink": f"ln -s /etc {ro}/link",
    }
    if ROOT:  # the per-session uid does not own the file; as the host user it would (see docs/landlock.md)
        attempts["chmod"] = f"chmod 600 {keep}"
    script = "\n".join(f"( {cmd} ) >/dev/null 2>&1 && echo 'ok {name}'" for name, cmd in attempts.items())
    result = sh(backend, sid, f"echo ran\n{script}\ncat {keep}")
    assert result.stdout.splitlines() == ["ran", "original"]  # every attempt failed; the file is still readable
    assert keep.read_text() == "original" and oct(keep.stat().st_mode & 0o777) == oct(0o666)
    assert sorted(p.name for p in ro.iterdir()) == ["keep"]


def test_xattr_writes_refused_reads_admitted(backend: LandlockBackend, host_dir: Path) -> None:
    """Landlock does not control extended attributes: a second seccomp program refuses writing them."""
    ro = host_dir / "ro"
    ro.mkdir()
    keep = ro / "keep"
    keep.write_text("original")
    keep.chmod(0o666)  # the uid may write it as far as modes go: only the filter stands in the way
    try:
        os.setxattr(keep, "user.stockade", b"host-value")
    except OSError as exc:
        pytest.skip(f"{host_dir} does not take user xattrs ({exc.strerror})")
    sid = provision(backend, mounts=[{"source": str(ro), "target": "/mnt/ro", "access": "read_only"}])
    script = textwrap.dedent("""
        import os, sys
        path = sys.argv[1]
        print(os.getxattr(path, "user.stockade").decode())
        for name, call in (("set", lambda p: os.setxattr(p, "user.stockade", b"guest")),
                           ("remove", lambda p: os.removexattr(p, "user.stockade"))):
            for target in (path, os.environ["STOCKADE_OUTPUTS_DIR"]):
                try:
                    call(target); print(name, "ok")
                except OSError as e:
                    print(name, e.errno)
    """)
    result = run(backend, sid, "python3", "-c", script, str(keep))
    lines = result.stdout.splitlines()
    assert lines[0] == "host-value"  # admitted: reading works, so the refusals below are not a broken call
    assert lines[1:] == [f"set {errno.EOPNOTSUPP}"] * 2 + [f"remove {errno.EOPNOTSUPP}"] * 2, result
    assert os.getxattr(keep, "user.stockade") == b"host-value"


# ---------------------------------------------------------------------------------------------- network


_CONNECT = textwrap.dedent("""
    import socket, sys
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect((host, int(sys.argv[1])))
            print("tcp connected", host)
        except OSError as e:
            print("tcp refused", host, e.errno)
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"udp-canary", ("127.0.0.1", int(sys.argv[2])))
        print("udp sent")
    except OSError as e:
        print("udp refused", e.errno)
    for family in (socket.AF_NETLINK, socket.AF_PACKET, socket.AF_VSOCK):
        try:
            socket.socket(family, socket.SOCK_RAW if family != socket.AF_VSOCK else socket.SOCK_STREAM)
            print("opened", family)
        except OSError as e:
            print("refused", family, e.errno)
""")


def test_network_refused_unix_socket_inside_session_admitted(backend: LandlockBackend) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    try:
        sid = provision(backend)
        result = run(backend, sid, "python3", "-c", _CONNECT, str(tcp.getsockname()[1]), str(udp.getsockname()[1]))
        lines = result.stdout.splitlines()
        assert lines[0].startswith("tcp refused 127.0.0.1") and lines[1].startswith("tcp refused ::1"), result
        assert lines[2].startswith("udp refused"), result
        assert all(line.startswith("refused") for line in lines[3:]) and len(lines) == 6, result
        with pytest.raises(TimeoutError):
            tcp.accept()  # the canary listener never saw a connection
        with pytest.raises(TimeoutError):
            udp.recvfrom(64)  # nor the UDP one a datagram
    finally:
        tcp.close()
        udp.close()
    # Admitted sibling: connected unix pairs (asyncio's self-pipe, multiprocessing's connections) work; a unix
    # socket that could be bound or connected to a name does not, nor a datagram pair (sendto() takes a path).
    pairs = textwrap.dedent("""
        import asyncio, multiprocessing.connection, socket
        a, b = socket.socketpair(); a.sendall(b"ping"); print("stream pair", b.recv(4).decode())
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET); a.send(b"ping")
        print("seqpacket pair", b.recv(4).decode())
        r, w = multiprocessing.connection.Pipe(); r.send("ping"); print("mp pipe", w.recv())
        asyncio.run(asyncio.sleep(0)); print("asyncio ok")
        for what, make in (("unix socket", lambda: socket.socket(socket.AF_UNIX)),
                           ("dgram pair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))):
            try:
                make(); print(what, "created")
            except OSError as e:
                print(what, "refused", e.errno)
    """)
    answer = run(backend, sid, "python3", "-c", pairs, timeout=20)
    assert answer.stdout.splitlines()[:4] == ["stream pair ping", "seqpacket pair ping", "mp pipe ping",
                                              "asyncio ok"], answer
    assert [line.split()[-2] for line in answer.stdout.splitlines()[4:]] == ["refused", "refused"], answer


def test_host_unix_socket_outside_session(backend: LandlockBackend, host_dir: Path) -> None:
    """Host daemons' unix sockets, by path (whatever their mode) and by abstract name, never answer the guest:
    under deny-all it cannot create a unix socket that could connect (Landlock controls connect() to a path
    only from ABI 9). The admitted sibling is in the test above (socketpair works)."""
    sockets = {}
    for mode in (0o600, 0o777):
        path = host_dir / f"s{mode:o}.sock"
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(path))
        srv.listen(4)
        srv.settimeout(0.2)
        path.chmod(mode)
        sockets[mode] = (path, srv)
    abstract_name = f"stockade-test-{secrets.token_hex(6)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen(4)
    abstract.settimeout(0.2)
    probe_script = textwrap.dedent("""
        import socket, sys
        for path in sys.argv[1:]:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path.replace("@", "\\0", 1)); print("connected")
            except OSError as e:
                print("refused", e.errno)
    """)
    try:
        sid = provision(backend)
        result = run(backend, sid, "python3", "-c", probe_script, *(str(p) for p, _ in sockets.values()),
                     "@" + abstract_name)
        assert result.stdout.split("\n")[:3] == ["refused 97"] * 3, result  # EAFNOSUPPORT from socket()
        for _, srv in sockets.values():
            with pytest.raises(TimeoutError):
                srv.accept()  # no canary listener saw a connection
        with pytest.raises(TimeoutError):
            abstract.accept()
    finally:
        abstract.close()
        for _, srv in sockets.values():
            srv.close()


def test_network_policies_beyond_deny_all_are_unsupported_and_leave_nothing(backend: LandlockBackend) -> None:
    for policy in ({"mode": "unrestricted"}, {"mode": "limited", "allowed_hosts": ["example.test"]}):
        with pytest.raises(Unsupported) as err:
            provision(backend, network_policy=policy)
        assert err.value.backend == "landlock"
    direct = anyio.run(backend.provision, SandboxSpec())
    with pytest.raises(Unsupported, match="gateway"):
        anyio.run(backend.apply_network_policy, direct.id, SandboxSpec.parse(
            {"network_policy": {"mode": "limited", "allowed_hosts": ["example.test"]}}).network_policy)
    anyio.run(backend.terminate, direct.id)
    assert backend.store.ids() == []


# -------------------------------------------------------------------------------------------------- env


def test_host_env_withheld_declared_env_present(backend: LandlockBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    name, value = f"STOCKADE_HOST_CANARY_{secrets.token_hex(4).upper()}", f"host-{secrets.token_hex(12)}"
    monkeypatch.setenv(name, value)
    sid = provision(backend, env={"SPEC_VAR": "from-spec", "OUT": "/mnt/session/outputs/x"})
    result = sh(backend, sid, "env; tr '\\0' '\\n' < /proc/self/environ", env={"REQ_VAR": "from-request"})
    assert value not in result.stdout and name not in result.stdout
    lines = result.stdout.splitlines()
    assert "SPEC_VAR=from-spec" in lines and "REQ_VAR=from-request" in lines
    outputs = host_paths(backend, sid)["/mnt/session/outputs"]
    assert f"OUT={outputs}/x" in lines and f"STOCKADE_OUTPUTS_DIR={outputs}" in lines


# ------------------------------------------------------------------------------------------- processes


def test_no_new_privs_seccomp_and_no_capabilities(backend: LandlockBackend) -> None:
    sid = provision(backend)
    status = sh(backend, sid, "grep -E '^(CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs|Uid):' /proc/self/status")
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in status.stdout.splitlines())}
    assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1"
    assert fields["CapEff"] == fields["CapPrm"] == "0000000000000000"
    if ROOT:
        assert fields["Uid"].split()[0] != "0"  # a per-session uid, never root
        assert fields["CapBnd"] == "0000000000000000"  # and nothing exec'd can ever regain a capability
    probe_script = ("import ctypes, os; l = ctypes.CDLL(None, use_errno=True); "
                    "print(l.unshare(0x10000000), ctypes.get_errno(), os.getpid() > 0)")
    assert run(backend, sid, "python3", "-c", probe_script).stdout.split() == ["-1", "1", "True"]


def test_host_process_cannot_be_signalled(backend: LandlockBackend) -> None:
    host = subprocess.Popen(["sleep", "60"])
    try:
        sid = provision(backend)
        result = sh(backend, sid, f"kill -9 {host.pid} 2>&1; kill -9 -1 2>&1; echo done")
        assert result.stdout.strip().endswith("done")
        assert host.poll() is None
        # Admitted sibling: a later exec can still signal what an earlier one left running (one domain).
        started = sh(backend, sid, "sleep 60 >/dev/null 2>&1 & echo $!")
        pid = int(started.stdout)
        assert alive(pid)
        assert sh(backend, sid, f"kill -9 {pid} && echo killed").stdout == "killed\n"
    finally:
        host.kill()
        host.wait()


def test_timeout_kills_the_whole_tree(backend: LandlockBackend) -> None:
    sid = provision(backend)
    marker = str(secrets.randbelow(10**6) + 10**6)
    script = (f"sleep 3{marker}0 & echo $!; (setsid sh -c 'sleep 3{marker}1 & echo $!; wait' &); "
              f"sleep 0.3; sleep 3{marker}2")
    result = sh(backend, sid, script, timeout=1)
    assert result.timed_out and result.exit_code == 137
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2, result
    assert not any(alive(p) for p in pids)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert left == []
    fast = sh(backend, sid, "echo quick", timeout=10)
    assert not fast.timed_out and fast.stdout == "quick\n"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_background_processes_persist_then_die_at_terminate(backend: LandlockBackend) -> None:
    sid = provision(backend)
    record = backend.store.read(sid)
    assert record is not None
    started = sh(backend, sid, "sleep 300 >/dev/null 2>&1 & echo $!; "
                               "(setsid sh -c 'sleep 301 & echo $!' >\"$TMPDIR/daemon\" 2>&1 &); sleep 0.2; "
                               "cat \"$TMPDIR/daemon\"")
    pids = [int(p) for p in started.stdout.split()]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    assert all(alive(p) for p in pids)  # they outlive the exec that started them (admitted)
    root = Path(record["paths"]["root"])
    anyio.run(backend.terminate, sid)
    assert not any(alive(p) for p in pids)
    assert not alive(int(record["supervisor_pid"]))
    assert not root.exists() and backend.store.ids() == []
    with pytest.raises(SessionNotFound):
        anyio.run(backend.terminate, sid)
    if ROOT:  # nothing at all runs under the session's uid any more
        uid = str(record["uid"])
        owners = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == uid]
        assert owners == []


def _uid_of(proc: Path) -> str | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return line.split()[1]
    except OSError:
        pass
    return None


def test_concurrent_terminates_one_wins(backend: LandlockBackend) -> None:
    sid = provision(backend)

    async def both() -> list[str]:
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await backend.terminate(sid)
                outcomes.append("ok")
            except SessionNotFound:
                outcomes.append("not found")

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        return sorted(outcomes)

    assert anyio.run(both) == ["not found", "ok"]
    assert backend.store.ids() == [] and backend.gc() == []


def test_session_id_not_in_guest_paths(backend: LandlockBackend) -> None:
    sid = provision(backend, session_id=f"secret-id-{secrets.token_hex(6)}")
    result = sh(backend, sid, "env; pwd")
    assert result.exit_code == 0 and sid not in result.stdout


def test_exec_errors_are_typed_and_the_session_survives(backend: LandlockBackend, host_dir: Path) -> None:
    sid = provision(backend)
    with pytest.raises(ExecError, match="command not found"):
        run(backend, sid, "no-such-command-xyz")
    with pytest.raises(ExecError, match="directory"):
        run(backend, sid, "true", cwd="/no/such/dir")
    tool = host_dir / "tool"
    tool.write_text("#!/bin/sh\necho should-not-run\n")
    tool.chmod(0o755)
    with pytest.raises(ExecError, match="permission denied"):
        run(backend, sid, str(tool))  # not under a granted path: Landlock refuses to execute it
    assert run(backend, sid, "true").exit_code == 0


def test_output_is_bounded_and_streamed() -> None:
    state = _host_dir(0o700)
    backend = LandlockBackend(state, output_limit_bytes=1000)
    try:
        sid = provision(backend)
        big = sh(backend, sid, "head -c 5000000 /dev/zero | tr '\\0' a; echo tail >&2")
        assert len(big.stdout) == 1000 and big.truncated and big.stderr == "tail\n"
        small = sh(backend, sid, "echo small")
        assert small.stdout == "small\n" and not small.truncated
        outputs = Path(backend.store.read(sid)["paths"]["root"]) / "outputs"  # type: ignore[index]

        async def stream() -> list[ExecChunk | ExecResult]:
            # The guest waits for a file the host writes only after the first chunk arrived: without streaming
            # this would never finish (the request's timeout would fire instead).
            request = ExecRequest.parse({"command": "sh", "args": [
                "-c", 'echo first; while [ ! -e "$STOCKADE_OUTPUTS_DIR/go" ]; do sleep 0.05; done; echo second'],
                "timeout": 20})
            items: list[ExecChunk | ExecResult] = []
            async for item in backend.exec_stream(sid, request):
                items.append(item)
                if isinstance(item, ExecChunk) and item.data == b"first\n":
                    (outputs / "go").write_text("")
            return items

        items = anyio.run(stream)
        result = items[-1]
        assert isinstance(result, ExecResult) and not result.timed_out and result.stdout == "first\nsecond\n"
        assert [i.data for i in items[:-1] if isinstance(i, ExecChunk)] == [b"first\n", b"second\n"]
    finally:
        for session_id in backend.store.ids():
            anyio.run(backend.terminate, session_id)
        shutil.rmtree(state, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- limits


def test_memory_limit_is_per_process(backend: LandlockBackend) -> None:
    sid = provision(backend, limits={"memory_mb": 64})
    big = run(backend, sid, "python3", "-c", "b = bytearray(256 << 20); print(len(b))")
    assert big.exit_code != 0 and "MemoryError" in big.stderr
    small = run(backend, sid, "python3", "-c", "b = bytearray(8 << 20); print('ok')")
    assert small.stdout == "ok\n"
    limit = sh(backend, sid, "grep 'Max address space' /proc/self/limits")
    assert str(64 << 20) in limit.stdout


@pytest.mark.skipif(not ROOT, reason="a process limit needs a per-session uid, which needs root")
def test_pids_limit_with_per_session_uid(backend: LandlockBackend) -> None:
    forks = textwrap.dedent("""
        import os, sys, time
        n = 0
        for _ in range(int(sys.argv[1])):
            try:
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
                n += 1
            except OSError:
                pass
        print(n)
    """)
    sid = provision(backend, limits={"pids_max": 32})
    bomb = run(backend, sid, "python3", "-c", forks, "100", timeout=20)
    assert bomb.stdout.strip() and int(bomb.stdout) < 32
    ok = run(backend, provision(backend, limits={"pids_max": 64}), "python3", "-c", forks, "10", timeout=20)
    assert ok.stdout.strip() == "10"


def test_capabilities_are_honest(backend: LandlockBackend) -> None:
    caps = backend.capabilities()
    assert caps.filesystem_isolation and caps.network_deny_all and caps.memory_limit
    assert not (caps.process_isolation or caps.network_policy or caps.network_unrestricted or caps.live_mounts)
    assert not caps.cpu_limit and caps.pids_limit is ROOT
    with pytest.raises(Unsupported):
        provision(backend, limits={"cpu_count": 1})
    if not ROOT:
        with pytest.raises(Unsupported):
            provision(backend, limits={"pids_max": 10})
    with pytest.raises(Unsupported):
        provision(backend, image="debian:12")
    sid = provision(backend)
    with pytest.raises(Unsupported):
        anyio.run(backend.attach_filesystem, sid, SandboxSpec.parse(
            {"mounts": [{"source": "", "target": "/mnt/x"}]}).mounts[0])
    meta = anyio.run(backend.get_session, sid).metadata
    assert meta["landlock_abi"] == str(ABI) and "per process" in meta["memory_limit_scope"]
    assert "chmod" in meta["not_enforced"]
    # No private filesystem view: the conformance cases look for mounts at their host paths because of this.
    assert caps.private_filesystem_view is False


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        chain.append(pid)
    return chain


def test_supervisor_pid_in_metadata(backend: LandlockBackend) -> None:
    sid = provision(backend)
    pid = int(anyio.run(backend.get_session, sid).metadata["supervisor_pid"])
    assert alive(pid) and b"_supervisor.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    # It is the process the session's commands run under, not some other process of the backend.
    started = sh(backend, sid, "sleep 300 >/dev/null 2>&1 & echo $!")
    # Walked again until it holds: the exec's runner may exit (and be reaped) in the middle of a walk, which
    # then stops short; the orphan is re-parented to the supervisor, a subreaper.
    deadline = time.monotonic() + 5
    while pid not in (chain := _ancestors(int(started.stdout))) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pid in chain, chain
    # Another backend instance on the same store (a restarted service) reports the same process.
    again = LandlockBackend(backend.store.root)
    listed = {s.id: s.metadata.get("supervisor_pid") for s in anyio.run(again.list_sessions)}
    assert listed[sid] == str(pid)
    anyio.run(backend.terminate, sid)
    assert not alive(pid)


def test_invalid_mount_sources_refused_without_leftovers(backend: LandlockBackend, host_dir: Path) -> None:
    link = host_dir / "link"
    link.symlink_to("/etc")
    with pytest.raises(InvalidRequest, match="symlink"):
        provision(backend, mounts=[{"source": str(link), "target": "/mnt/x"}])
    with pytest.raises(InvalidRequest, match="does not exist"):
        provision(backend, mounts=[{"source": str(host_dir / "nope"), "target": "/mnt/x"}])
    taken = provision(backend, session_id="fixed-id")
    with pytest.raises(InvalidRequest, match="already exists"):
        provision(backend, session_id="fixed-id")
    assert backend.store.ids() == [taken]


# ------------------------------------------------------------------------------------ snapshot / suspend


def test_snapshot_restores_files_and_never_reads_outside(backend: LandlockBackend, host_dir: Path) -> None:
    secret = f"canary-{secrets.token_hex(12)}"
    canary = host_dir / "secret"
    canary.write_text(secret)
    canary.chmod(0o644)
    sid = provision(backend, mounts=[{"source": "", "target": "/mnt/scratch", "access": "read_write"}])
    scratch = host_paths(backend, sid)["/mnt/scratch"]
    sh(backend, sid, f'echo out > "$STOCKADE_OUTPUTS_DIR/a"; echo tmp > "$TMPDIR/b"; echo home > "$HOME/c"; '
                     f'echo scratch > {scratch}/d; ln -s {canary} "$STOCKADE_OUTPUTS_DIR/leak"; '
                     'ln -s /usr/bin/python3 "$HOME/py"')
    snap = anyio.run(backend.snapshot, sid)
    archive = Path(snap.metadata["path"]) / "archive.tar.gz"
    manifest = json.loads((Path(snap.metadata["path"]) / "manifest.json").read_text())
    assert manifest["sha256"] == snap.metadata["sha256"] and manifest["backend"] == "landlock"
    assert secret.encode() not in gzip.decompress(archive.read_bytes())  # the symlink was kept as a link
    anyio.run(backend.terminate, sid)
    fork = provision(backend, from_snapshot=snap.snapshot_id,
                     mounts=[{"source": "", "target": "/mnt/scratch", "access": "read_write"}])
    fork_scratch = host_paths(backend, fork)["/mnt/scratch"]
    restored = sh(backend, fork, f'cat "$STOCKADE_OUTPUTS_DIR/a" "$TMPDIR/b" "$HOME/c" {fork_scratch}/d; '
                                 'cat "$STOCKADE_OUTPUTS_DIR/leak" 2>/dev/null || echo leak-refused; '
                                 'echo more >> "$HOME/c" && echo writable; "$HOME/py" -c "print(3)"')
    assert restored.stdout.splitlines() == ["out", "tmp", "home", "scratch", "leak-refused", "writable", "3"]
    fresh = provision(backend)
    empty = sh(backend, fresh, 'find "$STOCKADE_OUTPUTS_DIR" "$HOME" "$TMPDIR" -mindepth 1; echo listed')
    assert empty.stdout == "listed\n"  # a fresh session starts empty
    shutil.rmtree(snap.metadata["path"])


def test_suspend_stops_the_session_and_exec_resumes_it(backend: LandlockBackend) -> None:
    sid = provision(backend)
    sh(backend, sid, '(while true; do date +%s%N > "$TMPDIR/tick.new"; mv "$TMPDIR/tick.new" "$TMPDIR/tick"; '
                     "sleep 0.05; done) >/dev/null 2>&1 &")
    tick = Path(anyio.run(backend.get_session, sid).metadata["tmpdir"]) / "tick"
    deadline = time.monotonic() + 10
    while not tick.exists():
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.05)
    assert anyio.run(backend.suspend, sid).state is SandboxState.SUSPENDED
    assert anyio.run(backend.get_session, sid).state is SandboxState.SUSPENDED
    first = tick.read_text()
    time.sleep(0.4)
    assert tick.read_text() == first  # stopped: the counter did not move
    result = sh(backend, sid, 'cat "$TMPDIR/tick"')  # exec on a suspended session resumes it first
    assert anyio.run(backend.get_session, sid).state is SandboxState.RUNNING
    time.sleep(0.3)
    assert tick.read_text() != result.stdout


def test_idle_session_is_suspended_and_exec_resumes_it(backend: LandlockBackend) -> None:
    sid = provision(backend, limits={"idle_timeout": 0.5})
    busy = sh(backend, sid, "sleep 1.2; echo finished")  # longer than idle_timeout: never stopped mid-exec
    assert busy.stdout == "finished\n" and not busy.timed_out
    deadline = time.monotonic() + 10
    while anyio.run(backend.get_session, sid).state is not SandboxState.SUSPENDED:
        assert time.monotonic() < deadline, "the idle session was never suspended"
        time.sleep(0.1)
    assert sh(backend, sid, "echo back").stdout == "back\n"
    assert anyio.run(backend.get_session, sid).state is SandboxState.RUNNING


def test_session_survives_its_creator_and_is_found_by_id() -> None:
    state = _host_dir(0o700)
    creator = textwrap.dedent(f"""
        import anyio
        from stockade import SandboxSpec
        from stockade.backends.landlock import LandlockBackend
        async def main():
            s = await LandlockBackend({str(state)!r}).provision(SandboxSpec())
            print(s.id)
        anyio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", creator], capture_output=True, text=True, timeout=60, check=True)
    sid = out.stdout.strip()
    backend = LandlockBackend(state)
    try:
        assert sid in [s.id for s in anyio.run(backend.list_sessions)]
        assert sh(backend, sid, "echo alive").stdout == "alive\n"
    finally:
        anyio.run(backend.terminate, sid)
        shutil.rmtree(state, ignore_errors=True)


# --------------------------------------------------------------------------------- older Landlock ABIs


def test_older_abi_downgrade_still_confines(host_dir: Path) -> None:
    """ABI 2 lacks TRUNCATE: the backend adds a seccomp refusal of truncate(2) by path instead."""
    victim = host_dir / "victim"
    victim.write_text("original")
    victim.chmod(0o666)
    state = _host_dir(0o700)
    backend = LandlockBackend(state, abi=2)
    try:
        sid = provision(backend)
        record = backend.store.read(sid)
        assert record is not None and record["enforcement"]["abi"] == 2
        result = sh(backend, sid, f"echo ran; truncate -s 0 {victim}; echo x > {victim}; "
                                  f'echo ok > "$STOCKADE_OUTPUTS_DIR/x" && cat "$STOCKADE_OUTPUTS_DIR/x"')
        assert result.stdout == "ran\nok\n" and victim.read_text() == "original"
    finally:
        for session_id in backend.store.ids():
            anyio.run(backend.terminate, session_id)
        shutil.rmtree(state, ignore_errors=True)
