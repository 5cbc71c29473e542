"""Pure pieces of the gateway: address classes, policy decisions, SNI, the DNS stub's answers, audit."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest

from stockade.errors import InvalidRequest
from stockade.gateway import audit
from stockade.gateway.addresses import classify
from stockade.gateway.dns import (
    QTYPE_AAAA,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    FakeAddressMap,
    PoolExhausted,
    answer,
    build_query,
    parse_response,
)
from stockade.gateway.policy import GatewayPolicy
from stockade.gateway.resolver import RecordingResolver, ResolveError, StaticResolver
from stockade.gateway.sni import SniStatus, build_client_hello, names_equal, parse_client_hello


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- addresses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "reserved"),
        ("198.51.100.1", "reserved"),
        ("203.0.113.1", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link_local"),
        ("fd12::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link_local"),
        ("::ffff:8.8.8.8", "ipv4_mapped"),
        ("::10.0.0.1", "private"),
        ("64:ff9b::10.0.0.1", "private"),
        ("64:ff9b::127.0.0.1", "loopback"),
        ("2002:7f00:0001::", "loopback"),
        ("2002:0808:0808::", "6to4"),
        ("2001:0:1:2:3:4:f7f7:f7f7", "teredo"),  # embedded 8.8.8.8, inverted
    ],
)
def test_classify_refuses(addr: str, reason: str) -> None:
    assert classify(ip(addr)) == reason


@pytest.mark.parametrize(
    "addr", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "64:ff9b::8.8.8.8"]
)
def test_classify_public(addr: str) -> None:
    assert classify(ip(addr)) is None


# --- policy -----------------------------------------------------------------------------------------------


def test_policy_limited_names() -> None:
    p = GatewayPolicy("limited", ["allowed.test:8080", "*.wild.test"])
    assert p.decide_name("allowed.test", 8080).rule == "allowed.test:8080"
    assert p.decide_name("ALLOWED.test.", 8080).allowed
    assert p.decide_name("allowed.test", 443).reason == "port_not_allowed"
    assert p.decide_name("other.test", 8080).reason == "not_in_allowlist"
    assert p.decide_name("a.wild.test", 443).rule == "*.wild.test"
    assert p.decide_name("wild.test", 443).reason == "not_in_allowlist"
    assert p.decide_name("evil-wild.test", 443).reason == "not_in_allowlist"
    assert p.decide_name("bad name", 443).reason == "invalid_name"


def test_policy_limited_addresses() -> None:
    p = GatewayPolicy("limited", ["allowed.test:8080", "127.0.0.2:8080", "192.0.2.0/24:8080"])
    # A name resolving to loopback: refused unless the address itself is allowed.
    assert p.decide_address("allowed.test", ip("127.0.0.1"), 8080).reason == "loopback"
    both = p.decide_address("allowed.test", ip("127.0.0.2"), 8080)
    assert (both.rule, both.address_rule) == ("allowed.test:8080", "127.0.0.2:8080")
    assert p.decide_address("allowed.test", ip("169.254.169.254"), 8080).reason == "link_local"
    assert p.decide_address("allowed.test", ip("10.9.9.9"), 8080).reason == "private"
    assert p.decide_address("allowed.test", ip("::ffff:127.0.0.1"), 8080).reason == "loopback"
    assert p.decide_address("allowed.test", ip("93.184.216.34"), 8080).rule == "allowed.test:8080"
    # The name itself must still be allowed.
    assert p.decide_address("other.test", ip("93.184.216.34"), 8080).reason == "not_in_allowlist"
    # IP literals need an address rule, public or not.
    assert p.decide_address(None, ip("93.184.216.34"), 8080).reason == "ip_literal_not_allowed"
    assert p.decide_address(None, ip("127.0.0.2"), 8080).rule == "127.0.0.2:8080"
    assert p.decide_address(None, ip("127.0.0.2"), 80).reason == "loopback"
    assert p.decide_address(None, ip("192.0.2.7"), 8080).rule == "192.0.2.0/24:8080"
    assert p.decide_address(None, ip("127.0.0.3"), 8080).reason == "loopback"


def test_policy_unrestricted_and_deny() -> None:
    u = GatewayPolicy("unrestricted", ["127.0.0.2:8080"])
    assert u.decide_name("anything.test", 1234).allowed
    assert u.decide_address("anything.test", ip("8.8.8.8"), 1234).rule == "unrestricted"
    assert u.decide_address(None, ip("8.8.8.8"), 1234).allowed
    assert u.decide_address("anything.test", ip("10.0.0.1"), 1234).reason == "private"
    assert u.decide_address(None, ip("169.254.169.254"), 80).reason == "link_local"
    assert u.decide_address(None, ip("127.0.0.2"), 8080).allowed
    d = GatewayPolicy("limited", [])
    assert d.mode == "deny"
    assert d.decide_name("x.test", 80).reason == "deny_all"
    assert d.decide_address(None, ip("8.8.8.8"), 80).reason == "deny_all"
    assert not d.decide_dns("x.test").allowed


def test_policy_from_json() -> None:
    p = GatewayPolicy.from_json({"mode": "limited", "allowed_hosts": ["a.test", "A.test"]})
    assert p.to_json() == {"mode": "limited", "allowed_hosts": ["a.test"]}
    with pytest.raises(InvalidRequest, match="bare"):
        GatewayPolicy.from_json({"mode": "limited", "allowed_hosts": ["*"]})
    with pytest.raises(InvalidRequest, match="mode"):
        GatewayPolicy.from_json({"mode": "open"})
    with pytest.raises(InvalidRequest):
        GatewayPolicy.from_json({"mode": "limited", "allowed_hosts": "a.test"})


# --- resolver ---------------------------------------------------------------------------------------------


def test_static_resolver() -> None:
    async def go() -> None:
        r = RecordingResolver(StaticResolver({"A.test": "127.0.0.2", "b.test": ["127.0.0.3", "::1"]}))
        assert await r.resolve("a.test.") == [ip("127.0.0.2")]
        assert await r.resolve("b.test") == [ip("127.0.0.3"), ip("::1")]
        with pytest.raises(ResolveError):
            await r.resolve("c.test")
        assert r.calls == ["a.test.", "b.test", "c.test"]

    asyncio.run(go())


# --- SNI --------------------------------------------------------------------------------------------------


def test_sni_from_real_client_hello() -> None:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="Real.Example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    result = parse_client_hello(hello)
    assert result.status is SniStatus.SNI
    assert result.name == "real.example.test"


def test_sni_partial_reads_need_more() -> None:
    hello = build_client_hello("allowed.test")
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]).status is SniStatus.NEED_MORE, cut
    assert parse_client_hello(hello).name == "allowed.test"
    # Extra bytes after the hello (early data) do not matter.
    assert parse_client_hello(hello + b"\x17\x03\x03").name == "allowed.test"


def test_sni_fragmented_over_records() -> None:
    hello = build_client_hello("big.test", pad_to=20000)
    assert hello.count(b"\x16\x03\x01") >= 2
    assert parse_client_hello(hello).name == "big.test"


def test_sni_other_outcomes() -> None:
    assert parse_client_hello(build_client_hello(None)).status is SniStatus.NO_SNI
    assert parse_client_hello(b"GET / HTTP/1.1\r\n").status is SniStatus.NOT_TLS
    assert parse_client_hello(b"SSH-2.0-x\r\n").status is SniStatus.NOT_TLS
    assert parse_client_hello(b"\x16\x01").status is SniStatus.NOT_TLS
    hello = bytearray(build_client_hello("x.test"))
    hello[5] = 2  # a ServerHello, not a ClientHello
    assert parse_client_hello(bytes(hello)).status is SniStatus.MALFORMED
    bad = bytearray(build_client_hello("x.test"))
    bad[9 + 2 + 32] = 200  # session id length runs past the message
    assert parse_client_hello(bytes(bad)).status is SniStatus.MALFORMED
    assert names_equal("A.test.", "a.TEST")


# --- DNS answers ------------------------------------------------------------------------------------------


def _check(policy: GatewayPolicy) -> Any:
    def check(name: str) -> tuple[bool, str]:
        d = policy.decide_dns(name)
        return d.allowed, d.label

    return check


def test_dns_answers() -> None:
    fake = FakeAddressMap("127.100.0.0/16")
    check = _check(GatewayPolicy("limited", ["allowed.test:8080"]))
    reply, info = answer(build_query("Allowed.Test", query_id=7), check, fake)
    assert reply is not None
    assert info is not None
    qid, rcode, addrs = parse_response(reply)
    assert (qid, rcode, addrs) == (7, RCODE_NOERROR, ["127.100.0.1"])
    assert info["decision"] == "allowed"
    assert info["rule"] == "allowed.test:8080"
    assert fake.name_for("127.100.0.1") == "allowed.test"
    # Stable per session.
    reply, _ = answer(build_query("allowed.test"), check, fake)
    assert reply is not None
    assert parse_response(reply)[2] == ["127.100.0.1"]
    # AAAA: NODATA.
    reply, _ = answer(build_query("allowed.test", QTYPE_AAAA), check, fake)
    assert reply is not None
    assert parse_response(reply)[1:] == (RCODE_NOERROR, [])
    # Not allowed: NXDOMAIN, nothing allocated.
    reply, info = answer(build_query("other.test"), check, fake)
    assert reply is not None
    assert info is not None
    assert parse_response(reply)[1:] == (RCODE_NXDOMAIN, [])
    assert info["reason"] == "not_in_allowlist"
    assert len(fake) == 1


def test_dns_malformed() -> None:
    fake = FakeAddressMap()
    check = _check(GatewayPolicy("unrestricted"))
    assert answer(b"", check, fake) == (None, None)
    assert answer(b"\x00" * 5, check, fake) == (None, None)
    good = build_query("x.test")
    # A response (QR set) is dropped: no reflection.
    assert answer(good[:2] + b"\x81\x00" + good[4:], check, fake) == (None, None)
    reply, _ = answer(good[:-3], check, fake)
    assert reply is not None
    assert parse_response(reply)[1] == RCODE_FORMERR
    two = good[:4] + struct.pack("!H", 2) + good[6:]
    reply, _ = answer(two, check, fake)
    assert reply is not None
    assert parse_response(reply)[1] == RCODE_FORMERR
    pointer = good[:12] + b"\xc0\x0c" + good[-4:]
    reply, _ = answer(pointer, check, fake)
    assert reply is not None
    assert parse_response(reply)[1] == RCODE_FORMERR
    junk = good[:12] + b"\x03\xff\xfe\xfd\x00" + good[-4:]
    reply, _ = answer(junk, check, fake)
    assert reply is not None
    assert parse_response(reply)[1] == RCODE_NXDOMAIN


def test_fake_map_exhaustion() -> None:
    fake = FakeAddressMap("127.100.0.0/30")
    assert str(fake.address_for("a.test")) == "127.100.0.1"
    assert str(fake.address_for("b.test")) == "127.100.0.2"
    with pytest.raises(PoolExhausted):
        fake.address_for("c.test")
    assert fake.name_for("127.100.0.2") == "b.test"
    assert fake.name_for("::ffff:127.100.0.2") == "b.test"
    assert fake.name_for("127.100.0.3") is None


# --- audit ------------------------------------------------------------------------------------------------


def test_audit_log_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    log = audit.AuditLog(path)
    for i in range(5):
        log.write({"kind": "connect", "n": i})
    log.close()
    with path.open("a") as fh:
        fh.write('{"truncated": ')  # a crash mid-line
    entries = audit.read(path)
    assert [e["n"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["time"].endswith("Z")
    assert [e["n"] for e in audit.read(path, limit=2)] == [3, 4]
    assert audit.read(tmp_path / "missing.jsonl") == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    mem = audit.AuditLog(None)
    mem.write({"x": 1})
    assert mem.read() == [json.loads(json.dumps(mem.read()[0]))]
