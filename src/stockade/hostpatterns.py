"""Host patterns of a limited network policy: parsing, normalisation and matching.

Accepted syntax (anything else is ``InvalidRequest(field="allowed_hosts")`` with a message naming the rule)::

    github.com            a name; without a port it allows 80 and 443
    github.com:8443       a name and one port
    *.github.com          any name strictly below github.com (at least two labels after the star)
    *.github.com:22       the same, one port
    10.1.2.3              an IPv4 address (80 and 443)
    10.1.2.3:8080         an IPv4 address and one port
    192.0.2.0/24          an IPv4 network
    192.0.2.0/24:8080     an IPv4 network and one port (the last ":" is the port)
    2001:db8::1           a bare IPv6 address (80 and 443); bare IPv6 never carries a port
    [2001:db8::1]         the same, bracketed
    [2001:db8::1]:8443    an IPv6 address and one port (brackets are required to give a port)
    2001:db8::/32         an IPv6 network; ``[2001:db8::/32]:443`` with a port

Names are compared in IDNA ASCII form, lowercase, without a trailing dot. Network patterns must have no host
bits set (``192.0.2.1/24`` is refused rather than silently widened).
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from stockade.errors import InvalidRequest

__all__ = [
    "DEFAULT_PORTS",
    "HostPattern",
    "HostRules",
    "IPAddress",
    "IPNetwork",
    "normalise_name",
    "parse_host_pattern",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})

_FIELD = "allowed_hosts"
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_NAME = 253
_MAX_LABEL = 63


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message, field=_FIELD)


def _label_to_ascii(label: str, whole: str) -> str:
    if label.isascii():
        return label.lower()
    try:
        # Stdlib IDNA 2003 (nameprep + punycode): no extra dependency, and it lowercases non-ASCII labels.
        return encodings.idna.ToASCII(label).decode("ascii").lower()
    except UnicodeError as exc:
        raise _fail(f"{whole!r} has a label that is not valid IDNA: {label!r} ({exc})") from exc


def normalise_name(name: str) -> str:
    """Return ``name`` in IDNA ASCII form, lowercase, without a trailing dot; ``InvalidRequest`` on junk."""
    if not isinstance(name, str) or not name:
        raise _fail("host name is empty")
    _check_characters(name)
    stripped = name[:-1] if name.endswith(".") else name
    if not stripped:
        raise _fail("host name is empty")
    labels = stripped.split(".")
    out: list[str] = []
    for label in labels:
        if not label:
            raise _fail(f"{name!r} has an empty label")
        ascii_label = _label_to_ascii(label, name)
        if len(ascii_label) > _MAX_LABEL:
            raise _fail(f"{name!r} has a label longer than {_MAX_LABEL} characters")
        if ascii_label.startswith("-") or ascii_label.endswith("-"):
            raise _fail(f"{name!r} has a label that starts or ends with '-'")
        if not _LABEL_RE.match(ascii_label):
            raise _fail(f"{name!r} has characters other than letters, digits and '-' in label {label!r}")
        out.append(ascii_label)
    result = ".".join(out)
    if len(result) > _MAX_NAME:
        raise _fail(f"{name!r} is longer than {_MAX_NAME} characters")
    # An all-numeric last label or an inet_aton form ("127.1", "0x7f.1") would be read as an address by the C
    # resolver: refuse it as a name so an address can never sneak past address rules dressed as a name.
    if out[-1].isdigit() or _is_aton_form(result):
        raise _fail(f"{name!r} looks like a numeric address, not a host name")
    return result


def _is_aton_form(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return True


def _check_characters(text: str) -> None:
    if "\x00" in text:
        raise _fail(f"{text!r} contains a NUL character")
    if any(ch.isspace() for ch in text):
        raise _fail(f"{text!r} contains whitespace")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise _fail(f"{text!r} contains a control character")


def _parse_port(text: str, whole: str) -> int:
    if not text:
        raise _fail(f"{whole!r} has an empty port after ':'")
    if not (text.isascii() and text.isdigit()):
        raise _fail(f"{whole!r} has a non-numeric port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _fail(f"{whole!r} has port {port} outside 1-65535")
    return port


@dataclass(frozen=True)
class HostPattern:
    """One parsed allowlist entry; build it with :func:`parse_host_pattern`."""

    kind: Literal["name", "wildcard", "address", "network"]
    host: str
    ports: frozenset[int]
    text: str

    def matches_name(self, name: str, port: int) -> bool:
        """True when this name or wildcard rule allows ``name:port`` (address rules never match names)."""
        if self.kind not in ("name", "wildcard") or port not in self.ports:
            return False
        try:
            norm = normalise_name(name)
        except InvalidRequest:
            return False
        return self._matches_normalised(norm)

    def _matches_normalised(self, norm: str) -> bool:
        if self.kind == "name":
            return norm == self.host
        if self.kind == "wildcard":
            return norm.endswith("." + self.host)
        return False

    def matches_address(self, addr: IPAddress, port: int) -> bool:
        """True when this address or network rule allows ``addr:port`` (name rules never match addresses)."""
        if self.kind not in ("address", "network") or port not in self.ports:
            return False
        addr = _unmap(addr)
        if self.kind == "address":
            return addr == ipaddress.ip_address(self.host)
        network = ipaddress.ip_network(self.host)
        return addr.version == network.version and addr in network


def _unmap(addr: IPAddress) -> IPAddress:
    # ::ffff:a.b.c.d is the same destination as a.b.c.d; match rules on the address actually reached.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _address_text(addr: IPAddress | IPNetwork, port: int | None) -> str:
    if port is None:
        return str(addr)
    if addr.version == 6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def _parse_ip(host: str, whole: str, version: int | None) -> tuple[Literal["address", "network"], str]:
    """Parse an address or CIDR; ``version`` restricts it (6 inside brackets)."""
    if "/" in host:
        addr_part, _, prefix = host.partition("/")
        try:
            base = ipaddress.ip_address(addr_part)
        except ValueError as exc:
            raise _fail(f"{whole!r} has a path or a bad network address (paths are not allowed)") from exc
        if version is not None and base.version != version:
            raise _fail(f"{whole!r}: brackets are only for IPv6 addresses")
        if isinstance(base, ipaddress.IPv6Address) and base.ipv4_mapped is not None:
            raise _fail(f"{whole!r} is an IPv4-mapped IPv6 network; write it in IPv4 form")
        if not (prefix.isascii() and prefix.isdigit()):
            raise _fail(f"{whole!r} has an invalid prefix length {prefix!r}")
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                raise _fail(f"{whole!r} has host bits set after the prefix length") from exc
            raise _fail(f"{whole!r} has an invalid prefix length {prefix!r}") from exc
        return "network", str(network)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise _fail(f"{whole!r} is not a valid IP address") from exc
    if version is not None and addr.version != version:
        raise _fail(f"{whole!r}: brackets are only for IPv6 addresses")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        raise _fail(f"{whole!r} has an IPv6 zone index, which is not allowed")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # Connections are decided on the plain IPv4 address, so a mapped rule could never match: say so.
        raise _fail(f"{whole!r} is an IPv4-mapped IPv6 address; write the IPv4 form {addr.ipv4_mapped}")
    return "address", str(addr)


def parse_host_pattern(text: str) -> HostPattern:
    """Parse one ``allowed_hosts`` entry (syntax in the module docstring)."""
    if not isinstance(text, str):
        raise _fail(f"a host pattern must be a string, not {type(text).__name__}")
    if not text:
        raise _fail("empty host pattern")
    _check_characters(text)
    if _SCHEME_RE.match(text) or "://" in text:
        raise _fail(f"{text!r} has a URL scheme; give only the host (and optional :port)")
    if "@" in text:
        raise _fail(f"{text!r} has user info ('@'); give only the host (and optional :port)")
    if any(ch in text for ch in "?#\\"):
        raise _fail(f"{text!r} looks like a URL (query, fragment or backslash); give only the host")

    port: int | None = None
    # Bracketed IPv6 (address or network), optionally followed by :port.
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _fail(f"{text!r} has '[' without a matching ']'")
        inner, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _fail(f"{text!r} has junk after ']' (expected ':port')")
            port = _parse_port(rest[1:], text)
        if "*" in inner:
            raise _fail(f"{text!r}: wildcards are only allowed as '*.' at the start of a name")
        kind, host = _parse_ip(inner, text, 6)
        return _ip_pattern(kind, host, port)
    if "]" in text:
        raise _fail(f"{text!r} has ']' without a matching '['")

    # Two or more colons: a bare IPv6 address or network, which cannot carry a port.
    if text.count(":") >= 2:
        try:
            kind, host = _parse_ip(text, text, 6)
        except InvalidRequest as exc:
            if "IPv4-mapped" in str(exc):
                raise
            raise _fail(
                f"{text!r} is not a valid IPv6 address; to give a port write it as [address]:port"
            ) from exc
        return _ip_pattern(kind, host, None)

    host = text
    if ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _parse_port(port_text, text)
        if not host:
            raise _fail(f"{text!r} has a port but no host")

    if "/" in host:
        kind, canon = _parse_ip(host, text, None)
        return _ip_pattern(kind, canon, port)
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return _ip_pattern("address", str(addr), port)

    ports = frozenset({port}) if port is not None else DEFAULT_PORTS
    suffix_text = f":{port}" if port is not None else ""

    if "*" in host:
        if host == "*":
            raise _fail("a bare '*' is not allowed; use unrestricted mode or '*.domain.tld'")
        if not host.startswith("*.") or "*" in host[2:]:
            raise _fail(f"{text!r}: '*' is only allowed once, as the whole first label ('*.domain.tld')")
        suffix = normalise_name(host[2:])
        if suffix.count(".") < 1:
            raise _fail(f"{text!r}: a wildcard needs at least two labels after '*.' (e.g. '*.example.com')")
        return HostPattern("wildcard", suffix, ports, f"*.{suffix}{suffix_text}")

    name = normalise_name(host)
    return HostPattern("name", name, ports, f"{name}{suffix_text}")


def _ip_pattern(kind: Literal["address", "network"], host: str, port: int | None) -> HostPattern:
    ports = frozenset({port}) if port is not None else DEFAULT_PORTS
    obj: IPAddress | IPNetwork
    obj = ipaddress.ip_address(host) if kind == "address" else ipaddress.ip_network(host)
    return HostPattern(kind, host, ports, _address_text(obj, port))


class HostRules:
    """An immutable, ordered set of host patterns; lookups return the first rule that matches."""

    __slots__ = ("_addr", "_names", "_patterns")

    def __init__(self, patterns: Iterable[HostPattern | str]) -> None:
        parsed: list[HostPattern] = []
        seen: set[HostPattern] = set()
        for item in patterns:
            pattern = item if isinstance(item, HostPattern) else parse_host_pattern(item)
            if pattern not in seen:
                seen.add(pattern)
                parsed.append(pattern)
        self._patterns: tuple[HostPattern, ...] = tuple(parsed)
        self._names = tuple(p for p in parsed if p.kind in ("name", "wildcard"))
        self._addr = tuple(p for p in parsed if p.kind in ("address", "network"))

    @property
    def patterns(self) -> tuple[HostPattern, ...]:
        return self._patterns

    def __iter__(self) -> Iterator[HostPattern]:
        return iter(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HostRules) and set(self._patterns) == set(other._patterns)

    def __hash__(self) -> int:
        return hash(frozenset(self._patterns))

    def __repr__(self) -> str:
        return f"HostRules({[p.text for p in self._patterns]!r})"

    def match_name(self, name: str, port: int) -> HostPattern | None:
        for pattern in self._names:
            if pattern.matches_name(name, port):
                return pattern
        return None

    def match_address(self, addr: IPAddress, port: int) -> HostPattern | None:
        for pattern in self._addr:
            if pattern.matches_address(addr, port):
                return pattern
        return None

    def match_name_any_port(self, name: str) -> HostPattern | None:
        """The first name or wildcard rule matching ``name`` on whatever port (what DNS answers hinge on)."""
        try:
            norm = normalise_name(name)
        except InvalidRequest:
            return None
        for pattern in self._names:
            if pattern._matches_normalised(norm):
                return pattern
        return None

    def ports_for_name(self, name: str) -> frozenset[int]:
        """Union of the ports of every name rule matching ``name`` (empty when none does)."""
        try:
            norm = normalise_name(name)
        except InvalidRequest:
            return frozenset()
        ports: set[int] = set()
        for pattern in self._names:
            if pattern._matches_normalised(norm):
                ports |= pattern.ports
        return frozenset(ports)
