"""Egress for bwrap sessions: the guest's network namespace wired to a host-side egress gateway.

A session with a ``limited`` or ``unrestricted`` policy still gets its own, empty network namespace (only
``lo``). Inside it, set up from the host:

- the HTTP proxy on 127.0.0.1:3128 and the SOCKS5 proxy on 127.0.0.1:1080 (for proxy-aware clients; every
  exec gets ``HTTP_PROXY`` and friends pointing there);
- the DNS stub on 127.0.0.53:53 (the guest's ``resolv.conf``), which answers allowed names only, with
  synthetic addresses from 127.100.0.0/16;
- a local route for every address (``local default dev lo``) and an nftables NAT rule that redirects every TCP
  connection to a non-loopback address (or to a synthetic one) to the transparent listener on
  127.0.0.1:15001 / [::1]:15001, where the gateway reads the original destination (``SO_ORIGINAL_DST``). So a
  plain client reaches the gateway whatever address and port it dials, and nothing else: there is no interface
  but ``lo``, UDP and ICMP to non-loopback addresses are dropped.

The listening sockets are created inside the namespace (a thread that ``setns``-es into it) and handed to the
gateway process, which lives in the host namespace and is the only thing that dials out. When the gateway dies
its listeners die with it: the guest is left with nothing to connect to (fail closed) until the backend
starts a new gateway with fresh listeners.

As root, the host process enters the namespace directly. An unprivileged caller owns bubblewrap's outer user
namespace, which owns the session's network namespace: a helper process joins both and sets things up there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import LifecycleError, NetworkPolicyError
from ...models import NetworkPolicy
from ._client import short_unix_path
from ._store import process_start_time

__all__ = [
    "DNS_ADDRESS",
    "HTTP_PROXY_PORT",
    "REDIRECT_PORT",
    "SOCKS_PORT",
    "GatewayHandle",
    "find_tool",
    "gateway_policy_json",
    "proxy_env",
    "start_gateway",
]

HTTP_PROXY_PORT = 3128
SOCKS_PORT = 1080
REDIRECT_PORT = 15001
DNS_ADDRESS = "127.0.0.53"
FAKE_POOL = "127.100.0.0/16"
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_START_TIMEOUT = 15.0

# Loaded into the guest namespace. The NAT chain sends every TCP connection to a non-loopback destination
# (and to the DNS stub's synthetic addresses) to the gateway's transparent listener; the filter chain drops
# whatever else would try to leave loopback (UDP, ICMP), although without a route it could not anyway. TCP
# passes the filter: new connections were all redirected by then, and what remains is the listener's replies
# to guest sockets bound to (local) non-loopback addresses.
_NFT_RULES = f"""
table inet stockade
delete table inet stockade
table inet stockade {{
  chain nat_out {{
    type nat hook output priority -100; policy accept;
    ip daddr {FAKE_POOL} meta l4proto tcp redirect to :{REDIRECT_PORT}
    ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :{REDIRECT_PORT}
    ip6 daddr != ::1 meta l4proto tcp redirect to :{REDIRECT_PORT}
  }}
  chain filter_out {{
    type filter hook output priority 0; policy accept;
    meta l4proto tcp accept
    ip daddr != 127.0.0.0/8 drop
    ip6 daddr != ::1 drop
  }}
}}
"""


def proxy_env() -> dict[str, str]:
    """The variables every exec of a session with egress gets."""
    http = f"http://127.0.0.1:{HTTP_PROXY_PORT}"
    socks = f"socks5h://127.0.0.1:{SOCKS_PORT}"
    no_proxy = "localhost,127.0.0.1,::1"
    env = {"HTTP_PROXY": http, "HTTPS_PROXY": http, "ALL_PROXY": socks, "NO_PROXY": no_proxy}
    env.update({key.lower(): value for key, value in env.items()})
    return env


def gateway_policy_json(policy: NetworkPolicy) -> dict[str, Any]:
    if policy.denies_all:
        return {"mode": "deny"}
    if policy.mode == "unrestricted":
        return {"mode": "unrestricted"}
    return {"mode": "limited", "allowed_hosts": list(policy.allowed_hosts)}


_NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: an fd of the user namespace that owns it


def _setns(fd: int, nstype: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into the session's {what} namespace: {os.strerror(err)}")


def _enter(pid: int, *, userns: bool) -> None:
    """Join ``pid``'s network namespace (first its owning user namespace, when not root on the host)."""
    import fcntl

    net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if userns:
            # As an unprivileged caller, the namespace belongs to bubblewrap's outer user namespace, which the
            # caller owns: joining it gives the capabilities to configure the network namespace.
            owner = fcntl.ioctl(net, _NS_GET_USERNS)
            try:
                _setns(owner, _CLONE_NEWUSER, "user")
            finally:
                os.close(owner)
        _setns(net, _CLONE_NEWNET, "network")
    finally:
        os.close(net)


def _configure_and_bind() -> list[socket.socket]:
    """In the session's network namespace: routes, the NAT rule and the gateway's listening sockets."""
    result: list[socket.socket] = []
    try:
        _run(["ip", "link", "set", "lo", "up"])
        _run(["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo"])
        have_v6 = Path("/proc/sys/net/ipv6").exists()
        if have_v6:
            _run(["ip", "-6", "route", "replace", "local", "::/0", "dev", "lo"])
        _run(["nft", "-f", "-"], stdin=_NFT_RULES)
        result.append(_tcp_listener(socket.AF_INET, "127.0.0.1", HTTP_PROXY_PORT))
        result.append(_tcp_listener(socket.AF_INET, "127.0.0.1", SOCKS_PORT))
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        result.append(dns)
        dns.bind((DNS_ADDRESS, 53))
        result.append(_tcp_listener(socket.AF_INET, "127.0.0.1", REDIRECT_PORT))
        if have_v6:
            result.append(_tcp_listener(socket.AF_INET6, "::1", REDIRECT_PORT))
    except BaseException:
        for sock in result:
            sock.close()
        raise
    return result


def _bind_listeners(pid: int) -> list[socket.socket]:
    """The gateway's listening sockets, created inside ``pid``'s network namespace (set up on the way).

    As root, a thread of this process does it: ``setns`` changes only the calling thread, the thread ends right
    after, and commands it starts inherit its namespace. Otherwise a helper process does it (joining a user
    namespace needs a single-threaded process) and hands the sockets back over a unix socket.
    """
    if os.geteuid() != 0:
        return _bind_with_helper(pid)
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _enter(pid, userns=False)
            result.extend(_configure_and_bind())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=work, name="stockade-netns")
    thread.start()
    thread.join()
    if failure:
        exc = failure[0]
        raise NetworkPolicyError(f"cannot set up the session's network namespace: {exc}") from exc
    return result


def _bind_with_helper(pid: int) -> list[socket.socket]:
    parent, child = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.backends.bwrap._network", str(pid), str(child.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=[child.fileno()],
            close_fds=True,
        )
        child.close()
        parent.settimeout(_START_TIMEOUT)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(parent, 64, 16)
        except OSError:
            fds = []
        _out, err = proc.communicate(timeout=_START_TIMEOUT)
    finally:
        parent.close()
        child.close()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        detail = err.decode(errors="replace").strip()[-500:]
        raise NetworkPolicyError(f"cannot set up the session's network namespace: {detail or proc.returncode}")
    return [socket.socket(fileno=fd) for fd in fds]


def _helper_main(argv: Sequence[str]) -> int:
    """``python -m stockade.backends.bwrap._network PID FD``: the unprivileged path of ``_bind_listeners``."""
    pid, fd = int(argv[0]), int(argv[1])
    channel = socket.socket(fileno=fd)
    try:
        _enter(pid, userns=True)
        sockets = _configure_and_bind()
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    socket.send_fds(channel, [b"fds"], [s.fileno() for s in sockets])
    return 0


def find_tool(name: str) -> str | None:
    """``nft``/``ip`` live in sbin directories, which an unprivileged user's PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(name, path=path)


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    tool = find_tool(argv[0])
    if tool is None:
        raise OSError(f"{argv[0]} is not installed")
    proc = subprocess.run(
        [tool, *argv[1:]], input=stdin.encode() if stdin else None, capture_output=True, timeout=10, close_fds=True
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip()[-500:]
        raise OSError(f"{' '.join(argv[:3])} failed: {detail or proc.returncode}")


def _tcp_listener(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(512)
    except BaseException:
        sock.close()
        raise
    return sock


class GatewayHandle:
    """A session's gateway process as recorded in the session's state (``record["gateway"]``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)

    @property
    def pid(self) -> int:
        return int(self.data["pid"])

    @property
    def directory(self) -> Path:
        return Path(self.data["dir"])

    @property
    def log_path(self) -> Path:
        return self.directory / "audit.jsonl"

    def alive(self) -> bool:
        start = process_start_time(self.pid)
        return start is not None and start == self.data.get("start")

    def control(self, message: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        from ...gateway.process import control_sync

        with short_unix_path(str(self.directory / "ctl.sock")) as path:
            return control_sync(path, message, timeout)

    def stop(self) -> None:
        """Stop the process (it closes its listeners: the guest loses egress at once)."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def start_gateway(
    session_id: str,
    session_dir: Path,
    netns_pid: int,
    policy: NetworkPolicy,
    *,
    resolve: Mapping[str, Sequence[str]] | None = None,
    dns_upstream: str | None = None,
    public_overrides: Sequence[str] = (),
) -> tuple[GatewayHandle, subprocess.Popen[bytes]]:
    """Bind the guest-side listeners in ``netns_pid``'s namespace and start a gateway process serving them.

    The process is detached (it outlives the caller, like the session) and exits on its own when the
    session's init process (``netns_pid``) does. The caller keeps the ``Popen`` to reap it when it stops.
    """
    directory = session_dir / "gateway"
    directory.mkdir(mode=0o700, exist_ok=True)
    sockets = _bind_listeners(netns_pid)
    try:
        fds = [s.fileno() for s in sockets]
        config: dict[str, Any] = {
            "session": session_id,
            "http_fd": fds[0],
            "socks_fd": fds[1],
            "dns_fd": fds[2],
            "transparent_fds": fds[3:],
            "transparent_original_dst": True,
            "control_path": "ctl.sock",  # relative to the process's cwd: state paths can exceed sun_path
            "log_path": str(directory / "audit.jsonl"),
            "policy": gateway_policy_json(policy),
            "fake_pool": FAKE_POOL,
            "exit_with_pid": netns_pid,
        }
        if resolve:
            config["resolve"] = {name: list(addrs) for name, addrs in resolve.items()}
        if dns_upstream:
            config["dns_upstream"] = dns_upstream
        if public_overrides:
            config["public_overrides"] = list(public_overrides)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        log = open(directory / "gateway.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stockade.gateway", "--config", str(directory / "config.json")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=directory,
                close_fds=True,
                pass_fds=fds,
                start_new_session=True,
            )
        finally:
            log.close()
    finally:
        for sock in sockets:
            sock.close()  # the gateway holds the only copies now
    assert proc.stdout is not None
    try:
        line = _read_line(proc.stdout.fileno(), _START_TIMEOUT)
    finally:
        proc.stdout.close()
    if line.strip() != b"ready":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        detail = (directory / "gateway.log").read_text(errors="replace").strip()[-1000:]
        raise LifecycleError(f"the egress gateway failed to start: {detail or 'no output'}")
    handle = GatewayHandle(
        {"pid": proc.pid, "start": process_start_time(proc.pid), "dir": str(directory), "started": time.time()}
    )
    return handle, proc


def _read_line(fd: int, timeout: float) -> bytes:
    import select

    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        buf += chunk
    return buf


if __name__ == "__main__":
    raise SystemExit(_helper_main(sys.argv[1:]))
