"""A private Docker engine for the tests: started once per test process, stopped by PID at exit.

It never touches another dockerd: its own socket, data-root, exec-root and pidfile live in a fresh directory
under /tmp, with ``--iptables=false --ip-masq=false --bridge=none`` (containers get loopback only) and gVisor
registered as the ``runsc`` runtime when Debian's runsc is installed. At exit every container is removed, the
daemon is stopped by its PID (its containerd goes with it), leftover mounts under the directory are detached and
the directory is removed. Images are built once per process and cached here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from stockade import ExecRequest, SandboxSpec
from stockade.backends.docker import DockerBackend
from stockade.backends.docker._engine import Engine
from stockade.backends.docker._image import build_image

__all__ = ["PY_IMAGE", "PrivateDockerd", "check_sealed_read_only_directory", "dockerd_or_skip", "podman_or_skip"]

PY_IMAGE = "stockade/test:python"
BUSYBOX_IMAGE = "stockade/test:busybox"


@dataclass
class PrivateDockerd:
    root: Path
    proc: subprocess.Popen[bytes]
    runsc: bool
    images: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def engine(self) -> Engine:
        return Engine(self.url)

    def image(self, tag: str) -> str:
        """Build ``tag`` (PY_IMAGE or BUSYBOX_IMAGE) once per process."""
        if tag not in self.images:
            engine = self.engine()
            try:
                self.images[tag] = build_image(engine, tag, "busybox", python=tag == PY_IMAGE)
            finally:
                engine.close()
        return tag

    def containers(self) -> list[str]:
        engine = self.engine()
        try:
            return [c["Id"] for c in engine.call("list", engine.api.containers, all=True)]
        finally:
            engine.close()

    def stop(self) -> None:
        conmons = _conmons_under(self.root)
        with contextlib.suppress(Exception):
            engine = self.engine()
            for cid in self.containers():
                engine.remove(cid)
            engine.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _kill_pidfile(self.root / "exec" / "containerd" / "containerd.pid")
        for pid in conmons + _conmons_under(self.root):  # podman: exec monitors that outlive their container
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_pidfile(path: Path) -> None:
    # dockerd stops the containerd it started; this only catches one left behind by a killed dockerd.
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"containerd" in cmdline:
            os.kill(pid, signal.SIGKILL)


def _conmons_under(root: Path) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"conmon") and any(a.startswith(str(root).encode() + b"/") for a in argv):
                found.append(int(entry))
    return found


def _unmount_under(root: Path) -> None:
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4] for line in lines]
        for point in sorted((p for p in points if p.startswith(str(root) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


_DAEMON: PrivateDockerd | None = None
_FAILURE: str | None = None


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    for tool in ("dockerd", "containerd", "runc", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io busybox-static)"
    return None


def _start() -> PrivateDockerd:
    root = Path(tempfile.mkdtemp(prefix="sdk-", dir="/tmp"))  # short: socket paths must fit in sun_path
    runsc = shutil.which("runsc") is not None
    # The trust key would otherwise be written to /etc/docker/key.json on the host.
    config: dict[str, object] = {"experimental": True, "deprecated-key-path": str(root / "key.json")}
    if runsc:
        config["runtimes"] = {
            "runsc": {"path": shutil.which("runsc"), "runtimeArgs": ["--network=none", "--oci-seccomp"]}
        }
    (root / "daemon.json").write_text(json.dumps(config))
    # containerd stages each runsc checkpoint in a ctrd-checkpoint* directory under its TMPDIR and leaves it
    # there (and dumps its stacks there): a directory of the daemon's own, so they go with it at stop. runsc's
    # sandbox must reach it, so it and the path to it are world-traversable.
    root.chmod(0o711)
    tmp = root / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - handed to the daemon
    proc = subprocess.Popen(
        [
            "dockerd", "--host", f"unix://{root}/docker.sock", "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"),
            "--config-file", str(root / "daemon.json"), "--iptables=false", "--ip-masq=false",
            "--bridge=none",
        ],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=root,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    log.close()
    daemon = PrivateDockerd(root, proc, runsc)
    deadline = time.monotonic() + 30
    while True:
        engine = daemon.engine()
        try:
            engine.ping()
            return daemon
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "dockerd.log").read_text(errors="replace")[-1500:]
                daemon.stop()
                raise RuntimeError(f"private dockerd did not start: {text}") from None
            time.sleep(0.1)
        finally:
            engine.close()


def dockerd_or_skip() -> PrivateDockerd:
    """The process-wide private daemon (started on first use); skips the test when it cannot run here."""
    global _DAEMON, _FAILURE
    if _DAEMON is None and _FAILURE is None:
        _FAILURE = _missing()
        if _FAILURE is None:
            _DAEMON = _start()
            atexit.register(_DAEMON.stop)
    if _DAEMON is None:
        pytest.skip(f"private dockerd unavailable: {_FAILURE}")
    return _DAEMON


# ------------------------------------------------------------------------------------------------- podman

# What makes Podman 4.3 work as root here (machine notes): root lacks CAP_SYS_RESOURCE, so the default nofile
# limit fails; crun fails on hybrid cgroups; there is no systemd for cgroups or the journal. exit_command_delay
# stays at its default (300 s): at 0 an exec is forgotten before its exit code can be read (docs/docker.md).
_CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

_PODMAN: PrivateDockerd | None = None
_PODMAN_FAILURE: str | None = None


def _start_podman() -> PrivateDockerd:
    root = Path(tempfile.mkdtemp(prefix="spm-", dir="/tmp"))
    (root / "containers.conf").write_text(_CONTAINERS_CONF)
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
    )
    # Podman spools an image load through a temporary file in $TMPDIR (default /var/tmp) and leaves it there:
    # keep it under the service's own directory, which goes at exit.
    (root / "tmp").mkdir()
    env = {**os.environ, "CONTAINERS_CONF": str(root / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"), "TMPDIR": str(root / "tmp")}
    log = open(root / "podman.log", "wb")  # noqa: SIM115 - handed to the service
    proc = subprocess.Popen(
        ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--tmpdir", str(root / "tmp"),
         "system", "service", "--time=0", f"unix://{root}/docker.sock"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env,
        # conmon writes an empty "oom" marker into its working directory when an exec is OOM-killed.
        cwd=root,
    )
    log.close()
    service = PrivateDockerd(root, proc, runsc=False)
    deadline = time.monotonic() + 30
    while True:
        engine = Engine(service.url, "podman")
        try:
            engine.ping()
            return service
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "podman.log").read_text(errors="replace")[-1500:]
                service.stop()
                raise RuntimeError(f"private podman service did not start: {text}") from None
            time.sleep(0.1)
        finally:
            engine.close()


def podman_or_skip() -> PrivateDockerd:
    """A process-wide private ``podman system service`` (own storage, runroot, socket); skips when absent."""
    global _PODMAN, _PODMAN_FAILURE
    if _PODMAN is None and _PODMAN_FAILURE is None:
        _PODMAN_FAILURE = None if os.geteuid() == 0 else "the podman service needs root here"
        for tool in ("podman", "conmon", "catatonit", "runc", "busybox"):
            if _PODMAN_FAILURE is None and shutil.which(tool) is None:
                _PODMAN_FAILURE = f"{tool} is not installed (apt-get install podman catatonit busybox-static)"
        if _PODMAN_FAILURE is None:
            _PODMAN = _start_podman()
            atexit.register(_PODMAN.stop)
    if _PODMAN is None:
        pytest.skip(f"private podman service unavailable: {_PODMAN_FAILURE}")
    return _PODMAN


def check_sealed_read_only_directory(backend: DockerBackend, tmp_path: Path) -> None:
    """A host daemon's unix socket in a read-only directory does not answer the guest (the directory is a sealed
    overlay mounted under the session's directory); its files read (admitted sibling), a read-write directory's
    socket still answers, and terminate leaves no mount behind."""
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
