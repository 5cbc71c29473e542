"""Host-side canaries: things a confined guest must not see or touch, each of which records or reveals
whether it was reached. Verdicts look for the canary, not only at exit codes: a command can fail for reasons
that have nothing to do with confinement, and a "refused" that was never attempted proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from pathlib import Path

__all__ = ["HostListener", "host_processes_matching", "token"]


def token(prefix: str = "") -> str:
    """A random value no guest can guess or find by accident in unrelated output."""
    return prefix + secrets.token_hex(12)


class HostListener:
    """A TCP listener on the host that records every connection it accepts (and closes it at once).

    Runs in a daemon thread so that it accepts even while the event loop waits on a backend call.
    """

    def __init__(self, address: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((address, port))
            self._sock.listen(16)
            # Polling lets close() stop the thread without relying on close() waking a blocked accept().
            self._sock.settimeout(0.1)
        except BaseException:
            self._sock.close()
            raise
        self.address = address
        self.port: int = self._sock.getsockname()[1]
        self.peers: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"stockade-canary-{address}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.peers.append(str(peer[0]))
            with contextlib.suppress(OSError):
                conn.sendall(b"stockade-canary\n")
            conn.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.peers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    @staticmethod
    def ipv6_loopback_available() -> bool:
        if not socket.has_ipv6:
            return False
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError:
            return False
        return True


def host_processes_matching(needle: str) -> list[str]:
    """Command lines of host processes containing ``needle`` (this process excluded)."""
    found: list[str] = []
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found
