"""A private Docker daemon for the benchmark: its own directory, its own socket, no network, stopped by pid.

Started as machine-notes "Engines" describes (``--bridge=none --iptables=false --ip-masq=false``, data and
exec roots in a temporary directory; experimental mode, for checkpoints; gVisor registered as the ``runsc``
runtime with the arguments of docs/docker.md when Debian's runsc is installed), and inside a loopback-only
network namespace (``netjail``), so neither the daemon nor a container can reach anything but loopback, and no
image is ever pulled: the one image used is a busybox-static root filesystem imported locally. Another daemon
on the machine (someone else's) is never touched: everything this module stops or unmounts is found by the
unique temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ..netjail import jailed
from .dockerapi import DockerAPI

__all__ = ["IMAGE", "PrivateDockerd", "probe"]

IMAGE = "stockade-bench/busybox:1"
# PID 1 exits on SIGTERM (a shell without a trap would ignore it as pid 1, and every `stop` would wait 10 s).
_CMD = '["/bin/sh","-c","trap \\"exit 0\\" TERM; sleep 2147483647 & wait"]'
_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")


def _busybox() -> str | None:
    """A statically linked busybox (the image has no libc): its ELF header names no program interpreter."""
    for path in _BUSYBOX:
        if os.access(path, os.X_OK):
            with open(path, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"\x7fELF") and b"ld-linux" not in head:
                return path
    return None


def probe() -> str | None:
    """None when a private dockerd can be started here, else what is missing."""
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    for tool in ("dockerd", "containerd", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: bench/install_docker.sh (Debian docker.io)"
    if _busybox() is None:
        return "no statically linked busybox for the local image: bench/install_docker.sh (Debian busybox-static)"
    return None


def docker_cli() -> str:
    """The client matching the daemon (Debian's), else whichever ``docker`` is on PATH."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")


class PrivateDockerd:
    """Start with :meth:`start`, always :meth:`stop` (a ``with`` block does both)."""

    def __init__(self) -> None:
        # Short: unix socket paths are limited to 108 bytes, and containerd nests its sockets below.
        self.dir = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = DockerAPI(str(self.socket))
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.version: str | None = None
        self.runsc = shutil.which("runsc")

    def __enter__(self) -> PrivateDockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        # The trust key would otherwise be written to /etc/docker/key.json on the host.
        config: dict[str, object] = {"experimental": True, "deprecated-key-path": str(self.dir / "key.json")}
        if self.runsc:
            config["runtimes"] = {"runsc": {"path": self.runsc, "runtimeArgs": ["--network=none", "--oci-seccomp"]}}
        (self.dir / "daemon.json").write_text(json.dumps(config))
        argv = [
            "dockerd", "--host", f"unix://{self.socket}", "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "dockerd.pid"),
            "--config-file", str(self.dir / "daemon.json"), "--iptables=false", "--ip-masq=false", "--bridge=none",
        ]  # fmt: skip
        # containerd stages each gVisor checkpoint in a ctrd-checkpoint* directory under its TMPDIR and leaves it
        # there: a directory of the daemon's own (world-traversable, for runsc's sandbox) goes with it at stop.
        self.dir.chmod(0o711)
        tmp = self.dir / "tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        log = open(self.dir / "dockerd.log", "wb")  # noqa: SIM115 - handed to the daemon
        try:
            self.proc = subprocess.Popen(jailed(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.api.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "dockerd.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"dockerd did not start: {tail}")
            time.sleep(0.1)
        self.version = str(self.api.version().get("Version"))
        self._import_image()

    def _import_image(self) -> None:
        busybox = _busybox()
        if busybox is None:
            raise RuntimeError("no static busybox")
        root = self.dir / "rootfs"
        (root / "bin").mkdir(parents=True)
        (root / "tmp").mkdir()
        (root / "root").mkdir()
        (root / "etc").mkdir()
        # Clients that start containers as user "root" (llm-sandbox does) need it to be in passwd.
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        os.chmod(root / "tmp", 0o1777)  # noqa: S103 - the image's /tmp, sticky and world-writable as on any system
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker_cli(), "import", "-c", f"CMD {_CMD}", "-", IMAGE], stdin=tar.stdout,
                                  env=self.env, capture_output=True, text=True)
        tar.wait()
        if imported.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr[-500:]}")

    def stop(self) -> None:
        """Stop the daemon by pid, then anything else still running from our directory, then unmount and remove
        it."""
        self.api.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        mark = str(self.dir)
        for pid in _pids_mentioning(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in sorted(_mounts_under(mark), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _pids_mentioning(mark: str) -> list[int]:
    """Processes whose command line names our private directory (containerd, shims): ours by construction."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
    return found


def _mounts_under(mark: str) -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point == mark or point.startswith(mark + "/"):
                points.append(point)
    return points
