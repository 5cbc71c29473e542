"""The docker backend on a private dockerd: confinement judged by canaries, each refusal with an admitted sibling,
limits reported, snapshots, and nothing left behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from _docker_fixtures import BUSYBOX_IMAGE, PY_IMAGE, PrivateDockerd, check_sealed_read_only_directory, dockerd_or_skip
from stockade import (
    ExecError,
    ExecRequest,
    ExecResult,
    FilesystemMount,
    InvalidRequest,
    LifecycleError,
    SandboxSpec,
    SandboxState,
    SessionNotFound,
    Unsupported,
)
from stockade.backends.docker import DockerBackend
from stockade.backends.docker._host import helper_processes
from stockade.backends.docker._seccomp import profile_dict


@pytest.fixture
def daemon() -> PrivateDockerd:
    return dockerd_or_skip()


def _make(daemon: PrivateDockerd, tmp_path: Path, runtime: str = "runc") -> Iterator[DockerBackend]:
    if runtime == "runsc" and not daemon.runsc:
        pytest.skip("runsc (Debian package 'runsc') is not installed")
    backend = DockerBackend(daemon.url, runtime=runtime, image=daemon.image(PY_IMAGE),  # type: ignore[arg-type]
                            state_dir=tmp_path / "state")
    yield backend
    for session_id in backend.store.ids():  # a failed test must not leave containers behind
        anyio.run(backend.terminate, session_id)
    left = backend.engine.list_labelled(f"stockade.state={backend.store.root}")
    backend.engine.close()
    assert left == [], f"containers left behind: {[c['Names'] for c in left]}"


@pytest.fixture
def backend(daemon: PrivateDockerd, tmp_path: Path) -> Iterator[DockerBackend]:
    yield from _make(daemon, tmp_path)


@pytest.fixture
def gvisor(daemon: PrivateDockerd, tmp_path: Path) -> Iterator[DockerBackend]:
    yield from _make(daemon, tmp_path, "runsc")


def provision(backend: DockerBackend, **spec: object) -> str:
    return anyio.run(backend.provision, SandboxSpec.parse(spec)).id


def sh(backend: DockerBackend, session_id: str, script: str, **kw: object) -> ExecResult:
    request = ExecRequest.parse({"command": "sh", "args": ["-c", script], **kw})
    return anyio.run(backend.exec, session_id, request)


def py(backend: DockerBackend, session_id: str, code: str, **kw: object) -> ExecResult:
    request = ExecRequest.parse({"command": "python3", "args": ["-c", code], **kw})
    return anyio.run(backend.exec, session_id, request)


# ------------------------------------------------------------------------------------------ confinement


def test_container_runs_confined(backend: DockerBackend) -> None:
    sid = provision(backend)
    status = sh(backend, sid, "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")
    lines = dict(line.split(":\t") for line in status.stdout.splitlines()[1:])
    assert status.stdout.splitlines()[0] == "1000"
    assert lines == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1",
                     "Seccomp": "2"}
    # Read-only root refused; the scratch areas admitted.
    writes = sh(backend, sid, "touch /etc/x 2>/dev/null && echo ROOT; touch /tmp/x /mnt/session/outputs/x && echo OK")
    assert writes.stdout.split() == ["OK"]


def test_host_canaries_withheld(backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secrets.token_hex(12)
    canary_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        (canary_dir / "secret").write_text(secret)
        (canary_dir / "secret").chmod(0o644)
        canary_dir.chmod(0o755)
        monkeypatch.setenv("STOCKADE_DOCKER_CANARY", secret)
        sid = provision(backend)
        out = sh(backend, sid, f"echo alive; cat {canary_dir}/secret; env; tr '\\0' '\\n' < /proc/1/environ")
        assert "alive" in out.stdout
        assert secret not in out.stdout + out.stderr
        # Admitted sibling: the same directory, mounted, is readable.
        sid2 = provision(backend, mounts=[{"source": str(canary_dir), "target": "/mnt/in"}])
        assert sh(backend, sid2, "cat /mnt/in/secret").stdout == secret
        refused = sh(backend, sid2, "echo x > /mnt/in/secret || echo REFUSED")
        assert "REFUSED" in refused.stdout and (canary_dir / "secret").read_text() == secret
    finally:
        for entry in canary_dir.iterdir():
            entry.unlink()
        canary_dir.rmdir()


def test_supervisor_out_of_reach_command_in_reach(backend: DockerBackend) -> None:
    # The container's init (another uid) and the exec's own wrapper (execute-only, so the kernel makes it
    # non-dumpable) keep their /proc entries to themselves; the command itself stays an ordinary process.
    sid = provision(backend)
    probe = (
        "import os\n"
        "for name, pid in (('init', 1), ('wrapper', os.getppid()), ('self', os.getpid())):\n"
        "    for what in ('environ', 'mem', 'fd'):\n"
        "        try:\n"
        "            os.listdir(f'/proc/{pid}/fd') if what == 'fd' else open(f'/proc/{pid}/{what}', 'rb').close()\n"
        "            print(name, what, 'open')\n"
        "        except OSError as e:\n"
        "            print(name, what, e.strerror)\n"
    )
    out = py(backend, sid, probe).stdout.splitlines()
    assert out == [f"{name} {what} {'open' if name == 'self' else 'Permission denied'}"
                   for name in ("init", "wrapper", "self") for what in ("environ", "mem", "fd")]
    # The canary: a secret in the request's environment, which the wrapper holds too, is not readable there.
    secret = secrets.token_hex(12)
    cat = sh(backend, sid, "cat /proc/$PPID/environ /proc/1/environ 2>&1; echo; ps -o user,args",
             env={"STOCKADE_TEST_SECRET": secret})
    assert secret not in cat.stdout
    # The keep-alive runs as INIT_UID, not as the guest.
    assert ["1001", "sleep", "2147483647"] in [line.split() for line in cat.stdout.splitlines()], cat.stdout


def test_seccomp_profile_refuses_what_caps_allow(backend: DockerBackend) -> None:
    # Netlink sockets and io_uring need no capability, so only the seccomp filter refuses them.
    sid = provision(backend)
    code = (
        "import socket, errno\n"
        "for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_NETLINK):\n"
        "    try:\n"
        "        socket.socket(fam, socket.SOCK_DGRAM if fam == socket.AF_NETLINK else socket.SOCK_STREAM).close()\n"
        "        print(fam.name, 'ok')\n"
        "    except OSError as e:\n"
        "        print(fam.name, errno.errorcode[e.errno])\n"
    )
    out = py(backend, sid, code).stdout.split("\n")
    assert out[:3] == ["AF_UNIX ok", "AF_INET ok", "AF_NETLINK EAFNOSUPPORT"]


def test_seccomp_json_mirrors_the_rule_list() -> None:
    profile = profile_dict()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    names = {entry["names"][0] for entry in profile["syscalls"]}
    assert {"mount", "ptrace", "bpf", "keyctl", "io_uring_setup", "clone3", "unshare"} <= names
    assert "read" not in names and "write" not in names
    tiocsti = [e for e in profile["syscalls"] if e["names"] == ["ioctl"] and e["args"][0]["valueTwo"] == 0x5412]
    assert tiocsti and tiocsti[0]["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    clone3 = next(e for e in profile["syscalls"] if e["names"] == ["clone3"])
    assert clone3["errnoRet"] == 38  # ENOSYS, so libc falls back to the filtered clone


def test_network_deny_all_has_only_loopback_and_no_live_mounts(backend: DockerBackend) -> None:
    sid = provision(backend)  # deny-all, with only loopback inside
    out = sh(backend, sid, "ls /sys/class/net")
    assert out.stdout.split() == ["lo"]
    assert "gateway_pid" not in anyio.run(backend.get_session, sid).metadata  # no gateway for deny-all
    with pytest.raises(Unsupported):
        anyio.run(backend.attach_filesystem, sid, FilesystemMount(source="/var/tmp", target="/mnt/x"))


def test_egress_gateway_on_runc_refused_under_gvisor(backend: DockerBackend, gvisor: DockerBackend) -> None:
    """runc sessions get the egress gateway (the contract suite measures what it lets through); gVisor keeps
    its own network stack, so there limited and unrestricted are refused, never run as deny-all or open."""
    assert backend.capabilities().network_policy and backend.capabilities().egress_log
    sid = provision(backend, network_policy={"mode": "limited", "allowed_hosts": ["example.com"]})
    session = anyio.run(backend.get_session, sid)
    assert session.metadata["gateway"] == "running"
    env = sh(backend, sid, "echo $HTTPS_PROXY; cat /etc/resolv.conf").stdout
    assert "127.0.0.1:3128" in env and "nameserver 127.0.0.53" in env
    gateway_pid = int(session.metadata["gateway_pid"])
    anyio.run(backend.terminate, sid)
    assert not Path(f"/proc/{gateway_pid}").exists() or "stockade.gateway" not in Path(
        f"/proc/{gateway_pid}/cmdline").read_bytes().decode(errors="replace")
    caps = gvisor.capabilities()
    assert not (caps.network_policy or caps.network_unrestricted or caps.egress_log)
    with pytest.raises(Unsupported, match="gVisor"):
        provision(gvisor, network_policy={"mode": "limited", "allowed_hosts": ["example.com"]})
    with pytest.raises(Unsupported):
        provision(gvisor, network_policy={"mode": "unrestricted"})


# ------------------------------------------------------------------------------------------------- exec


def test_exec_basics(backend: DockerBackend) -> None:
    sid = provision(backend, env={"SPEC_VAR": "s"})
    out = sh(backend, sid, 'echo "$SPEC_VAR$REQ_VAR"; pwd; cat; echo err >&2; exit 5', env={"REQ_VAR": "r"},
             cwd="/mnt", stdin="from-stdin\n")
    assert (out.stdout, out.stderr, out.exit_code) == ("sr\n/mnt\nfrom-stdin\n", "err\n", 5)
    with pytest.raises(ExecError):
        sh(backend, sid, "true", cwd="/no/such/dir")
    missing = anyio.run(backend.exec, sid, ExecRequest(command="stockade-no-such-command"))
    assert missing.exit_code == 127


def test_output_bounded_and_truncation_reported(backend: DockerBackend) -> None:
    sid = provision(backend, limits={"output_limit_bytes": 1000})
    big = sh(backend, sid, "head -c 5000 /dev/zero | tr '\\0' a")
    assert big.truncated and len(big.stdout) == 1000
    small = sh(backend, sid, "head -c 999 /dev/zero | tr '\\0' a")
    assert not small.truncated and len(small.stdout) == 999


def test_timeout_kills_double_forked_daemon(backend: DockerBackend) -> None:
    needle = f"300.{secrets.randbelow(10**6):06d}"
    sid = provision(backend)
    scan = f"for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done | grep -c '[s]leep {needle}'"
    # Admitted sibling: without a timeout, a daemonised child outlives the exec (it was not killed).
    done = sh(backend, sid, f"(setsid sleep {needle} </dev/null >/dev/null 2>&1 &); echo started")
    assert done.stdout == "started\n" and not done.timed_out
    assert sh(backend, sid, scan).stdout.strip() == "1"
    kill = ("import os\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
            f"    if open(f'/proc/{{p}}/cmdline', 'rb').read() == b'sleep\\x00{needle}\\x00': os.kill(int(p), 9)")
    py(backend, sid, kill)
    assert sh(backend, sid, scan).stdout.strip() == "0"
    # Refused: on timeout the same daemon (double fork + setsid) dies with its exec.
    out = sh(backend, sid, f"(setsid sleep {needle} </dev/null >/dev/null 2>&1 &); sleep {needle}", timeout=1)
    assert out.timed_out
    assert sh(backend, sid, scan).stdout.strip() == "0"


def test_oom_reported(backend: DockerBackend) -> None:
    sid = provision(backend, limits={"memory_mb": 64})
    alloc = "import sys; b = bytearray(int(sys.argv[1]) << 20); print('allocated')"
    small = anyio.run(backend.exec, sid, ExecRequest(command="python3", args=("-c", alloc, "8")))
    assert small.stdout == "allocated\n" and not small.oom_killed
    big = anyio.run(backend.exec, sid, ExecRequest(command="python3", args=("-c", alloc, "256")))
    assert big.oom_killed and big.exit_code == 137 and "allocated" not in big.stdout


# ------------------------------------------------------------------------------------------- lifecycle


def test_snapshot_restores_files(backend: DockerBackend) -> None:
    sid = provision(backend, mounts=[{"source": "", "target": "/mnt/work", "access": "read_write"}])
    token = secrets.token_hex(8)
    sh(backend, sid, f"echo {token} > /tmp/t; echo {token} > /mnt/session/outputs/o; echo {token} > /mnt/work/w")
    snap = anyio.run(backend.snapshot, sid)
    assert snap.metadata["keeps"] == "files" and not backend.capabilities().memory_snapshot
    anyio.run(backend.terminate, sid)
    clone = provision(backend, from_snapshot=snap.snapshot_id,
                      mounts=[{"source": "", "target": "/mnt/work", "access": "read_write"}])
    out = sh(backend, clone, "cat /tmp/t /mnt/session/outputs/o /mnt/work/w; id -u -n; ls -ln /tmp/t")
    assert out.stdout.split()[:4] == [token, token, token, "sandbox"]
    assert " 1000 " in out.stdout  # restored files belong to the guest, not to root
    fresh = provision(backend)  # admitted sibling: a new session does not see them
    assert sh(backend, fresh, "cat /tmp/t 2>&1").stdout != f"{token}\n"


def test_suspend_resume_and_persistence(backend: DockerBackend, daemon: PrivateDockerd) -> None:
    sid = provision(backend)
    sh(backend, sid, "sleep 1000 </dev/null >/dev/null 2>&1 &")
    assert anyio.run(backend.suspend, sid).state == SandboxState.SUSPENDED
    # Another backend object (another process) finds the session by id through the state directory.
    other = DockerBackend(daemon.url, state_dir=backend.store.root)
    assert anyio.run(other.get_session, sid).state == SandboxState.SUSPENDED
    assert anyio.run(other.resume, sid).state == SandboxState.RUNNING
    assert "sleep 1000" in sh(other, sid, "ps -o args").stdout
    other.engine.close()


def test_terminate_and_gc(backend: DockerBackend) -> None:
    sid = provision(backend)
    container = backend._record(sid)["container"]
    anyio.run(backend.terminate, sid)
    with pytest.raises(SessionNotFound):
        anyio.run(backend.terminate, sid)
    assert backend.engine.list_labelled(f"stockade.session={sid}") == []
    # A crashed caller's container (record gone) is found by label and reaped.
    orphan = provision(backend)
    backend.store.remove_session(orphan)
    assert anyio.run(backend.list_sessions) == []
    assert backend.gc() == [orphan]
    assert backend.engine.list_labelled(f"stockade.session={orphan}") == []
    assert container not in json.dumps(backend.engine.list_labelled("stockade.session"))


def test_gc_finishes_a_terminate_that_died_half_way(backend: DockerBackend) -> None:
    sid, fresh = provision(backend), provision(backend)
    for claimed in (sid, fresh):
        assert backend.store.claim(claimed) is not None  # what terminate does first; then its caller "died"
    stale = backend.store.session_dir(sid) / "record.terminating"
    os.utime(stale, (time.time() - 120, time.time() - 120))
    assert backend.gc() == [sid]
    assert backend.engine.list_labelled(f"stockade.session={sid}") == []
    assert not backend.store.session_dir(sid).exists()
    # Admitted sibling: a terminate claimed just now is left to the caller doing it, container and all.
    assert len(backend.engine.list_labelled(f"stockade.session={fresh}")) == 1
    with pytest.raises(SessionNotFound):
        anyio.run(backend.terminate, fresh)
    record = backend.store.claim(fresh, again=True)
    assert record is not None
    backend._terminate_blocking(record)


def test_snapshot_restore_keeps_symlinks_and_refuses_escaping_members(backend: DockerBackend) -> None:
    sid = provision(backend)
    sh(backend, sid, "echo data > /mnt/session/outputs/f; ln -s /etc/passwd /mnt/session/outputs/abs; "
                     "ln -s ../../../../../../etc /mnt/session/outputs/up")
    snap = anyio.run(backend.snapshot, sid)
    anyio.run(backend.terminate, sid)
    # Admitted: symlinks come back as they were, pointing at guest paths, and were never followed on the host.
    clone = provision(backend, from_snapshot=snap.snapshot_id)
    out = sh(backend, clone, "cd /mnt/session/outputs; cat f; readlink abs; readlink up")
    assert out.stdout.split() == ["data", "/etc/passwd", "../../../../../../etc"]
    # Refused: an archive whose member would land outside the session directory is a LifecycleError.
    snap_dir = Path(snap.metadata["path"])
    victim = f"escape-{secrets.token_hex(6)}"
    with tarfile.open(snap_dir / "files.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo(f"../../{victim}")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    manifest = json.loads((snap_dir / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256((snap_dir / "files.tar.gz").read_bytes()).hexdigest()
    (snap_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LifecycleError, match="cannot be restored"):
        provision(backend, from_snapshot=snap.snapshot_id)
    assert not (backend.store.root / victim).exists() and not (backend.store.sessions / victim).exists()


def test_bad_input_is_typed(backend: DockerBackend) -> None:
    with pytest.raises(InvalidRequest, match="stockade image build"):
        provision(backend, image="stockade/not-built:1")
    with pytest.raises(InvalidRequest):
        provision(backend, mounts=[{"source": "/no/such/dir", "target": "/mnt/x"}])
    sid = provision(backend, session_id="docker-dup")
    with pytest.raises(InvalidRequest):
        provision(backend, session_id="docker-dup")
    assert anyio.run(backend.get_session, sid).state == SandboxState.RUNNING
    with pytest.raises(InvalidRequest):
        DockerBackend("unix:///nowhere", runtime="kata")  # type: ignore[arg-type]


def test_busybox_image_runs_without_python(daemon: PrivateDockerd, tmp_path: Path) -> None:
    backend = DockerBackend(daemon.url, image=daemon.image(BUSYBOX_IMAGE), state_dir=tmp_path)
    sid = provision(backend)
    try:
        assert sh(backend, sid, "busybox | head -1").stdout.startswith("BusyBox")
        assert "python3" not in sh(backend, sid, "ls /usr/bin /bin").stdout.split()
    finally:
        anyio.run(backend.terminate, sid)
        backend.engine.close()


# ---------------------------------------------------------------------------------------------- gVisor


def test_gvisor_snapshot_keeps_a_running_process(gvisor: DockerBackend) -> None:
    assert gvisor.capabilities().memory_snapshot
    sid = provision(gvisor, mounts=[{"source": "", "target": "/mnt/work", "access": "read_write"}])
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    sh(gvisor, sid, f"({counter}) </dev/null >/dev/null 2>&1 &")
    sh(gvisor, sid, "while [ ! -s /tmp/count ] || [ $(cat /tmp/count) -lt 3 ]; do sleep 0.1; done")
    # Read before the checkpoint: the source keeps counting after it, so a later read may be past the snapshot.
    before_snapshot = int(sh(gvisor, sid, "cat /tmp/count").stdout)
    snap = anyio.run(gvisor.snapshot, sid)
    assert snap.metadata["keeps"] == "processes"
    anyio.run(gvisor.terminate, sid)
    clone = provision(gvisor, from_snapshot=snap.snapshot_id,
                      mounts=[{"source": "", "target": "/mnt/work", "access": "read_write"}])
    first = int(sh(gvisor, clone, "cat /tmp/count").stdout)
    later = sh(gvisor, clone, f"while [ $(cat /tmp/count) -le {first} ]; do sleep 0.1; done; cat /tmp/count",
               timeout=30)
    assert not later.timed_out and int(later.stdout) > first
    # The counter is the snapshot's own process, continued: not restarted from 1.
    assert before_snapshot >= 3 and first >= before_snapshot


def test_gvisor_snapshots_one_session_twice(gvisor: DockerBackend) -> None:
    # Checkpointing a container that was itself restored (the session after its first snapshot, or a clone)
    # used to leave containerd's task behind: the restart failed with "id already in use".
    sid = provision(gvisor)
    # `phase` lives only in the shell's memory: it moves on when /tmp/bump appears, and a restarted process
    # would start again at phase 0 and i=0.
    looper = ('phase=0; i=0; while :; do i=$((i+1)); if [ -e /tmp/bump ]; then rm -f /tmp/bump; '
              'phase=$((phase+1)); fi; echo "$phase $i" > /tmp/state.new; mv /tmp/state.new /tmp/state; '
              'sleep 0.1; done')
    sh(gvisor, sid, f"({looper}) </dev/null >/dev/null 2>&1 &")

    def state(session: str, wait_phase: int, past: int = 0) -> tuple[int, int]:
        # Waits (bounded by the exec timeout, not asserted on time) until the loop shows the phase and a count
        # beyond `past`.
        out = sh(gvisor, session, f'while :; do set -- $(cat /tmp/state 2>/dev/null); [ "$1" = {wait_phase} ] && '
                                  f'[ "${{2:-0}}" -gt {past} ] && break; sleep 0.1; done; cat /tmp/state', timeout=30)
        assert not out.timed_out, out
        phase, count = out.stdout.split()
        return int(phase), int(count)

    before_first = state(sid, 0, 2)[1]
    first = anyio.run(gvisor.snapshot, sid)
    # The session runs on after the first snapshot, survives a suspend/resume, and is snapshotted again.
    assert anyio.run(gvisor.suspend, sid).state == SandboxState.SUSPENDED
    assert anyio.run(gvisor.resume, sid).state == SandboxState.RUNNING
    sh(gvisor, sid, "touch /tmp/bump")
    before_second = state(sid, 1)[1]
    second = anyio.run(gvisor.snapshot, sid)
    third = anyio.run(gvisor.snapshot, sid)  # and a third, back to back
    assert state(sid, 1, before_second)[1] > before_second  # the source still counts in phase 1
    container = gvisor._record(sid)["container"]
    assert list(gvisor._checkpoint_root(container).glob("*")) == []  # the engine kept no checkpoint copy
    anyio.run(gvisor.terminate, sid)

    containers = []
    for snap, phase, floor in ((first, 0, before_first), (second, 1, before_second), (third, 1, before_second)):
        clone = provision(gvisor, from_snapshot=snap.snapshot_id)
        containers.append(gvisor._record(clone)["container"])
        got_phase, count = state(clone, phase)
        assert (got_phase, count >= floor) == (phase, True)  # continued, not restarted
        assert state(clone, phase, count)[1] > count
        if snap is first:
            # A restored session can be snapshotted too, and that snapshot restores as well.
            again = anyio.run(gvisor.snapshot, clone)
            sh(gvisor, clone, "touch /tmp/bump")
            assert state(clone, 1)[0] == 1
            grandchild = provision(gvisor, from_snapshot=again.snapshot_id)
            containers.append(gvisor._record(grandchild)["container"])
            assert state(grandchild, 0, count)[0] == 0
            anyio.run(gvisor.terminate, grandchild)
        anyio.run(gvisor.terminate, clone)
    # Nothing of those containers is left on the host (a stuck task kept its containerd shim running).
    shims = [c for c in [container, *containers] if helper_processes("containerd-shim", "-id", c)]
    assert shims == []


def test_gvisor_refuses_snapshot_of_process_holding_exec_stdio(gvisor: DockerBackend) -> None:
    sid = provision(gvisor)
    sh(gvisor, sid, "sleep 1000 &")  # holds the exec's stdout pipe: a host descriptor gVisor cannot restore
    with pytest.raises(LifecycleError, match="stdin/stdout/stderr"):
        anyio.run(gvisor.snapshot, sid)
    assert sh(gvisor, sid, "echo still-running").stdout == "still-running\n"  # the session is unharmed
    kill = """for p in $(pidof sleep); do [ "$(tr '\\0' ' ' < /proc/$p/cmdline)" = 'sleep 1000 ' ] && kill $p; done"""
    sh(gvisor, sid, kill)
    assert anyio.run(gvisor.snapshot, sid).metadata["keeps"] == "processes"  # admitted once it is gone


def test_gvisor_limits(gvisor: DockerBackend) -> None:
    caps = gvisor.capabilities()
    assert caps.memory_limit and not caps.pids_limit
    with pytest.raises(Unsupported):
        provision(gvisor, limits={"pids_max": 64})
    sid = provision(gvisor, limits={"memory_mb": 256})
    assert py(gvisor, sid, "b = bytearray(16 << 20); print('ok')").stdout == "ok\n"


def test_no_container_left(daemon: PrivateDockerd) -> None:
    assert daemon.containers() == []  # every test (here and in the conformance modules) removed its own


def test_cli_image_build(daemon: PrivateDockerd, capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.cli import main

    tag = f"stockade/test:cli-{secrets.token_hex(3)}"
    assert main(["image", "build", "--host", daemon.url, "--tag", tag, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["image"] == tag
    assert "busybox with" in captured.err  # progress is shown
    engine = daemon.engine()
    try:
        assert engine.image_exists(tag)
        engine.call("remove image", engine.api.remove_image, tag)
    finally:
        engine.close()
    # A base it does not know is a usage error (exit 125), not a build.
    assert main(["image", "build", "--host", daemon.url, "--base", "alpine"]) == 125


# ------------------------------------------------------------------------ the seccomp loader (gVisor execs)


def test_seccomp_loader_filters_the_command_and_fails_closed(tmp_path: Path) -> None:
    """On the host: with its filter the command runs with Seccomp 2 and unshare refused; without a usable filter
    (missing, truncated) the command never runs (a canary file is not created); a missing command is 127."""
    import subprocess

    from stockade.backends.docker._seccomp_exec import loader_and_filter, start_error

    loader, bpf = loader_and_filter(tmp_path)
    assert (loader.stat().st_mode & 0o777, bpf.stat().st_mode & 0o777) == (0o555, 0o444)
    assert loader_and_filter(tmp_path) == (loader, bpf)  # built once per source version
    script = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; unshare -U true 2>/dev/null || echo refused"
    ok = subprocess.run([loader, bpf, "--", "sh", "-c", script], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.split() == ["NoNewPrivs:", "1", "Seccomp:", "2", "refused"], ok
    bad = tmp_path / "bad.bpf"
    bad.write_bytes(bpf.read_bytes()[:-3])
    canary = tmp_path / "ran"
    for filt in (tmp_path / "missing.bpf", bad):
        out = subprocess.run([loader, filt, "--", "touch", canary], capture_output=True, check=False)
        assert out.returncode == 125 and not canary.exists(), out
        assert (start_error("touch", out.returncode, out.stdout, out.stderr) or "").startswith(
            "the sandbox's seccomp filter could not be loaded")
    missing = subprocess.run([loader, bpf, "--", "no-such-command-x"], capture_output=True, check=False)
    assert missing.returncode == 127
    assert start_error("no-such-command-x", 127, missing.stdout, missing.stderr) == (
        "command not found: 'no-such-command-x'")
    # A command that merely exits 127 with output of its own is not mistaken for a start failure.
    assert start_error("sh", 127, b"", b"sh: x: not found") is None


def test_gvisor_execs_are_filtered_and_devices_covered(gvisor: DockerBackend) -> None:
    sid = provision(gvisor)
    out = sh(gvisor, sid, "grep -E '^Seccomp:' /proc/self/status; unshare -U true 2>/dev/null || echo refused; "
                          "mknod /tmp/null c 1 3 2>/dev/null || echo no-dev; mkfifo /tmp/fifo && echo fifo; "
                          "test -c /dev/fuse || echo fuse-covered; test -c /dev/net/tun || echo tun-covered")
    assert out.stdout.split() == ["Seccomp:", "2", "refused", "no-dev", "fifo", "fuse-covered", "tun-covered"], out
    with pytest.raises(ExecError, match="command not found"):
        anyio.run(gvisor.exec, sid, ExecRequest.parse({"command": "no-such-command-x"}))
    caps = gvisor.capabilities()
    assert (caps.private_supervisor, caps.oom_keeps_session) == (False, False)
    session = anyio.run(gvisor.get_session, sid)
    sandbox = Path(f"/proc/{session.metadata['sandbox_pid']}/cmdline").read_bytes()
    assert sandbox.startswith(b"runsc-sandbox"), sandbox[:80]


def test_read_only_directory_is_sealed_socket_refuses_files_read(backend: DockerBackend, tmp_path: Path) -> None:
    check_sealed_read_only_directory(backend, tmp_path)


def test_engine_client_has_one_pool_for_its_socket(tmp_path: Path) -> None:
    """docker-py keys unix-socket pools by URL and closes evicted ones under a reader (concurrent execs failed
    with an AttributeError from urllib3): the engine's client keeps one pool, whatever the URL."""
    from stockade.backends.docker._engine import Engine

    engine = Engine(f"unix://{tmp_path}/docker.sock")  # nothing is connected to build the client
    try:
        adapter = engine.api.get_adapter("http+docker://localhost/v1.41/info")
        first = adapter.get_connection("http+docker://localhost/v1.41/exec/0/json")
        pools = {id(adapter.get_connection(f"http+docker://localhost/v1.41/exec/{i}/json")) for i in range(100)}
        assert pools == {id(first)} and first.pool is not None  # never evicted, never closed
    finally:
        engine.close()
