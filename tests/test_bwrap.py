"""The bwrap backend: what its issue's "done when" lists, each judged by canaries, with admitted siblings."""

from __future__ import annotations

import json
import os
import secrets
import shutil
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
    OUTPUTS_MOUNT,
    ExecError,
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    InvalidRequest,
    NetworkPolicy,
    ResourceLimits,
    SandboxSpec,
    SandboxState,
    SessionNotFound,
    Unsupported,
)
from stockade.backends.bwrap import BwrapBackend, probe
from stockade.backends.bwrap._network import find_tool

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"bwrap backend unavailable: {REASON}")
ROOT = os.geteuid() == 0


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BwrapBackend]:
    b = BwrapBackend(tmp_path / "state")
    yield b
    for session_id in b.store.ids():  # a failed test must not leave sandboxes behind
        anyio.run(b.terminate, session_id)


def run(backend: BwrapBackend, session_id: str, *argv: str, **kw: object) -> ExecResult:
    return anyio.run(backend.exec, session_id, ExecRequest.parse({"command": argv[0], "args": list(argv[1:]), **kw}))


def sh(backend: BwrapBackend, session_id: str, script: str, **kw: object) -> ExecResult:
    return run(backend, session_id, "sh", "-c", script, **kw)


def provision(backend: BwrapBackend, **spec: object) -> str:
    return anyio.run(backend.provision, SandboxSpec.parse(spec)).id


def test_provision_exec_terminate_round_trip(backend: BwrapBackend) -> None:
    sid = provision(backend)
    session = anyio.run(backend.get_session, sid)
    assert session.state is SandboxState.RUNNING and session.backend == "bwrap"
    result = sh(backend, sid, "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    anyio.run(backend.terminate, sid)
    with pytest.raises(SessionNotFound):
        anyio.run(backend.terminate, sid)
    with pytest.raises(SessionNotFound):
        sh(backend, sid, "true")


def test_exec_stdin_cwd_env(backend: BwrapBackend) -> None:
    sid = provision(backend, env={"SPEC_VAR": "from-spec"})
    result = sh(backend, sid, 'cat; pwd; echo "$SPEC_VAR $REQ_VAR"', stdin="piped\n", cwd="/mnt/session/outputs",
                env={"REQ_VAR": "from-request"})
    assert result.stdout == "piped\n/mnt/session/outputs\nfrom-spec from-request\n"


def test_command_not_found_and_bad_cwd_are_exec_errors(backend: BwrapBackend) -> None:
    sid = provision(backend)
    with pytest.raises(ExecError, match="command not found"):
        run(backend, sid, "no-such-command-xyz")
    with pytest.raises(ExecError, match="directory"):
        run(backend, sid, "true", cwd="/no/such/dir")
    assert run(backend, sid, "true").exit_code == 0  # the session survives both


def test_host_file_canary_unreadable_and_mounted_copy_readable(backend: BwrapBackend, tmp_path: Path) -> None:
    canary_dir = Path("/var/tmp") / f"stockade-canary-{secrets.token_hex(6)}"
    canary_dir.mkdir()
    try:
        secret = secrets.token_hex(16)
        (canary_dir / "secret").write_text(secret)
        sid = provision(backend, mounts=[{"source": str(canary_dir), "target": "/mnt/canary", "access": "read_only"}])
        outside = sh(backend, sid, f"cat {canary_dir}/secret /proc/1/root{canary_dir}/secret /root/* 2>&1; ls /home")
        assert secret not in outside.stdout
        inside = sh(backend, sid, "cat /mnt/canary/secret")
        assert inside.stdout == secret
    finally:
        shutil.rmtree(canary_dir)


def test_ro_mount_not_writable_nor_remountable_rw_mount_writable(backend: BwrapBackend, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "keep").write_text("original")
    sid = provision(backend, mounts=[
        {"source": str(ro), "target": "/mnt/ro", "access": "read_only"},
        {"source": str(rw), "target": "/mnt/rw", "access": "read_write"},
    ])
    attack = sh(backend, sid, textwrap.dedent("""
        echo x > /mnt/ro/keep; echo x > /mnt/ro/new; rm -f /mnt/ro/keep; mv /mnt/ro/keep /mnt/ro/moved
        chmod 777 /mnt/ro/keep; mount -o remount,rw /mnt/ro; mount -o remount,rw /
        echo x > /mnt/ro/keep 2>/dev/null && echo WROTE
        echo y > /outside-root 2>/dev/null && echo ROOTWRITE
        true
    """))
    assert "WROTE" not in attack.stdout and "ROOTWRITE" not in attack.stdout
    assert (ro / "keep").read_text() == "original"
    assert sorted(p.name for p in ro.iterdir()) == ["keep"]
    assert oct((ro / "keep").stat().st_mode & 0o777) != oct(0o777)
    wrote = sh(backend, sid, "echo admitted > /mnt/rw/new")
    assert wrote.exit_code == 0 and (rw / "new").read_text() == "admitted\n"


def test_no_capabilities_seccomp_and_no_new_privs_in_every_exec(backend: BwrapBackend) -> None:
    sid = provision(backend)
    for _ in range(2):
        status = sh(backend, sid, "grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|Seccomp|NoNewPrivs):' /proc/self/status")
        fields = dict(line.split(":\t") for line in status.stdout.splitlines())
        assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0000000000000000"
        assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1"
    # The filter is real: unshare(2) of a user namespace is refused, while an ordinary syscall works.
    probe_script = (
        "import ctypes,os; l=ctypes.CDLL(None,use_errno=True); "
        "r=l.unshare(0x10000000); print(r, ctypes.get_errno()); print(os.getpid() > 0)"
    )
    result = run(backend, sid, "python3", "-c", probe_script)
    assert result.stdout.split() == ["-1", "1", "True"]


def test_host_processes_invisible(backend: BwrapBackend) -> None:
    marker = f"stockade-host-canary-{secrets.token_hex(6)}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        sid = provision(backend)
        listing = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'"
        result = sh(backend, sid, listing)
        assert marker not in result.stdout
        assert int(result.stdout.split()[-1]) < 10  # only the sandbox's own few processes
        sh(backend, sid, f"kill -9 {host.pid} 2>&1; kill -9 -1 2>&1; echo done")
        assert host.poll() is None  # the host process survived
        assert sh(backend, sid, "echo still-here").stdout == "still-here\n"  # and so did the session's agent
    finally:
        host.kill()
        host.wait()


def test_network_deny_all_has_only_loopback(backend: BwrapBackend) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        sid = provision(backend)
        script = (
            "import socket\n"
            "s=socket.socket(); s.settimeout(2)\n"
            f"print('host', s.connect_ex(('127.0.0.1', {port})))\n"
            "l=socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\n"
            "c=socket.create_connection(l.getsockname(), timeout=2); print('guest-lo ok')\n"
        )
        result = run(backend, sid, "python3", "-c", script)
        assert "guest-lo ok" in result.stdout  # admitted: the guest's own loopback works
        assert "host 0" not in result.stdout
        with pytest.raises(TimeoutError):
            listener.accept()  # refused: nothing reached the host listener
    finally:
        listener.close()


def test_unsupported_network_modes_are_refused_not_downgraded(
    backend: BwrapBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a host without nft: the gateway cannot be set up, so egress policies are refused.
    monkeypatch.setattr(BwrapBackend, "_egress_available", staticmethod(lambda: False))
    assert not backend.capabilities().network_policy
    with pytest.raises(Unsupported):
        provision(backend, network_policy={"mode": "unrestricted"})
    with pytest.raises(Unsupported):
        provision(backend, network_policy={"mode": "limited", "allowed_hosts": ["example.test"]})
    assert backend.store.ids() == []  # nothing half-built


def test_timeout_kills_the_whole_tree(backend: BwrapBackend) -> None:
    sid = provision(backend)
    marker = str(secrets.randbelow(10**6) + 10**6)  # digits only: it is part of sleep's argument
    started = time.monotonic()
    result = sh(backend, sid, f"sleep 3{marker}0 & (setsid sleep 3{marker}1 &) ; sleep 3{marker}2", timeout=1)
    assert result.timed_out and time.monotonic() - started < 10
    left = sh(backend, sid, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert marker not in left.stdout
    fast = sh(backend, sid, "echo quick", timeout=10)
    assert not fast.timed_out and fast.stdout == "quick\n"


def test_background_process_persists_between_execs(backend: BwrapBackend) -> None:
    sid = provision(backend)
    sh(backend, sid, "(sleep 30 &) ; echo started > /tmp/flag")
    result = sh(backend, sid, "cat /tmp/flag; pgrep -c sleep || ls /proc")
    assert result.stdout.startswith("started\n")
    assert "1" in result.stdout.splitlines()[1]


def test_output_is_bounded_and_truncation_reported(tmp_path: Path) -> None:
    backend = BwrapBackend(tmp_path / "state", output_limit_bytes=1000)
    sid = provision(backend)
    try:
        result = sh(backend, sid, "head -c 5000000 /dev/zero | tr '\\0' a; echo tail >&2")
        assert len(result.stdout) == 1000 and result.truncated and result.stderr == "tail\n"
        small = sh(backend, sid, "echo small")
        assert small.stdout == "small\n" and not small.truncated
    finally:
        anyio.run(backend.terminate, sid)


@pytest.mark.skipif(not ROOT, reason="cgroup limits need root on this host (no delegated cgroup v2 subtree)")
def test_memory_limit_hit_and_reported(backend: BwrapBackend) -> None:
    sid = provision(backend, limits={"memory_mb": 64})
    big = run(backend, sid, "python3", "-c", "b = bytearray(256 << 20); print(len(b))")
    assert big.oom_killed and big.exit_code == 137
    small = run(backend, sid, "python3", "-c", "b = bytearray(8 << 20); print('ok')")
    assert small.stdout == "ok\n" and not small.oom_killed


@pytest.mark.skipif(not ROOT, reason="cgroup limits need root on this host (no delegated cgroup v2 subtree)")
def test_pids_limit_stops_fork_bomb(backend: BwrapBackend) -> None:
    sid = provision(backend, limits={"pids_max": 32})
    forks = (
        "import os, sys, time\n"
        "n = 0\n"
        "for _ in range(int(sys.argv[1])):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(n)\n"
    )
    bomb = run(backend, sid, "python3", "-c", forks, "100", timeout=20)
    assert bomb.stdout.strip() and int(bomb.stdout) < 32
    sid2 = provision(backend, limits={"pids_max": 64})
    ok = run(backend, sid2, "python3", "-c", forks, "10", timeout=20)
    assert ok.stdout.strip() == "10"


def _mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if text in line]


def test_terminate_leaves_nothing(backend: BwrapBackend) -> None:
    sid = provision(backend, limits={"pids_max": 64} if ROOT else {})
    record = backend.store.read(sid)
    assert record is not None
    sh(backend, sid, "(setsid sleep 300 &); sleep 300 &")
    init_pid, bwrap_pid = record["init_pid"], record["bwrap_pid"]
    netns = os.readlink(f"/proc/{init_pid}/ns/net")
    cgroup_paths = [Path(p) for p in (record.get("cgroup") or {}).get("paths", [])]
    anyio.run(backend.terminate, sid)
    for pid in (init_pid, bwrap_pid):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    leftovers = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                if os.readlink(proc_dir / "ns/net") == netns:
                    leftovers.append(proc_dir.name)
            except OSError:
                pass
    assert leftovers == []
    assert not backend.store.session_dir(sid).exists()
    assert _mounts_mentioning(str(backend.store.session_dir(sid))) == []
    for path in cgroup_paths:
        assert not path.exists()


def test_session_survives_its_creator_and_is_found_by_id(tmp_path: Path) -> None:
    state = tmp_path / "state"
    creator = textwrap.dedent(f"""
        import anyio, json
        from stockade import SandboxSpec
        from stockade.backends.bwrap import BwrapBackend
        async def main():
            b = BwrapBackend({str(state)!r})
            s = await b.provision(SandboxSpec())
            print(s.id)
        anyio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", creator], capture_output=True, text=True, timeout=60, check=True)
    sid = out.stdout.strip()
    backend = BwrapBackend(state)  # a different process's view
    try:
        assert sid in [s.id for s in anyio.run(backend.list_sessions)]
        assert sh(backend, sid, "echo alive").stdout == "alive\n"
    finally:
        anyio.run(backend.terminate, sid)


def test_dead_sandbox_is_reported_and_still_terminated(backend: BwrapBackend) -> None:
    sid = provision(backend)
    record = backend.store.read(sid)
    assert record is not None
    os.kill(record["init_pid"], 9)
    time.sleep(0.3)
    session = anyio.run(backend.get_session, sid)
    assert session.metadata.get("health") == "dead"
    with pytest.raises(Exception) as err:
        sh(backend, sid, "true")
    assert "not running" in str(err.value) or "lost" in str(err.value)
    anyio.run(backend.terminate, sid)
    assert not backend.store.session_dir(sid).exists()


def test_invalid_mount_sources_refused_without_leftovers(backend: BwrapBackend, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/etc")
    with pytest.raises(InvalidRequest, match="symlink"):
        provision(backend, mounts=[{"source": str(link), "target": "/mnt/x"}])
    with pytest.raises(InvalidRequest, match="does not exist"):
        provision(backend, mounts=[{"source": str(tmp_path / "nope"), "target": "/mnt/x"}])
    taken = provision(backend, session_id="fixed-id")
    with pytest.raises(InvalidRequest, match="already exists"):
        provision(backend, session_id="fixed-id")
    assert backend.store.ids() == [taken]


@pytest.mark.skipif(not ROOT, reason="snapshots need the cgroup freezer, which needs root on this host")
def test_snapshot_then_fork_restores_files(backend: BwrapBackend) -> None:
    sid = provision(backend, mounts=[{"source": "", "target": "/mnt/scratch", "access": "read_write"}])
    sh(backend, sid, "echo out > /mnt/session/outputs/a; echo tmp > /tmp/b; echo scratch > /mnt/scratch/c")
    snap = anyio.run(backend.snapshot, sid)
    manifest = json.loads((Path(snap.metadata["path"]) / "manifest.json").read_text())
    assert manifest["sha256"] == snap.metadata["sha256"]
    anyio.run(backend.terminate, sid)
    fork = provision(backend, from_snapshot=snap.snapshot_id,
                     mounts=[{"source": "", "target": "/mnt/scratch", "access": "read_write"}])
    restored = sh(backend, fork, "cat /mnt/session/outputs/a /tmp/b /mnt/scratch/c")
    assert restored.stdout == "out\ntmp\nscratch\n"
    fresh = provision(backend)
    assert sh(backend, fresh, "ls /mnt/session/outputs /tmp").stdout.split() == ["/mnt/session/outputs:", "/tmp:"]


@pytest.mark.skipif(not ROOT, reason="suspend needs the cgroup freezer, which needs root on this host")
def test_suspend_freezes_and_exec_resumes(backend: BwrapBackend) -> None:
    sid = provision(backend)
    sh(backend, sid, "(while true; do date +%s%N > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.05; done) "
                     ">/dev/null 2>&1 &")
    record = backend.store.read(sid)
    assert record is not None
    tick = Path(f"/proc/{record['init_pid']}/root/tmp/tick")
    deadline = time.monotonic() + 10
    while not tick.exists():
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.05)
    suspended = anyio.run(backend.suspend, sid)
    assert suspended.state is SandboxState.SUSPENDED
    first = tick.read_text()
    time.sleep(0.4)
    assert tick.read_text() == first  # frozen: the counter did not move
    result = sh(backend, sid, "cat /tmp/tick")  # exec on a suspended session resumes it first
    assert anyio.run(backend.get_session, sid).state is SandboxState.RUNNING
    time.sleep(0.3)
    assert tick.read_text() != result.stdout


def test_capabilities_match_behaviour(backend: BwrapBackend) -> None:
    caps = backend.capabilities()
    assert caps.local_process_sandbox and caps.filesystem_isolation and caps.network_deny_all
    # Egress through the gateway exactly when the host has nft and ip: test_bwrap_network measures it.
    egress = find_tool("nft") is not None and find_tool("ip") is not None
    assert caps.network_policy == egress and caps.network_unrestricted == egress and caps.egress_log == egress
    if not caps.memory_limit:
        with pytest.raises(Unsupported):
            provision(backend, limits={"memory_mb": 64})


def test_unprivileged_user_can_run_sessions(request: pytest.FixtureRequest) -> None:
    if not ROOT:
        pytest.skip("this test switches to an unprivileged user and needs root to do so")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system /usr/bin/python3 for the unprivileged user")
    # pytest's tmp_path sits in a 0700 directory of root's: use a directory the user can reach.
    tmp_path = Path(tempfile.mkdtemp(prefix="stockade-unpriv-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    # The test interpreter's packages may sit under /root (not traversable by others): give the
    # unprivileged user its own copy of stockade and its dependencies.
    site = tmp_path / "site"
    import importlib

    for name in ("stockade", "pydantic", "pydantic_core", "anyio", "sniffio", "idna", "typing_extensions",
                 "annotated_types", "typing_inspection", "pyseccomp"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        origin = Path(module.__file__ or "")
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, site / origin.parent.name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            site.mkdir(exist_ok=True)
            shutil.copy(origin, site / origin.name)
    for path in [tmp_path, home, site, *site.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    script = textwrap.dedent(f"""
        import anyio
        from stockade import SandboxSpec, ExecRequest
        from stockade.backends.bwrap import BwrapBackend
        async def main():
            b = BwrapBackend({str(home / 'state')!r})
            s = await b.provision(SandboxSpec())
            r = await b.exec(s.id, ExecRequest(command="sh", args=("-c", "id -u; grep Cap[EB] /proc/self/status")))
            print(r.stdout, end="")
            await b.terminate(s.id)
            print("left", len(b.store.ids()))
        anyio.run(main)
    """)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(home),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1000"
    assert all(line.endswith("0000000000000000") for line in lines[1:3])
    assert lines[-1] == "left 0"


def test_spec_fields_the_backend_cannot_enforce_are_refused(backend: BwrapBackend) -> None:
    with pytest.raises(Unsupported):
        provision(backend, image="debian:12")
    spec = SandboxSpec(network_policy=NetworkPolicy.deny_all(), limits=ResourceLimits())
    assert [g.field for g in backend.check(spec)] == []
    mount = FilesystemMount(source="", target="/mnt/x", access=FilesystemAccess.READ_WRITE)
    sid = provision(backend)
    if not backend.capabilities().live_mounts:
        with pytest.raises(Unsupported):
            anyio.run(backend.attach_filesystem, sid, mount)


@pytest.mark.skipif(not ROOT, reason="idle suspension needs the cgroup freezer, which needs root on this host")
def test_idle_session_is_suspended_and_exec_resumes_it(backend: BwrapBackend) -> None:
    sid = provision(backend, limits={"idle_timeout": 0.5})
    busy = sh(backend, sid, "sleep 1.5; echo finished")  # longer than idle_timeout: must not be frozen mid-way
    assert busy.stdout == "finished\n" and not busy.timed_out
    deadline = time.monotonic() + 10
    while anyio.run(backend.get_session, sid).state is not SandboxState.SUSPENDED:
        assert time.monotonic() < deadline, "the idle session was never suspended"
        time.sleep(0.1)
    assert sh(backend, sid, "echo back").stdout == "back\n"
    assert anyio.run(backend.get_session, sid).state is SandboxState.RUNNING


def test_many_short_execs_keep_the_agent_alive(backend: BwrapBackend) -> None:
    """Regression: one select() batch could carry events for pipes an earlier handler of the batch had closed,
    and the agent died reading them (EBADF). Short execs that fail to start make that batch likely."""
    sid = provision(backend)

    async def hammer() -> int:
        failures = 0
        for _ in range(150):
            try:
                await backend.exec(sid, ExecRequest(command="no-such-command-stockade"))
            except ExecError:
                failures += 1
        return failures

    assert anyio.run(hammer) == 150
    assert sh(backend, sid, "echo alive").stdout == "alive\n"


def test_guest_cannot_create_setid_files_on_the_host(backend: BwrapBackend) -> None:
    """A set-user/group-ID file written through a mount would wait on the host for someone to run it (owned by
    the host uid the guest maps to): chmod/open with those bits are refused, plain modes are not."""
    sid = provision(backend)
    script = (
        "cd /mnt/session/outputs && cp /bin/true plain && cp /bin/true suid && "
        "chmod 0755 plain && echo plain-ok; chmod u+s suid; chmod g+s suid; "
        "python3 -c \"import os; os.open('made', os.O_CREAT | os.O_WRONLY, 0o6755)\" 2>/dev/null || echo refused"
    )
    result = sh(backend, sid, script)
    outputs = next(m.host_path for m in anyio.run(backend.get_session, sid).mounts if m.target == OUTPUTS_MOUNT)
    assert outputs is not None
    assert "plain-ok" in result.stdout and "refused" in result.stdout
    host = Path(outputs)
    assert (host / "plain").stat().st_mode & 0o7777 == 0o755  # the admitted sibling
    assert (host / "suid").stat().st_mode & 0o6000 == 0
    assert not (host / "made").exists()


def test_claim_counts_the_terminate_from_the_claim_not_from_provision(tmp_path: Path) -> None:
    """gc finishes terminates that died more than a minute ago; one claimed just now, of a session provisioned
    an hour ago, is still running and must be left alone (a rename keeps the old mtime)."""
    from stockade.backends.bwrap._store import SessionStore

    store = SessionStore(tmp_path / "state")
    for sid in ("old", "fresh"):
        store.create_session_dir(sid)
        store.write(sid, {"id": sid})
        hour_ago = time.time() - 3600
        os.utime(store.session_dir(sid) / "state.json", (hour_ago, hour_ago))
    assert store.claim("fresh") == {"id": "fresh"}
    assert store.claim("fresh") is None  # the loser of a race gets nothing
    assert store.terminating_ids(older_than=60.0) == []
    assert store.terminating_ids() == ["fresh"]
    claimed = store.session_dir("fresh") / "state.terminating"
    os.utime(claimed, (time.time() - 120, time.time() - 120))  # a claim that died two minutes ago
    assert store.terminating_ids(older_than=60.0) == ["fresh"]
