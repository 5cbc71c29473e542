"""The gateway server end to end, on loopback only.

Fake upstreams listen on 127.0.0.2; the resolver is static; the gateway's connector refuses to dial anything
outside 127.0.0.0/8 and ::1, so a bug can never send a packet off the machine. Each refusal test has an
admission sibling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stockade.gateway import audit
from stockade.gateway.audit import AuditLog
from stockade.gateway.dns import QTYPE_A, FakeAddressMap, build_query, parse_response
from stockade.gateway.policy import GatewayPolicy
from stockade.gateway.resolver import RecordingResolver, StaticResolver
from stockade.gateway.server import Gateway
from stockade.gateway.sni import build_client_hello

pytestmark = pytest.mark.timeout(30)

UPSTREAM = "127.0.0.2"
STEP = 5.0  # bound on every single network wait in these tests

RESOLVE = {
    "allowed.test": UPSTREAM,
    "also.test": UPSTREAM,
    "loop.test": "127.0.0.1",
    "meta.test": "169.254.169.254",
    "ten.test": "10.1.2.3",
    "api.wild.test": UPSTREAM,
    "a.b.wild.test": UPSTREAM,
    "wild.test": UPSTREAM,
    "evil-wild.test": UPSTREAM,
    "canary.test": UPSTREAM,
}


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(25):
            await coro

    asyncio.run(bounded())


@dataclass
class Upstreams:
    echo_port: int
    http_port: int
    closed_port: int
    servers: list[asyncio.Server] = field(default_factory=list)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        body = head
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def upstreams() -> AsyncIterator[Upstreams]:
    echo = await asyncio.start_server(_echo, UPSTREAM, 0)
    http = await asyncio.start_server(_http, UPSTREAM, 0)
    probe = socket.socket()
    probe.bind((UPSTREAM, 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens there any more
    ups = Upstreams(echo.sockets[0].getsockname()[1], http.sockets[0].getsockname()[1], closed_port)
    try:
        yield ups
    finally:
        for server in (echo, http):
            server.close()


async def loopback_only(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = ipaddress.ip_address(host)
    assert addr.is_loopback, f"gateway tried to dial {host}: tests must never leave loopback"
    return await asyncio.open_connection(host, port)


def listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


@dataclass
class Env:
    gateway: Gateway
    ups: Upstreams
    resolver: RecordingResolver
    log_path: Path
    http: tuple[str, int]
    socks: tuple[str, int]
    dns: tuple[str, int]

    def log(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = audit.read(self.log_path)
        return entries


@contextlib.asynccontextmanager
async def env(
    tmp_path: Path, hosts: Callable[[Upstreams], list[str]], mode: str = "limited", splice: bool = True
) -> AsyncIterator[Env]:
    async with upstreams() as ups:
        resolver = RecordingResolver(StaticResolver(RESOLVE))
        log_path = tmp_path / "audit.jsonl"
        gw = Gateway(
            "sess-1",
            GatewayPolicy(mode, hosts(ups)),  # type: ignore[arg-type]
            resolver,
            AuditLog(log_path),
            fake_map=FakeAddressMap("127.100.0.0/16"),
            connect_timeout=STEP,
            sni_timeout=2.0,
            connector=loopback_only,
            splice=splice,
        )
        http_sock, socks_sock = listener(), listener()
        dns_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns_sock.bind(("127.0.0.1", 0))
        await gw.serve_http_proxy(http_sock)
        await gw.serve_socks5(socks_sock)
        await gw.serve_dns(dns_sock)
        e = Env(
            gw,
            ups,
            resolver,
            log_path,
            http_sock.getsockname(),
            socks_sock.getsockname(),
            dns_sock.getsockname(),
        )
        try:
            yield e
        finally:
            await gw.aclose()


def std_hosts(ups: Upstreams) -> list[str]:
    return [
        f"allowed.test:{ups.echo_port}",
        f"allowed.test:{ups.http_port}",
        f"allowed.test:{ups.closed_port}",
        f"also.test:{ups.echo_port}",
        f"loop.test:{ups.echo_port}",
        f"meta.test:{ups.echo_port}",
        f"ten.test:{ups.echo_port}",
        f"*.wild.test:{ups.echo_port}",
        f"{UPSTREAM}:{ups.echo_port}",
        f"{UPSTREAM}:{ups.http_port}",
        f"{UPSTREAM}:{ups.closed_port}",
    ]


# ---- client helpers --------------------------------------------------------------------------------------


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), STEP)


async def http_request(e: Env, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*e.http)
    writer.write(raw)
    await writer.drain()
    data = await read_all(reader)
    writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


async def connect_tunnel(e: Env, target: str) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*e.http)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
    return int(head.split(b" ", 2)[1]), reader, writer


async def echo_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), STEP)


async def closes(reader: asyncio.StreamReader) -> bool:
    try:
        rest = await asyncio.wait_for(reader.read(), STEP)
    except ConnectionError:
        return True
    return rest == b""


async def socks_connect(e: Env, atyp: int, host: bytes, port: int) -> tuple[int, asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection(*e.socks)
    writer.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(reader.readexactly(2), STEP) == b"\x05\x00"
    addr = bytes([len(host)]) + host if atyp == 3 else host
    writer.write(b"\x05\x01\x00" + bytes([atyp]) + addr + struct.pack("!H", port))
    await writer.drain()
    reply = await asyncio.wait_for(reader.readexactly(10), STEP)
    assert reply[0] == 5
    return reply[1], reader, writer


async def dns_query(e: Env, name: str, qtype: int = QTYPE_A) -> tuple[int, list[str]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, build_query(name, qtype), e.dns)
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), STEP)
    finally:
        sock.close()
    _qid, rcode, addrs = parse_response(data)
    return rcode, addrs


def last(e: Env, **match: Any) -> dict[str, Any]:
    for entry in reversed(e.log()):
        if all(entry.get(k) == v for k, v in match.items()):
            return dict(entry)
    raise AssertionError(f"no audit line matching {match}: {e.log()}")


async def settle() -> None:
    # Connect lines are written when the relay winds down, just after the client sees the close.
    for _ in range(50):
        await asyncio.sleep(0.02)


# ---- HTTP proxy ------------------------------------------------------------------------------------------


def test_http_absolute_uri_admitted(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            port = e.ups.http_port
            status, data = await http_request(
                e,
                f"GET http://allowed.test:{port}/x?y=1 HTTP/1.1\r\nHost: evil.test\r\n"
                f"Proxy-Connection: keep-alive\r\nX-Keep: 1\r\n\r\n".encode(),
            )
            assert status == 200, data
            assert b"GET /x?y=1 HTTP/1.1\r\n" in data
            assert f"Host: allowed.test:{port}\r\n".encode() in data
            assert b"evil.test" not in data
            assert b"Proxy-Connection" not in data
            assert b"X-Keep: 1" in data
            await settle()
            line = last(e, via="http", name="allowed.test")
            assert line["decision"] == "allowed"
            assert line["rule"] == f"allowed.test:{port}"
            assert line["bytes_down"] == len(data)

    run(go())


def test_http_absolute_uri_refused_other_name(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, data = await http_request(
                e, f"GET http://canary.test:{e.ups.http_port}/ HTTP/1.1\r\n\r\n".encode()
            )
            assert status == 403
            assert b"not_in_allowlist" in data
            assert b"X-Stockade-Reason: not_in_allowlist" in data
            assert "canary.test" not in e.resolver.calls
            line = last(e, name="canary.test")
            assert (line["decision"], line["reason"], line["via"]) == ("refused", "not_in_allowlist", "http")

    run(go())


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",  # origin form: not a proxy request
        b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",  # https needs CONNECT
        b"GET http://u@allowed.test/ HTTP/1.1\r\n\r\n",
        b"GET http://allowed.test/ HTTP/2.0\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\n folded\r\n\r\n",
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n",  # no port
        b"CONNECT bad_name.test:443 HTTP/1.1\r\n\r\n",
    ],
)
def test_http_malformed_is_400(tmp_path: Path, raw: bytes) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, _data = await http_request(e, raw)
            assert status == 400
            # The sibling: the gateway still serves well-formed requests afterwards.
            status, _ = await http_request(
                e, f"GET http://allowed.test:{e.ups.http_port}/ HTTP/1.1\r\n\r\n".encode()
            )
            assert status == 200

    run(go())


def test_connect_admitted_and_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, reader, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            assert await echo_roundtrip(reader, writer, b"hello") == b"hello"
            writer.close()
            status, reader, writer = await connect_tunnel(e, f"canary.test:{e.ups.echo_port}")
            assert status == 403
            assert b"not_in_allowlist" in await read_all(reader)
            writer.close()
            assert "canary.test" not in e.resolver.calls
            await settle()
            ok = last(e, via="connect", name="allowed.test")
            assert ok["decision"] == "allowed"
            assert (ok["bytes_up"], ok["bytes_down"]) == (5, 5)

    run(go())


def test_connect_upstream_down_is_502(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, _reader, writer = await connect_tunnel(e, f"allowed.test:{e.ups.closed_port}")
            assert status == 502
            writer.close()
            assert "connection_refused" in last(e, name="allowed.test", port=e.ups.closed_port)["error"]

    run(go())


# ---- address checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason", "address"),
    [
        ("loop.test", "loopback", "127.0.0.1"),
        ("meta.test", "link_local", "169.254.169.254"),
        ("ten.test", "private", "10.1.2.3"),
    ],
)
def test_allowed_name_with_non_public_address_refused(
    tmp_path: Path, name: str, reason: str, address: str
) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, reader, writer = await connect_tunnel(e, f"{name}:{e.ups.echo_port}")
            assert status == 403
            assert reason.encode() in await read_all(reader)
            writer.close()
            line = last(e, name=name)
            assert (line["decision"], line["reason"], line["address"]) == ("refused", reason, address)
            # Sibling: allowed.test resolves to 127.0.0.2, which an address rule allows.
            status, _r, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            writer.close()

    run(go())


def test_address_rule_is_needed_for_loopback_upstream(tmp_path: Path) -> None:
    async def go() -> None:
        hosts: Callable[[Upstreams], list[str]] = lambda ups: [f"allowed.test:{ups.echo_port}"]  # noqa: E731
        async with env(tmp_path, hosts) as e:
            status, _r, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 403
            writer.close()
            assert last(e, name="allowed.test")["reason"] == "loopback"

    run(go())


def test_ip_literal_refused_unless_allowed(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            p = e.ups.echo_port
            status, reader, writer = await connect_tunnel(e, f"{UPSTREAM}:{p}")
            assert status == 200
            assert await echo_roundtrip(reader, writer, b"lit") == b"lit"
            writer.close()
            status, _r, writer = await connect_tunnel(e, f"127.0.0.3:{p}")
            assert status == 403
            writer.close()
            line = last(e, address="127.0.0.3")
            assert (line["name"], line["reason"]) == (None, "loopback")
            status, _r, writer = await connect_tunnel(e, f"[::1]:{p}")
            assert status == 403
            writer.close()

    run(go())


def test_disallowed_port_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, _r, writer = await connect_tunnel(e, "allowed.test:443")
            assert status == 403
            writer.close()
            assert last(e, name="allowed.test", port=443)["reason"] == "port_not_allowed"
            status, _r, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            writer.close()

    run(go())


@pytest.mark.parametrize(
    ("name", "allowed"),
    [("api.wild.test", True), ("a.b.wild.test", True), ("wild.test", False), ("evil-wild.test", False)],
)
def test_wildcard_edges(tmp_path: Path, name: str, allowed: bool) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, _r, writer = await connect_tunnel(e, f"{name}:{e.ups.echo_port}")
            assert status == (200 if allowed else 403)
            writer.close()
            if not allowed:
                assert name not in e.resolver.calls

    run(go())


# ---- SNI -------------------------------------------------------------------------------------------------


def test_sni_matching_admitted(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, reader, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            hello = build_client_hello("Allowed.Test.")
            # Sent in two pieces: the gateway must wait for the whole ClientHello.
            writer.write(hello[:20])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(hello[20:])
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(len(hello)), STEP) == hello
            writer.close()

    run(go())


def test_sni_mismatch_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, reader, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            writer.write(build_client_hello("evil.test"))
            await writer.drain()
            assert await closes(reader)
            writer.close()
            await settle()
            line = last(e, name="allowed.test", via="connect")
            assert (line["decision"], line["reason"], line["bytes_up"]) == ("refused", "sni_mismatch", 0)

    run(go())


def test_non_tls_first_bytes_pass(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, reader, writer = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            assert (
                await echo_roundtrip(reader, writer, b"GET / HTTP/1.1\r\n\r\n") == b"GET / HTTP/1.1\r\n\r\n"
            )
            writer.close()

    run(go())


# ---- SOCKS5 ----------------------------------------------------------------------------------------------


def test_socks5_admitted_and_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            p = e.ups.echo_port
            code, reader, writer = await socks_connect(e, 3, b"allowed.test", p)
            assert code == 0
            assert await echo_roundtrip(reader, writer, b"socks") == b"socks"
            writer.close()
            code, _r, writer = await socks_connect(e, 3, b"canary.test", p)
            assert code == 0x02
            writer.close()
            assert "canary.test" not in e.resolver.calls
            code, reader, writer = await socks_connect(e, 1, socket.inet_aton(UPSTREAM), p)
            assert code == 0
            assert await echo_roundtrip(reader, writer, b"v4") == b"v4"
            writer.close()
            code, _r, writer = await socks_connect(e, 1, socket.inet_aton("127.0.0.3"), p)
            assert code == 0x02
            writer.close()
            code, _r, writer = await socks_connect(e, 4, socket.inet_pton(socket.AF_INET6, "::1"), p)
            assert code == 0x02
            writer.close()
            code, _r, writer = await socks_connect(e, 3, b"allowed.test", e.ups.closed_port)
            assert code == 0x05
            writer.close()
            await settle()
            assert last(e, via="socks5", name="canary.test")["reason"] == "not_in_allowlist"

    run(go())


def test_socks5_unsupported(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            reader, writer = await asyncio.open_connection(*e.socks)
            writer.write(b"\x05\x01\x02")  # only username/password offered
            assert await asyncio.wait_for(reader.readexactly(2), STEP) == b"\x05\xff"
            writer.close()
            reader, writer = await asyncio.open_connection(*e.socks)
            writer.write(b"\x05\x01\x00\x05\x03\x00\x01\x7f\x00\x00\x02\x00\x50")  # UDP ASSOCIATE
            assert (await asyncio.wait_for(reader.readexactly(12), STEP))[2:4] == b"\x05\x07"
            writer.close()

    run(go())


# ---- DNS stub and transparent path -----------------------------------------------------------------------


def test_dns_stub(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            rcode, addrs = await dns_query(e, "allowed.test")
            assert (rcode, addrs) == (0, ["127.100.0.1"])
            rcode, addrs = await dns_query(e, "canary.test")
            assert (rcode, addrs) == (3, [])
            # Malformed datagrams do not kill the server.
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
                junk.setblocking(False)
                for blob in (b"", b"\x00", b"\xff" * 600, build_query("x.test")[:14]):
                    await loop.sock_sendto(junk, blob, e.dns)
            rcode, addrs = await dns_query(e, "ALLOWED.test")
            assert (rcode, addrs) == (0, ["127.100.0.1"])
            # The stub never consults the resolver, for any name.
            assert e.resolver.calls == []
            dns_lines = [x for x in e.log() if x["kind"] == "dns"]
            assert any(x["name"] == "canary.test" and x["decision"] == "refused" for x in dns_lines)
            ok = next(x for x in dns_lines if x["decision"] == "allowed")
            assert (ok["address"], ok["protocol"], ok["via"]) == ("127.100.0.1", "udp", "dns")

    run(go())


def test_transparent_path(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            rcode, addrs = await dns_query(e, "allowed.test")
            assert rcode == 0
            fake = addrs[0]
            p = e.ups.echo_port
            # In a sandbox this listener is bound to 0.0.0.0:p inside the guest's netns; here the exact
            # synthetic address keeps the test on loopback.
            good = listener(fake, p)
            unknown = listener("127.100.0.200", p)
            await e.gateway.serve_transparent(good)
            await e.gateway.serve_transparent(unknown)
            reader, writer = await asyncio.open_connection(fake, p)
            assert await echo_roundtrip(reader, writer, b"transparent") == b"transparent"
            writer.close()
            reader, writer = await asyncio.open_connection("127.100.0.200", p)
            assert await closes(reader)
            writer.close()
            await settle()
            ok = last(e, via="transparent", decision="allowed")
            assert (ok["name"], ok["port"], ok["address"]) == ("allowed.test", p, UPSTREAM)
            bad = last(e, via="transparent", decision="refused")
            assert (bad["reason"], bad["address"]) == ("unknown_address", "127.100.0.200")

    run(go())


def test_proxy_accepts_synthetic_address(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            _rcode, addrs = await dns_query(e, "allowed.test")
            # A SOCKS client that resolved locally (through the stub) sends the synthetic address.
            code, reader, writer = await socks_connect(e, 1, socket.inet_aton(addrs[0]), e.ups.echo_port)
            assert code == 0
            assert await echo_roundtrip(reader, writer, b"x") == b"x"
            writer.close()

    run(go())


# ---- policy updates --------------------------------------------------------------------------------------


def test_update_policy_closes_forbidden_relays(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            p = e.ups.echo_port
            _s, keep_r, keep_w = await connect_tunnel(e, f"allowed.test:{p}")
            _s, cut_r, cut_w = await connect_tunnel(e, f"also.test:{p}")
            assert await echo_roundtrip(keep_r, keep_w, b"a") == b"a"
            assert await echo_roundtrip(cut_r, cut_w, b"b") == b"b"
            assert len(e.gateway.open_connections()) == 2
            closed = e.gateway.update_policy(
                GatewayPolicy("limited", [f"allowed.test:{p}", f"{UPSTREAM}:{p}"])
            )
            assert closed == 1
            assert await closes(cut_r)
            assert await echo_roundtrip(keep_r, keep_w, b"still") == b"still"
            # New connections follow the new rules at once.
            status, _r, w = await connect_tunnel(e, f"also.test:{p}")
            assert status == 403
            w.close()
            keep_w.close()
            cut_w.close()
            await settle()
            cut = last(e, name="also.test", decision="allowed")
            assert cut["closed"] == "policy_update: not_in_allowlist"

    run(go())


def test_update_policy_widening_admits(tmp_path: Path) -> None:
    async def go() -> None:
        hosts: Callable[[Upstreams], list[str]] = lambda ups: [f"{UPSTREAM}:{ups.echo_port}"]  # noqa: E731
        async with env(tmp_path, hosts) as e:
            p = e.ups.echo_port
            status, _r, w = await connect_tunnel(e, f"allowed.test:{p}")
            assert status == 403
            w.close()
            e.gateway.update_policy(GatewayPolicy("limited", [f"allowed.test:{p}", f"{UPSTREAM}:{p}"]))
            status, _r, w = await connect_tunnel(e, f"allowed.test:{p}")
            assert status == 200
            w.close()

    run(go())


# ---- audit -----------------------------------------------------------------------------------------------


def test_audit_fields(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, std_hosts) as e:
            status, r, w = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200
            await echo_roundtrip(r, w, b"12345678")
            w.close()
            status, _r, w = await connect_tunnel(e, f"canary.test:{e.ups.echo_port}")
            w.close()
            await settle()
            lines = [x for x in e.log() if x["kind"] == "connect"]
            assert len(lines) == 2
            base = {
                "time",
                "session",
                "kind",
                "via",
                "name",
                "port",
                "address",
                "protocol",
                "decision",
                "bytes_up",
                "bytes_down",
                "duration_ms",
            }
            ok, bad = lines if lines[0]["decision"] == "allowed" else lines[::-1]
            assert base | {"rule"} <= set(ok)
            assert base | {"reason"} <= set(bad)
            assert ok["session"] == "sess-1"
            assert ok["time"].endswith("Z")
            assert (ok["bytes_up"], ok["bytes_down"], ok["protocol"]) == (8, 8, "tcp")
            assert ok["duration_ms"] >= 0
            assert (bad["decision"], bad["address"]) == ("refused", None)

    run(go())


def test_unrestricted_still_refuses_non_public(tmp_path: Path) -> None:
    async def go() -> None:
        async with env(tmp_path, lambda ups: [], mode="unrestricted") as e:
            status, _r, w = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 403
            w.close()
            assert last(e, name="allowed.test")["reason"] == "loopback"
            rcode, addrs = await dns_query(e, "anything.test")
            assert rcode == 0
            assert addrs

    run(go())


# ---- relaying: splice(2) and the copying fallback ---------------------------------------------------------


@pytest.fixture
def splice_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records what each relay direction's splice attempt returned (True: the kernel relayed it)."""
    from stockade.gateway.splice import splice_relay as real

    calls: list[bool] = []

    async def spy(*args: Any, **kwargs: Any) -> bool:
        # Appended when it returns; a relay still running when the test ends (cancelled) leaves no entry.
        used = await real(*args, **kwargs)
        calls.append(used)
        return used

    monkeypatch.setattr("stockade.gateway.server.splice_relay", spy)
    return calls


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_bulk_both_ways_with_half_close(tmp_path: Path, splice: bool, splice_calls: list[bool]) -> None:
    """8 MiB of random bytes up, echoed back down, EOF passed on each way; byte counts in the audit line."""
    import hashlib
    import os

    payload = os.urandom(8 << 20)

    async def go() -> None:
        async with env(tmp_path, std_hosts, splice=splice) as e:
            status, r, w = await connect_tunnel(e, f"allowed.test:{e.ups.echo_port}")
            assert status == 200

            async def send() -> None:
                for i in range(0, len(payload), 1 << 16):
                    w.write(payload[i:i + (1 << 16)])
                    await w.drain()
                w.write_eof()  # the upstream sees EOF only after every byte, then closes its side

            sender = asyncio.create_task(send())
            back = await asyncio.wait_for(r.read(), 20)
            await sender
            w.close()
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            await settle()
            line = last(e, name="allowed.test", decision="allowed")
            assert (line["bytes_up"], line["bytes_down"]) == (len(payload), len(payload))

    run(go())
    assert splice_calls == ([True, True] if splice else [])


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_bytes_pipelined_behind_the_connect_head_arrive_first_and_in_order(
    tmp_path: Path, splice: bool, splice_calls: list[bool]
) -> None:
    """A client that sends its first bytes in the same write as CONNECT (to an address, so no SNI check reads
    them first): they sit in the stream's buffer when the relay starts, and must not be lost or overtaken."""

    async def go() -> None:
        async with env(tmp_path, std_hosts, splice=splice) as e:
            target = f"{UPSTREAM}:{e.ups.echo_port}"
            reader, writer = await asyncio.open_connection(*e.http)
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + b"first|")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
            assert head.startswith(b"HTTP/1.1 200")
            writer.write(b"second")
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(b"first|second")), STEP)
            assert echoed == b"first|second"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), STEP) == b""  # the echo's EOF came back through
            writer.close()

    run(go())
    assert splice_calls == ([True, True] if splice else [])
