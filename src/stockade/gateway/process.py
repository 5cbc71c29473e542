"""``python -m stockade.gateway --config FILE``: one session's gateway as its own host-side process.

The config is a JSON object::

    {
      "session": "sess-id",
      "http_fd": 5,                 # inherited listening TCP/unix stream sockets, each optional
      "socks_fd": 6,
      "dns_fd": 7,                  # an inherited bound UDP socket
      "transparent_fds": [8, 9],    # listening sockets of the transparent path (one per port)
      "control_path": "/run/.../ctl.sock",
      "log_path": "/var/.../audit.jsonl",      # optional; without it entries stay in memory only
      "policy": {"mode": "limited", "allowed_hosts": ["example.com"]},
      "resolve": {"example.com": "93.184.216.34"},   # optional static map; without it getaddrinfo
      "fake_pool": "127.100.0.0/16",            # optional synthetic address pool of the DNS stub
      "ready_path": "/run/.../ready",           # optional; written once serving
      "connect_timeout": 10, "die_with_parent": true,
      "dns_upstream": "127.0.0.5:5353",         # optional: resolve through this DNS server instead
      "transparent_original_dst": true,         # transparent fds receive NAT-redirected connections
      "exit_with_pid": 1234,                    # optional: stop when this process (the session) exits
      "public_overrides": ["127.0.0.2"]         # test-only: addresses treated as public
    }

Once every socket is served the process prints ``ready`` on stdout (and writes ``ready_path``). The control
socket (mode 0600) takes one JSON object per line and answers one per line:
``{"op": "ping"}`` -> ``{"ok": true, "session": ..., "connections": N}``;
``{"op": "policy", "policy": {...}}`` -> ``{"ok": true, "closed": N}`` (connections cut by the new rules) or
``{"ok": false, "error": {"code", "message", ...}}`` with the old policy kept;
``{"op": "connections"}`` -> ``{"ok": true, "connections": [...]}``;
``{"op": "stop"}`` -> ``{"ok": true}``, then the process exits 0. SIGTERM and SIGINT also stop it cleanly.
A bad config exits with status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.errors import InvalidRequest, NetworkPolicyError, SandboxError
from stockade.gateway.audit import AuditLog
from stockade.gateway.dns import DEFAULT_POOL, FakeAddressMap
from stockade.gateway.policy import GatewayPolicy
from stockade.gateway.resolver import Resolver, StaticResolver, SystemResolver, UpstreamResolver
from stockade.gateway.server import Gateway

__all__ = ["GatewayConfig", "control", "control_sync", "main", "run"]

CONTROL_LINE_LIMIT = 1024 * 1024


@dataclass
class GatewayConfig:
    session: str
    control_path: Path
    policy: GatewayPolicy
    http_fd: int | None = None
    socks_fd: int | None = None
    dns_fd: int | None = None
    transparent_fds: list[int] = field(default_factory=list)
    log_path: Path | None = None
    resolve: dict[str, list[str]] | None = None
    fake_pool: str = DEFAULT_POOL
    ready_path: Path | None = None
    connect_timeout: float = 10.0
    die_with_parent: bool = False
    dns_upstream: tuple[str, int] | None = None
    transparent_original_dst: bool = False
    exit_with_pid: int | None = None
    public_overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise InvalidRequest("the gateway config must be a JSON object", field="config")

        def fd(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest("must be a file descriptor number", field=key)
            return value

        fds = data.get("transparent_fds", [])
        if not isinstance(fds, list) or not all(isinstance(x, int) and x >= 0 for x in fds):
            raise InvalidRequest("must be a list of file descriptor numbers", field="transparent_fds")
        session = data.get("session")
        if not isinstance(session, str) or not session:
            raise InvalidRequest("must be a non-empty string", field="session")
        control_path = data.get("control_path")
        if not isinstance(control_path, str) or not control_path:
            raise InvalidRequest("must be a path", field="control_path")
        resolve_raw = data.get("resolve")
        resolve: dict[str, list[str]] | None = None
        if resolve_raw is not None:
            if not isinstance(resolve_raw, Mapping):
                raise InvalidRequest("must map names to addresses", field="resolve")
            resolve = {}
            for name, value in resolve_raw.items():
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise InvalidRequest(f"address list of {name!r} must be strings", field="resolve")
                resolve[str(name)] = list(values)
        log_path = data.get("log_path")
        ready_path = data.get("ready_path")
        upstream: tuple[str, int] | None = None
        if data.get("dns_upstream") is not None:
            host, sep, port_text = str(data["dns_upstream"]).rpartition(":")
            if not sep or not port_text.isdigit():
                raise InvalidRequest("must be ADDRESS:PORT", field="dns_upstream")
            upstream = (host.strip("[]"), int(port_text))
        overrides = data.get("public_overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(a, str) for a in overrides):
            raise InvalidRequest("must be a list of addresses", field="public_overrides")
        return cls(
            session=session,
            control_path=Path(control_path),
            policy=GatewayPolicy.from_json(data.get("policy") or {"mode": "deny"}),
            http_fd=fd("http_fd"),
            socks_fd=fd("socks_fd"),
            dns_fd=fd("dns_fd"),
            transparent_fds=list(fds),
            log_path=Path(log_path) if log_path else None,
            resolve=resolve,
            fake_pool=str(data.get("fake_pool") or DEFAULT_POOL),
            ready_path=Path(ready_path) if ready_path else None,
            connect_timeout=float(data.get("connect_timeout", 10.0)),
            die_with_parent=bool(data.get("die_with_parent", False)),
            dns_upstream=upstream,
            transparent_original_dst=bool(data.get("transparent_original_dst", False)),
            exit_with_pid=fd("exit_with_pid"),
            public_overrides=list(overrides),
        )


def _adopt(fd: int, kind: int, what: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise NetworkPolicyError(f"gateway: {what} fd {fd} is not a socket: {exc}") from exc
    if sock.type != kind:
        raise NetworkPolicyError(f"gateway: {what} fd {fd} has the wrong socket type")
    return sock


def _set_pdeathsig() -> None:
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def run(config: GatewayConfig, *, ready_stream: Any = None) -> None:
    """Serve until stopped (control ``stop``, SIGTERM or SIGINT)."""
    loop = asyncio.get_running_loop()
    audit = AuditLog(config.log_path)
    resolver: Resolver
    if config.resolve is not None:
        resolver = StaticResolver(config.resolve)
    elif config.dns_upstream is not None:
        resolver = UpstreamResolver(*config.dns_upstream)
    else:
        resolver = SystemResolver()
    try:
        overrides = [ipaddress.ip_address(a) for a in config.public_overrides]
    except ValueError as exc:
        raise InvalidRequest(f"public_overrides: {exc}", field="public_overrides") from None
    gateway = Gateway(
        config.session,
        config.policy,
        resolver,
        audit,
        fake_map=FakeAddressMap(config.fake_pool),
        connect_timeout=config.connect_timeout,
        public_overrides=overrides,
    )
    stop = asyncio.Event()
    watched: int | None = None
    control_server: asyncio.Server | None = None
    try:
        if config.http_fd is not None:
            await gateway.serve_http_proxy(_adopt(config.http_fd, socket.SOCK_STREAM, "http"))
        if config.socks_fd is not None:
            await gateway.serve_socks5(_adopt(config.socks_fd, socket.SOCK_STREAM, "socks"))
        if config.dns_fd is not None:
            await gateway.serve_dns(_adopt(config.dns_fd, socket.SOCK_DGRAM, "dns"))
        for fd in config.transparent_fds:
            await gateway.serve_transparent(
                _adopt(fd, socket.SOCK_STREAM, "transparent"), original_dst=config.transparent_original_dst
            )
        if config.exit_with_pid is not None:
            # The session's sandbox: when it is gone there is nobody left to serve.
            try:
                watched = os.pidfd_open(config.exit_with_pid)
            except ProcessLookupError:
                return
            loop.add_reader(watched, stop.set)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while not stop.is_set():
                    line = await reader.readline()
                    if not line:
                        return
                    reply = _command(gateway, line, stop)
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                return
            finally:
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            config.control_path.unlink()
        # Create the socket 0600 from the start: a chmod afterwards would leave a window.
        old_umask = os.umask(0o177)
        try:
            control_server = await asyncio.start_unix_server(
                handle, path=str(config.control_path), limit=CONTROL_LINE_LIMIT
            )
        finally:
            os.umask(old_umask)
        os.chmod(config.control_path, 0o600)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.ready_path is not None:
            config.ready_path.write_text("ready\n")
        out = ready_stream if ready_stream is not None else sys.stdout
        print("ready", file=out, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if watched is not None:
            loop.remove_reader(watched)
            os.close(watched)
        if control_server is not None:
            control_server.close()
        await gateway.aclose()
        with contextlib.suppress(FileNotFoundError):
            config.control_path.unlink()
        audit.close()


def _command(gateway: Gateway, line: bytes, stop: asyncio.Event) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {"ok": False, "error": {"code": "invalid_request", "message": "not JSON"}}
    if not isinstance(message, dict):
        return {"ok": False, "error": {"code": "invalid_request", "message": "not a JSON object"}}
    op = message.get("op")
    if op == "ping":
        return {"ok": True, "session": gateway.session_id, "connections": len(gateway.open_connections())}
    if op == "policy":
        try:
            policy = GatewayPolicy.from_json(message.get("policy"))  # type: ignore[arg-type]
        except SandboxError as exc:
            return {"ok": False, "error": exc.to_json()}
        closed = gateway.update_policy(policy)
        return {"ok": True, "closed": closed, "policy": policy.to_json()}
    if op == "connections":
        return {"ok": True, "connections": gateway.open_connections()}
    if op == "stop":
        stop.set()
        return {"ok": True}
    return {"ok": False, "error": {"code": "invalid_request", "message": f"unknown op {op!r}"}}


async def control(path: Path | str, message: Mapping[str, Any], time_limit: float = 5.0) -> dict[str, Any]:
    """Send one command to a running gateway's control socket and return its answer."""

    async def go() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=CONTROL_LINE_LIMIT)
        try:
            writer.write(json.dumps(dict(message)).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise NetworkPolicyError("gateway closed the control connection without answering")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise NetworkPolicyError("gateway sent a malformed control answer")
        return reply

    try:
        return await asyncio.wait_for(go(), time_limit)
    except (OSError, TimeoutError, ValueError) as exc:
        raise NetworkPolicyError(f"gateway control at {path} failed: {exc}") from exc


def control_sync(path: Path | str, message: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Blocking form of :func:`control` (no event loop needed)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(dict(message)).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise NetworkPolicyError(f"gateway control at {path} failed: {exc}") from exc
    try:
        reply = json.loads(buf)
    except ValueError as exc:
        raise NetworkPolicyError("gateway sent a malformed control answer") from exc
    if not isinstance(reply, dict):
        raise NetworkPolicyError("gateway sent a malformed control answer")
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="gateway config JSON file")
    args = parser.parse_args(argv)
    try:
        config = GatewayConfig.from_json(json.loads(args.config.read_text()))
    except (OSError, ValueError) as exc:
        print(f"stockade gateway: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    if config.die_with_parent:
        _set_pdeathsig()
    try:
        asyncio.run(run(config))
    except SandboxError as exc:
        print(f"stockade gateway: {exc}", file=sys.stderr)
        return 2
    return 0
