"""Host-side canaries of the escape suite, beyond the TCP listener and files of the contract suite.

Each one records whether a guest reached it: a unix-socket daemon (pathname or abstract) and a UDP socket count
what arrives, a host process can be checked for a tracer, a stop or its death, inheritable fds stand for
descriptors a careless backend would hand into the sandbox, and a sampler keeps the peak of a host measurement
(memory, process count) while a resource attack runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "HostProcess",
    "HostUdpListener",
    "HostUnixListener",
    "Sampler",
    "host_rss_bytes",
    "processes_of_session",
    "processes_with",
    "sandbox_tree",
    "still_running",
]


class _Recorder:
    """A daemon thread polling a socket; subclasses say what one poll does."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._sock.settimeout(0.1)  # polling lets close() stop the thread without racing a blocked call
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.hits: list[str] = []
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                hit = self._poll()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.hits.append(hit)

    def _poll(self) -> str:
        raise NotImplementedError

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.hits)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


class HostUnixListener(_Recorder):
    """A stand-in for a host daemon's unix socket (think ``docker.sock``): records and greets every client.

    ``path`` binds a pathname socket (world-writable, so only the sandbox stands in the way), ``abstract`` a
    socket in the abstract namespace of the host's network namespace.
    """

    def __init__(self, *, path: Path | None = None, abstract: str | None = None) -> None:
        if (path is None) == (abstract is None):
            raise ValueError("give exactly one of path and abstract")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if path is not None:
                sock.bind(str(path))
                path.chmod(0o777)
            else:
                sock.bind("\0" + str(abstract))
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self.path = path
        self.abstract = abstract
        self.greeting = "stockade-daemon-" + secrets.token_hex(8)
        super().__init__(sock, "stockade-escape-unix")

    def _poll(self) -> str:
        conn, _ = self._sock.accept()
        with contextlib.suppress(OSError):
            conn.sendall(self.greeting.encode() + b"\n")
        conn.close()
        return "connection"

    def close(self) -> None:
        super().close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class HostUdpListener(_Recorder):
    """A UDP socket on a host loopback address that records every datagram it receives."""

    def __init__(self, address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 0))
        except BaseException:
            sock.close()
            raise
        self.address = address
        self.port: int = sock.getsockname()[1]
        super().__init__(sock, "stockade-escape-udp")

    def _poll(self) -> str:
        data, _peer = self._sock.recvfrom(4096)
        return data.decode(errors="replace")


class HostProcess:
    """A host process the guest must neither see, signal, trace nor read: ``sleep`` with a unique duration.

    The duration doubles as a needle: no other process on the host carries ``self.needle`` in its command
    line.
    """

    def __init__(self) -> None:
        self.needle = f"600.{secrets.randbelow(10**9):09d}"
        self._proc = subprocess.Popen(
            ["sleep", self.needle],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._proc.pid

    def status(self) -> dict[str, str]:
        """Fields of ``/proc/<pid>/status`` (empty once the process is gone)."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields

    def alive(self) -> bool:
        return self._proc.poll() is None

    def harmed(self) -> list[str]:
        """What a guest did to the process: killed it, stopped it, or attached a tracer."""
        if not self.alive():
            return [f"killed (returncode {self._proc.returncode})"]
        status = self.status()
        found = []
        if status.get("State", "").startswith(("T", "t")):
            found.append(f"stopped (state {status['State']})")
        if status.get("TracerPid", "0") != "0":
            found.append(f"traced by pid {status['TracerPid']}")
        return found

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


class Sampler:
    """Calls ``measure`` every ``interval`` seconds in a thread and keeps the largest value seen."""

    def __init__(self, measure: Callable[[], int], interval: float = 0.02) -> None:
        self._measure = measure
        self._interval = interval
        self.peak = measure()
        self.first = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stockade-escape-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._measure())

    def close(self) -> None:
        self.stop()

    def stop(self) -> int:
        """Stop sampling (idempotent); returns the peak."""
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self._measure())
        return self.peak


def host_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a host process, in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _host_processes(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, the bytes of /proc/<pid>/<name>) of every host process but this one that can be read."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            yield int(entry.name), (entry / name).read_bytes()
        except OSError:
            continue


def processes_with(needle: str) -> list[int]:
    """Pids of host processes whose command line contains ``needle`` (this process excluded)."""
    return [pid for pid, cmdline in _host_processes("cmdline") if needle.encode() in cmdline]


def processes_of_session(session_id: str) -> list[int]:
    """Pids of host processes that name ``session_id`` in their command line or their cgroup (bwrap names a
    session's cgroup after it, on whatever node of this host runs it: a Ray node's sandboxes are found too)."""
    named = session_id.encode()
    in_cgroup = [pid for pid, cgroups in _host_processes("cgroup")
                 if any(line.rsplit(b"/", 1)[-1] == named for line in cgroups.splitlines())]
    return sorted(set(processes_with(session_id)) | set(in_cgroup))


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of host process ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def sandbox_tree(metadata: dict[str, str]) -> dict[int, int]:
    """The host processes holding a guest whose own processes are not host processes (gVisor: the sandbox
    process, whose children hold the guest's memory), as pid -> start time, from the session's
    ``sandbox_pid`` metadata and the host's /proc; empty when the backend names none or it is gone."""
    try:
        root = int(metadata.get("sandbox_pid", ""))
    except ValueError:
        return {}
    stats = {pid: st for entry in Path("/proc").iterdir()
             if entry.name.isdigit() and (st := _stat(pid := int(entry.name))) is not None}
    if root not in stats:
        return {}
    tree = {root: stats[root][1]}
    grew = True
    while grew:  # descendants, however deep
        grew = False
        for pid, (ppid, start) in stats.items():
            if ppid in tree and pid not in tree:
                tree[pid] = start
                grew = True
    return tree


def still_running(tree: dict[int, int]) -> list[int]:
    """The pids of ``tree`` (from :func:`sandbox_tree`) still alive as the same processes (start time checked,
    so a reused pid does not count)."""
    return sorted(pid for pid, start in tree.items() if (st := _stat(pid)) is not None and st[1] == start)
