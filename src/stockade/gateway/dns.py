"""The guest's DNS stub: answers allowed names with synthetic addresses, everything else with NXDOMAIN.

Nothing is ever forwarded and the real resolver is never consulted here: a synthetic address only says
"this name", and the gateway resolves the name itself (on the host) when the guest connects to that address
through a transparent listener. So DNS for names outside the allowlist never leaves the host, and the guest
never learns real addresses.

Answers: A with the name's synthetic IPv4 address; AAAA and other types get NODATA (NOERROR, no answer) for
allowed names, so clients fall back to IPv4; anything not allowed gets NXDOMAIN. Malformed queries get FORMERR
when a header can be read, and are dropped otherwise; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from stockade.errors import InvalidRequest
from stockade.hostpatterns import normalise_name

__all__ = [
    "DnsQuery",
    "DnsStubProtocol",
    "FakeAddressMap",
    "PoolExhausted",
    "build_query",
    "parse_query",
    "parse_response",
]

log = logging.getLogger(__name__)

QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
TTL = 30

DEFAULT_POOL = "127.100.0.0/16"


class PoolExhausted(Exception):
    pass


class FakeAddressMap:
    """Name <-> synthetic address, stable for the life of a session.

    Addresses are never reused for another name: a guest that cached an old answer must not reach a different
    host through it. Thread-safe, since the control thread and the event loop may both look names up.
    """

    def __init__(self, network: str | ipaddress.IPv4Network = DEFAULT_POOL) -> None:
        self.network = ipaddress.IPv4Network(network)
        if self.network.num_addresses < 4:
            raise ValueError("synthetic address pool is too small")
        self._by_name: dict[str, ipaddress.IPv4Address] = {}
        self._by_addr: dict[ipaddress.IPv4Address, str] = {}
        # Skip the network's first and last address: some stacks treat them specially.
        self._next = int(self.network.network_address) + 1
        self._last = int(self.network.broadcast_address) - 1
        self._lock = threading.Lock()

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        """The name's synthetic address, allocating one on first use (``PoolExhausted`` when none is left)."""
        name = normalise_name(name)
        with self._lock:
            addr = self._by_name.get(name)
            if addr is not None:
                return addr
            if self._next > self._last:
                raise PoolExhausted(f"synthetic address pool {self.network} is exhausted")
            addr = ipaddress.IPv4Address(self._next)
            self._next += 1
            self._by_name[name] = addr
            self._by_addr[addr] = name
            return addr

    def name_for(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str | None:
        try:
            ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not isinstance(ip, ipaddress.IPv4Address):
            return None
        with self._lock:
            return self._by_addr.get(ip)

    def items(self) -> list[tuple[str, ipaddress.IPv4Address]]:
        with self._lock:
            return list(self._by_name.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)


@dataclass(frozen=True)
class DnsQuery:
    id: int
    flags: int
    qname: str  # as sent (dotted, no trailing dot), undecoded case kept
    qtype: int
    qclass: int
    question: bytes  # the raw question section, echoed back in the answer


class MalformedQuery(ValueError):
    def __init__(self, message: str, query_id: int | None, flags: int = 0) -> None:
        super().__init__(message)
        self.query_id = query_id
        self.flags = flags


def parse_query(data: bytes) -> DnsQuery:
    """Parse a standard query with exactly one question; ``MalformedQuery`` otherwise."""
    if len(data) < 12:
        raise MalformedQuery("shorter than a DNS header", None)
    qid, flags, qd, an, ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if flags & 0x8000:
        raise MalformedQuery("is a response, not a query", None)  # never answer responses: no reflection
    if qd != 1 or an or ns:
        raise MalformedQuery("need exactly one question and no answers", qid, flags)
    pos = 12
    labels: list[bytes] = []
    total = 0
    while True:
        if pos >= len(data):
            raise MalformedQuery("question runs past the packet", qid, flags)
        length = data[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise MalformedQuery("compression or extended label in a question", qid, flags)
        label = data[pos : pos + length]
        if len(label) != length:
            raise MalformedQuery("label runs past the packet", qid, flags)
        total += length + 1
        if total > 255:
            raise MalformedQuery("name too long", qid, flags)
        labels.append(label)
        pos += length
    if pos + 4 > len(data):
        raise MalformedQuery("question has no type and class", qid, flags)
    qtype, qclass = struct.unpack("!HH", data[pos : pos + 4])
    pos += 4
    try:
        qname = ".".join(label.decode("ascii") for label in labels)
    except UnicodeDecodeError:
        qname = "\x00invalid"  # never a valid name: answered NXDOMAIN
    return DnsQuery(qid, flags, qname, qtype, qclass, data[12:pos])


def _response(query_id: int, flags: int, rcode: int, question: bytes, answers: list[bytes]) -> bytes:
    opcode = flags & 0x7800
    rd = flags & 0x0100
    out_flags = 0x8000 | opcode | 0x0400 | rd | 0x0080 | (rcode & 0xF)  # QR, AA, RD copied, RA
    header = struct.pack("!HHHHHH", query_id, out_flags, 1 if question else 0, len(answers), 0, 0)
    return header + question + b"".join(answers)


def _a_record(addr: ipaddress.IPv4Address) -> bytes:
    # 0xC00C points at the question's name, right after the 12-byte header.
    return struct.pack("!HHHIH", 0xC00C, QTYPE_A, QCLASS_IN, TTL, 4) + addr.packed


Logger = Callable[[dict[str, Any]], None]
NameCheck = Callable[[str], tuple[bool, str]]


def answer(
    data: bytes, allowed: NameCheck, fake_map: FakeAddressMap
) -> tuple[bytes | None, dict[str, Any] | None]:
    """The reply to one datagram and the audit fields describing it (None, None: drop silently)."""
    try:
        q = parse_query(data)
    except MalformedQuery as exc:
        if exc.query_id is None:
            return None, None
        reply = _response(exc.query_id, exc.flags, RCODE_FORMERR, b"", [])
        return reply, {"name": None, "decision": "refused", "reason": f"malformed: {exc}"}
    if (q.flags >> 11) & 0xF != 0:
        return _response(q.id, q.flags, RCODE_NOTIMP, q.question, []), {
            "name": q.qname,
            "decision": "refused",
            "reason": "not_a_query",
        }
    try:
        name = normalise_name(q.qname)
    except InvalidRequest:
        name = None
    info: dict[str, Any] = {"name": name or q.qname, "qtype": q.qtype}
    if name is None or q.qclass != QCLASS_IN:
        reply = _response(q.id, q.flags, RCODE_NXDOMAIN, q.question, [])
        return reply, {**info, "decision": "refused", "reason": "invalid_name"}
    ok, label = allowed(name)
    if not ok:
        reply = _response(q.id, q.flags, RCODE_NXDOMAIN, q.question, [])
        return reply, {**info, "decision": "refused", "reason": label}
    if q.qtype != QTYPE_A:
        return _response(q.id, q.flags, RCODE_NOERROR, q.question, []), {
            **info,
            "decision": "allowed",
            "rule": label,
            "address": None,
        }
    try:
        addr = fake_map.address_for(name)
    except PoolExhausted:
        reply = _response(q.id, q.flags, RCODE_SERVFAIL, q.question, [])
        return reply, {**info, "decision": "refused", "reason": "pool_exhausted"}
    reply = _response(q.id, q.flags, RCODE_NOERROR, q.question, [_a_record(addr)])
    return reply, {**info, "decision": "allowed", "rule": label, "address": str(addr)}


class DnsStubProtocol(asyncio.DatagramProtocol):
    def __init__(self, allowed: NameCheck, fake_map: FakeAddressMap, on_answer: Logger) -> None:
        self.allowed = allowed
        self.fake_map = fake_map
        self.on_answer = on_answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            reply, info = answer(data, self.allowed, self.fake_map)
        except Exception:  # a bug here must cost one answer, not the server
            log.exception("DNS stub failed on a query")
            return
        if reply is not None and self.transport is not None:
            try:
                self.transport.sendto(reply, addr)
            except OSError:
                log.debug("DNS reply to %r failed", addr, exc_info=True)
        if info is not None:
            try:
                self.on_answer(info)
            except Exception:
                log.exception("DNS audit logging failed")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from a client that went away: not our problem, keep serving.
        log.debug("DNS stub socket error: %s", exc)


def build_query(name: str, qtype: int = QTYPE_A, query_id: int = 0x1234) -> bytes:
    """A standard recursive query (for tests and health checks)."""
    q = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".")) + b"\x00"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, QCLASS_IN)


def parse_response(data: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A-record addresses) of a reply from this stub (simple parser for tests)."""
    qid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    pos = 12
    for _ in range(qd):
        while data[pos] != 0:
            pos += data[pos] + 1
        pos += 5
    addrs: list[str] = []
    for _ in range(an):
        if data[pos] & 0xC0:
            pos += 2
        else:
            while data[pos] != 0:
                pos += data[pos] + 1
            pos += 1
        rtype, _rclass, _ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        if rtype == QTYPE_A and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[pos : pos + 4]))
        pos += rdlen
    return qid, flags & 0xF, addrs
