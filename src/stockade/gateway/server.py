"""The egress gateway: HTTP proxy, SOCKS5, transparent listeners and the DNS stub of one session.

The gateway never creates its guest-side listeners. It is handed sockets that were bound inside the sandbox's
network namespace (by the netns holder) and accepts on them from the host network namespace, where its own
upstream connections are made. Every entry point therefore takes a socket object.

Every upstream connection goes the same way, whatever the entry point: decide the name (or IP literal)
against the current policy, resolve the name with the injected resolver (never for a refused name), check each
address (refusing loopback, private, link-local, ... unless a rule names the address), connect to the first
allowed one, then relay; while relaying, the client's first bytes are inspected and a TLS ClientHello whose
SNI differs from the name being connected for is refused. Each attempt is one audit line, written when the
connection ends.

Throughput: once a connection is decided (and its ClientHello checked), each direction is relayed with
``splice(2)`` in the kernel (``splice.py``); where that is not possible, through asyncio streams with 64 KiB
reads, one Python-level copy per chunk. ``Gateway(splice=False)`` forces the latter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from stockade.errors import InvalidRequest
from stockade.gateway.audit import AuditLog
from stockade.gateway.dns import DnsStubProtocol, FakeAddressMap
from stockade.gateway.policy import GatewayPolicy
from stockade.gateway.resolver import ResolveError, Resolver
from stockade.gateway.sni import MAX_HELLO, SniStatus, names_equal, parse_client_hello
from stockade.gateway.splice import available as splice_available
from stockade.gateway.splice import splice_relay
from stockade.hostpatterns import IPAddress, normalise_name

__all__ = ["Gateway", "Refused", "UpstreamError"]

log = logging.getLogger(__name__)

Via = Literal["http", "connect", "socks5", "transparent"]

READ_CHUNK = 64 * 1024
HEAD_LIMIT = 64 * 1024


Connector = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _open_connection(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, limit=READ_CHUNK)


class Refused(Exception):
    """The policy (or a protocol check standing in for it) refuses this connection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamError(Exception):
    """The policy allowed the connection but it could not be made."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind  # resolve_failed | timeout | connection_refused | unreachable | connect_failed


class _BadRequest(Exception):
    pass


@dataclass(eq=False)
class _Conn:
    id: int
    via: Via
    name: str | None
    port: int
    address: IPAddress | None = None
    rule: str | None = None
    address_rule: str | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    closed: str | None = None  # why the gateway cut an allowed connection
    refused: str | None = None  # set when a check during relaying refused it (e.g. SNI)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    relaying: bool = False

    def abort(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "via": self.via,
            "name": self.name,
            "port": self.port,
            "address": str(self.address) if self.address is not None else None,
            "rule": self.rule,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port)."""
    if not authority or any(c.isspace() for c in authority) or "@" in authority:
        raise _BadRequest("bad authority")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _BadRequest("bad IPv6 authority")
        host, rest = authority[1:close], authority[close + 1 :]
        if _parse_ip(host) is None or _parse_ip(host).version != 6:  # type: ignore[union-attr]
            raise _BadRequest("bad IPv6 address")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    elif ":" in authority:
        raise _BadRequest("IPv6 address must be in brackets")
    else:
        host, port_text = authority, None
    if port_text is None:
        if default_port is None:
            raise _BadRequest("port required")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _BadRequest("bad port")
    return host, int(port_text)


class Gateway:
    """One session's gateway; run its ``serve_*`` coroutines in one event loop."""

    def __init__(
        self,
        session_id: str,
        policy: GatewayPolicy,
        resolver: Resolver,
        log: AuditLog,
        *,
        fake_map: FakeAddressMap | None = None,
        connect_timeout: float = 10.0,
        resolve_timeout: float = 10.0,
        handshake_timeout: float = 30.0,
        sni_timeout: float = 10.0,
        max_connections: int = 1024,
        connector: Connector | None = None,
        public_overrides: Iterable[IPAddress] = (),
        splice: bool = True,
    ) -> None:
        self.session_id = session_id
        self.splice = splice and splice_available()
        self.public_overrides = frozenset(public_overrides)
        if self.public_overrides:
            policy = policy.with_public_overrides(self.public_overrides)
        self._policy = policy
        self._generation = 0
        self.resolver = resolver
        self.audit = log
        self.fake_map = fake_map if fake_map is not None else FakeAddressMap()
        self.connect_timeout = connect_timeout
        self.resolve_timeout = resolve_timeout
        self.handshake_timeout = handshake_timeout
        self.sni_timeout = sni_timeout
        self.max_connections = max_connections
        # Injectable so tests can assert that nothing but loopback is ever dialled.
        self.connector: Connector = connector or _open_connection
        self._ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}
        self._servers: list[asyncio.Server] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False

    # ---- policy ------------------------------------------------------------------------------------------

    @property
    def policy(self) -> GatewayPolicy:
        return self._policy

    def update_policy(self, policy: GatewayPolicy) -> int:
        """Switch rules now; close open relays the new policy forbids. Returns how many were closed."""
        if self.public_overrides:
            policy = policy.with_public_overrides(self.public_overrides)
        self._policy = policy
        self._generation += 1
        closed = 0
        for conn in list(self._conns.values()):
            if not conn.relaying or conn.address is None:
                continue  # still connecting: it re-checks against the new policy before relaying
            decision = policy.decide_address(conn.name, conn.address, conn.port)
            if not decision.allowed:
                conn.abort(f"policy_update: {decision.reason}")
                closed += 1
        return closed

    def open_connections(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self._conns.values() if c.relaying]

    # ---- serving -----------------------------------------------------------------------------------------

    async def serve_http_proxy(self, sock: socket.socket) -> asyncio.Server:
        return await self._serve(sock, self._handle_http)

    async def serve_socks5(self, sock: socket.socket) -> asyncio.Server:
        return await self._serve(sock, self._handle_socks5)

    async def serve_transparent(self, sock: socket.socket, *, original_dst: bool = False) -> asyncio.Server:
        """Serve plain (proxy-unaware) clients.

        Without ``original_dst`` the destination is the listener's own address (one listener per port, on
        every address of the guest): only synthetic DNS-stub addresses are accepted there. With it, the guest's
        connections were redirected here by a NAT rule and the destination the guest asked for is read back
        with ``SO_ORIGINAL_DST``: synthetic addresses map to their names, and any other address is decided as an
        IP literal (refused unless a rule allows it).
        """
        if original_dst:
            return await self._serve(sock, self._handle_redirected)
        return await self._serve(sock, self._handle_transparent)

    async def serve_dns(self, sock: socket.socket) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: DnsStubProtocol(self._dns_check, self.fake_map, self._log_dns), sock=sock
        )
        self._transports.append(transport)
        return transport

    async def _serve(
        self,
        sock: socket.socket,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> asyncio.Server:
        sock.setblocking(False)

        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
            try:
                if self._closing:
                    return
                await handler(reader, writer)
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("gateway handler failed")
            finally:
                if writer.transport.is_closing():
                    writer.transport.abort()
                else:
                    writer.close()
                if task is not None:
                    self._handlers.discard(task)

        server = await asyncio.start_server(wrapped, sock=sock, limit=HEAD_LIMIT)
        self._servers.append(server)
        return server

    async def aclose(self) -> None:
        """Stop accepting, cut every open connection and wait for the handlers to finish."""
        self._closing = True
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for conn in list(self._conns.values()):
            conn.abort("gateway_stopped")
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self._servers.clear()
        self._transports.clear()

    # ---- audit -------------------------------------------------------------------------------------------

    def _log_conn(self, conn: _Conn, *, error: str | None = None) -> None:
        entry: dict[str, Any] = {
            "session": self.session_id,
            "kind": "connect",
            "via": conn.via,
            "name": conn.name,
            "port": conn.port,
            "address": str(conn.address) if conn.address is not None else None,
            "protocol": "tcp",
        }
        if conn.refused is not None:
            entry["decision"] = "refused"
            entry["reason"] = conn.refused
        else:
            entry["decision"] = "allowed"
            entry["rule"] = conn.rule
            if conn.address_rule is not None:
                entry["address_rule"] = conn.address_rule
        entry["bytes_up"] = conn.bytes_up
        entry["bytes_down"] = conn.bytes_down
        entry["duration_ms"] = round((time.monotonic() - conn.started) * 1000, 1)
        if conn.closed is not None:
            entry["closed"] = conn.closed
        if error is not None:
            entry["error"] = error
        try:
            self.audit.write(entry)
        except OSError:
            log.exception("audit log write failed")

    def _log_dns(self, info: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "session": self.session_id,
            "kind": "dns",
            "via": "dns",
            "name": info.get("name"),
            "port": None,
            "address": info.get("address"),
            "protocol": "udp",
            "decision": info["decision"],
        }
        if info["decision"] == "allowed":
            entry["rule"] = info.get("rule")
        else:
            entry["reason"] = info.get("reason")
        entry.update(bytes_up=0, bytes_down=0, duration_ms=0)
        if "qtype" in info:
            entry["qtype"] = info["qtype"]
        try:
            self.audit.write(entry)
        except OSError:
            log.exception("audit log write failed")

    def _dns_check(self, name: str) -> tuple[bool, str]:
        decision = self._policy.decide_dns(name)
        return decision.allowed, decision.label

    # ---- destination handling ----------------------------------------------------------------------------

    def _new_conn(self, via: Via, host: str, port: int) -> _Conn:
        """A connection record for ``host`` (a name or an IP literal); raises ``Refused`` for junk names."""
        addr = _parse_ip(host)
        if addr is not None:
            # A guest that resolved through the stub and then used a proxy sends the synthetic address.
            mapped = self.fake_map.name_for(addr)
            if mapped is not None:
                return _Conn(next(self._ids), via, mapped, port)
            return _Conn(next(self._ids), via, None, port, address=addr)
        conn = _Conn(next(self._ids), via, host, port)
        try:
            conn.name = normalise_name(host)
        except InvalidRequest:
            conn.refused = "invalid_name"
            raise Refused("invalid_name") from None
        return conn

    async def _connect(self, conn: _Conn) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Decide, resolve, check and connect; raises ``Refused`` or ``UpstreamError``."""
        if len(self._conns) > self.max_connections:  # this connection is already registered
            raise Refused("too_many_connections")
        policy, generation = self._policy, self._generation
        candidates: list[tuple[IPAddress, str, str | None]] = []
        if conn.name is not None:
            by_name = policy.decide_name(conn.name, conn.port)
            if not by_name.allowed:
                raise Refused(by_name.reason or "refused")
            try:
                addrs = await asyncio.wait_for(self.resolver.resolve(conn.name), self.resolve_timeout)
            except TimeoutError as exc:
                raise UpstreamError("resolve_failed", "timeout") from exc
            except (ResolveError, OSError, InvalidRequest) as exc:
                raise UpstreamError("resolve_failed", str(exc)) from exc
            first_refusal: str | None = None
            for addr in addrs:
                decision = policy.decide_address(conn.name, addr, conn.port, by_name.rule)
                if decision.allowed:
                    candidates.append((addr, decision.rule or "", decision.address_rule))
                elif first_refusal is None:
                    first_refusal = decision.reason
                    conn.address = addr
            if not candidates:
                raise Refused(first_refusal or "no_address")
        else:
            assert conn.address is not None
            decision = policy.decide_address(None, conn.address, conn.port)
            if not decision.allowed:
                raise Refused(decision.reason or "refused")
            candidates.append((conn.address, decision.rule or "", None))

        failure = UpstreamError("connect_failed")
        for addr, rule, address_rule in candidates:
            conn.address, conn.rule, conn.address_rule = addr, rule, address_rule
            try:
                reader, writer = await asyncio.wait_for(
                    self.connector(str(addr), conn.port), self.connect_timeout
                )
            except TimeoutError:
                failure = UpstreamError("timeout", f"{addr}:{conn.port}")
                continue
            except ConnectionRefusedError:
                failure = UpstreamError("connection_refused", f"{addr}:{conn.port}")
                continue
            except OSError as exc:
                kind = (
                    "unreachable"
                    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
                    else "connect_failed"
                )
                failure = UpstreamError(kind, f"{addr}:{conn.port}: {exc.strerror or exc}")
                continue
            if self._generation != generation:
                # The policy changed while we were connecting: the connection must satisfy the new one.
                recheck = self._policy.decide_address(conn.name, addr, conn.port)
                if not recheck.allowed:
                    writer.transport.abort()
                    raise Refused(recheck.reason or "refused")
            return reader, writer
        raise failure

    async def _relay(
        self,
        conn: _Conn,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
        *,
        first: bytes = b"",
        check_sni: bool = True,
    ) -> None:
        conn.writers = [client_w, up_w]
        conn.relaying = True
        up = asyncio.create_task(
            self._pump_up(conn, client_r, up_w, first, check_sni and conn.name is not None, client_w.transport)
        )
        down = asyncio.create_task(self._pump(conn, up_r, client_w, "down", up_w.transport))
        conn.tasks = [up, down]
        pending: set[asyncio.Task[Any]] = {up, down}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.cancelled() or t.exception() is not None for t in done):
                    for task in done:
                        if not task.cancelled() and isinstance(task.exception(), Refused):
                            conn.refused = str(task.exception())
                    break
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            conn.relaying = False
            if conn.closed or conn.refused:
                up_w.transport.abort()  # a cut connection gets no graceful FIN, and no buffered bytes
            else:
                up_w.close()

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        d: str,
        source: asyncio.BaseTransport | None = None,
    ) -> None:
        def count(n: int) -> None:
            if d == "up":
                conn.bytes_up += n
            else:
                conn.bytes_down += n

        # In the kernel where it can be (splice.py says how the streams are handed over); otherwise one
        # Python-level copy per chunk.
        if self.splice and source is not None and await splice_relay(reader, source, writer, count):
            return
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                if writer.can_write_eof() and not writer.transport.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(data)
            if d == "up":
                conn.bytes_up += len(data)
            else:
                conn.bytes_down += len(data)
            await writer.drain()

    async def _pump_up(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes,
        check_sni: bool,
        source: asyncio.BaseTransport | None = None,
    ) -> None:
        buf = first
        if check_sni:
            if not buf:
                # Wait as long as the client likes for its first byte (server-speaks-first protocols), but
                # once a ClientHello has started it must complete promptly.
                buf = await reader.read(READ_CHUNK)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.sni_timeout
            while buf:
                result = parse_client_hello(buf)
                if result.status is SniStatus.NEED_MORE:
                    if len(buf) > MAX_HELLO + 1024:
                        raise Refused("malformed_client_hello")
                    try:
                        more = await asyncio.wait_for(
                            reader.read(READ_CHUNK), max(0.0, deadline - loop.time())
                        )
                    except TimeoutError:
                        raise Refused("client_hello_timeout") from None
                    if not more:
                        raise Refused("malformed_client_hello")
                    buf += more
                    continue
                if result.status is SniStatus.MALFORMED:
                    raise Refused("malformed_client_hello")
                if (
                    result.status is SniStatus.SNI
                    and result.name is not None
                    and conn.name is not None
                    and not names_equal(result.name, conn.name)
                ):
                    raise Refused("sni_mismatch")
                break
        if buf:
            writer.write(buf)
            conn.bytes_up += len(buf)
            await writer.drain()
        elif check_sni:
            # The client closed before sending anything.
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
            return
        await self._pump(conn, reader, writer, "up", source)

    async def _proxy(
        self,
        conn: _Conn,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        *,
        on_refused: Callable[[str], Awaitable[None]],
        on_error: Callable[[UpstreamError], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]],
        first: bytes = b"",
        check_sni: bool = True,
    ) -> None:
        """The common path: connect, tell the client, relay, log once."""
        self._conns[conn.id] = conn
        try:
            try:
                up_r, up_w = await self._connect(conn)
            except Refused as exc:
                conn.refused = exc.reason
                conn.rule = None
                with contextlib.suppress(OSError, ConnectionError):
                    await on_refused(exc.reason)
                self._log_conn(conn)
                return
            except UpstreamError as exc:
                with contextlib.suppress(OSError, ConnectionError):
                    await on_error(exc)
                self._log_conn(conn, error=str(exc))
                return
            try:
                await on_connected()
            except (OSError, ConnectionError):
                up_w.transport.abort()
                self._log_conn(conn, error="client_gone")
                return
            try:
                await self._relay(conn, client_r, client_w, up_r, up_w, first=first, check_sni=check_sni)
            finally:
                self._log_conn(conn)
        finally:
            self._conns.pop(conn.id, None)

    def _refuse_early(self, via: Via, host: str, port: int, reason: str) -> None:
        conn = _Conn(next(self._ids), via, host, port, refused=reason)
        self._log_conn(conn)

    # ---- HTTP proxy --------------------------------------------------------------------------------------

    async def _handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.handshake_timeout)
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError:
            await _http_error(writer, 431, "Request Header Fields Too Large", "request head too large")
            return
        except TimeoutError:
            await _http_error(writer, 408, "Request Timeout", "request head not received in time")
            return
        try:
            method, target, version, headers = _parse_head(head)
        except _BadRequest as exc:
            await _http_error(writer, 400, "Bad Request", str(exc))
            return

        via: Via
        first = b""
        if method == "CONNECT":
            via = "connect"
            try:
                host, port = _split_authority(target, None)
            except _BadRequest as exc:
                await _http_error(writer, 400, "Bad Request", f"CONNECT target: {exc}")
                return
        else:
            via = "http"
            try:
                host, port, origin_form, authority = _absolute_target(target)
            except _BadRequest as exc:
                await _http_error(writer, 400, "Bad Request", str(exc))
                return
            first = _rewrite_head(method, origin_form, version, headers, authority)

        try:
            conn = self._new_conn(via, host, port)
        except Refused as exc:
            self._refuse_early(via, host, port, exc.reason)
            await _http_error(writer, 400, "Bad Request", f"invalid host name {host!r}")
            return

        async def refused(reason: str) -> None:
            await _http_error(
                writer, 403, "Forbidden", f"stockade gateway refused {host}:{port}: {reason}", reason=reason
            )

        async def failed(exc: UpstreamError) -> None:
            if exc.kind == "timeout":
                await _http_error(writer, 504, "Gateway Timeout", f"upstream {host}:{port}: {exc}")
            else:
                await _http_error(writer, 502, "Bad Gateway", f"upstream {host}:{port}: {exc}")

        async def connected() -> None:
            if via == "connect":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()

        # Plain http:// needs no SNI check, and the rewritten head must not be mistaken for a ClientHello.
        await self._proxy(
            conn,
            reader,
            writer,
            on_refused=refused,
            on_error=failed,
            on_connected=connected,
            first=first,
            check_sni=via == "connect",
        )

    # ---- SOCKS5 ------------------------------------------------------------------------------------------

    async def _handle_socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            parsed = await asyncio.wait_for(self._socks_handshake(reader, writer), self.handshake_timeout)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return
        if parsed is None:
            return
        host, port = parsed

        try:
            conn = self._new_conn("socks5", host, port)
        except Refused as exc:
            self._refuse_early("socks5", host, port, exc.reason)
            await _socks_reply(writer, 0x02)
            return

        async def refused(reason: str) -> None:
            await _socks_reply(writer, 0x02)

        async def failed(exc: UpstreamError) -> None:
            code = {
                "resolve_failed": 0x04,
                "unreachable": 0x03,
                "connection_refused": 0x05,
                "timeout": 0x06,
            }.get(exc.kind, 0x01)
            await _socks_reply(writer, code)

        async def connected() -> None:
            await _socks_reply(writer, 0x00)

        await self._proxy(conn, reader, writer, on_refused=refused, on_error=failed, on_connected=connected)

    async def _socks_handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, int] | None:
        ver, nmethods = await reader.readexactly(2)
        if ver != 5:
            return None
        methods = await reader.readexactly(nmethods)
        if 0x00 not in methods:
            writer.write(b"\x05\xff")
            await writer.drain()
            return None
        writer.write(b"\x05\x00")
        await writer.drain()
        ver, cmd, _rsv, atyp = await reader.readexactly(4)
        if ver != 5:
            return None
        if atyp == 0x01:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 0x04:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == 0x03:
            length = (await reader.readexactly(1))[0]
            raw = await reader.readexactly(length)
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                host = raw.decode("latin-1")  # normalise_name refuses it below, with a log line
            if not host:
                await _socks_reply(writer, 0x01)
                return None
        else:
            await _socks_reply(writer, 0x08)
            return None
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if cmd != 0x01:
            await _socks_reply(writer, 0x07)  # BIND and UDP ASSOCIATE are not offered
            return None
        if port == 0:
            await _socks_reply(writer, 0x02)
            return None
        return host, port

    # ---- transparent -------------------------------------------------------------------------------------

    async def _handle_transparent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sockname = writer.get_extra_info("sockname")
        if not sockname:
            return
        dest, port = str(sockname[0]), int(sockname[1])
        name = self.fake_map.name_for(dest)
        if name is None:
            conn = _Conn(next(self._ids), "transparent", None, port, address=_parse_ip(dest))
            conn.refused = "unknown_address"
            self._log_conn(conn)
            return
        conn = _Conn(next(self._ids), "transparent", name, port)

        async def nothing(*_args: object) -> None:
            return None

        await self._proxy(conn, reader, writer, on_refused=nothing, on_error=nothing, on_connected=nothing)


    async def _handle_redirected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        try:
            dest, port = original_destination(raw)
        except OSError:
            return
        name = self.fake_map.name_for(dest)
        conn = _Conn(next(self._ids), "transparent", name, port, address=None if name else _parse_ip(dest))

        async def nothing(*_args: object) -> None:
            return None

        await self._proxy(conn, reader, writer, on_refused=nothing, on_error=nothing, on_connected=nothing)


_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the IPv6 twin (IP6T_SO_ORIGINAL_DST) has the same number


def original_destination(sock: Any) -> tuple[str, int]:
    """The destination a NAT-redirected TCP connection was made to (``SO_ORIGINAL_DST``)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


# ---- HTTP helpers ----------------------------------------------------------------------------------------

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "host",
    }
)


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes everything
        raise _BadRequest("undecodable request head") from exc
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise _BadRequest("malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest("unsupported HTTP version")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise _BadRequest("obsolete header folding or empty header line")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest("malformed header line")
        if "\x00" in value or "\r" in value or "\n" in value:
            raise _BadRequest("bad character in header value")
        headers.append((name, value.strip()))
    return method, target, version, headers


def _absolute_target(target: str) -> tuple[str, int, str, str]:
    lower = target.lower()
    if lower.startswith("https://"):
        raise _BadRequest("https:// URLs go through CONNECT (no TLS interception)")
    if not lower.startswith("http://"):
        raise _BadRequest("a proxy request needs an absolute http:// URI")
    try:
        parts = urlsplit(target)
    except ValueError as exc:
        raise _BadRequest(f"bad URI: {exc}") from exc
    authority = parts.netloc
    if "@" in authority:
        raise _BadRequest("user info in the URI is not allowed")
    host, port = _split_authority(authority, 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path, authority


def _rewrite_head(
    method: str, origin_form: str, version: str, headers: list[tuple[str, str]], authority: str
) -> bytes:
    named_hop = set()
    for name, value in headers:
        if name.lower() in ("connection", "proxy-connection"):
            named_hop |= {v.strip().lower() for v in value.split(",") if v.strip()}
    out = [f"{method} {origin_form} {version}", f"Host: {authority}"]
    for name, value in headers:
        low = name.lower()
        if low in _HOP_BY_HOP or low in named_hop:
            continue
        out.append(f"{name}: {value}")
    # One request per upstream connection: the gateway then never has to parse response framing.
    out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


async def _http_error(
    writer: asyncio.StreamWriter, code: int, phrase: str, message: str, *, reason: str | None = None
) -> None:
    body = (message + "\n").encode("utf-8", "replace")
    extra = f"X-Stockade-Reason: {reason}\r\n" if reason else ""
    head = (
        f"HTTP/1.1 {code} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError, ConnectionError):
        writer.write(head.encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), 5)


async def _socks_reply(writer: asyncio.StreamWriter, code: int) -> None:
    # The bound address would be a host-side address: never show it to the guest.
    writer.write(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.drain(), 5)
