"""Which destination addresses the gateway refuses unless a rule names them explicitly.

``classify`` returns a short reason for every address that is not plainly on the public internet. Addresses
that carry an IPv4 address inside an IPv6 one are judged by the embedded address first (so
``::ffff:127.0.0.1`` is ``"loopback"``); the translation forms that a host cannot legitimately need to reach
directly (IPv4-mapped, IPv4-compatible, 6to4, Teredo) are refused even when the embedded address is public,
because the kernel or a relay would deliver them somewhere the address checks did not look. NAT64
(``64:ff9b::/96``) is the exception: it is how IPv6-only hosts reach public IPv4, so a NAT64 address with a
public embedded address is public. Documentation and benchmarking ranges are ``"reserved"``.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from stockade.hostpatterns import IPAddress

__all__ = ["REASONS", "classify", "embedded_ipv4", "is_public"]

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Order matters: the first match names the reason.
_V4_TABLE: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("169.254.0.0/16"), "link_local"),
    (_V4("100.64.0.0/10"), "cgnat"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),  # includes 255.255.255.255
    (_V4("192.0.0.0/24"), "reserved"),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), "reserved"),  # TEST-NET-1
    (_V4("198.51.100.0/24"), "reserved"),  # TEST-NET-2
    (_V4("203.0.113.0/24"), "reserved"),  # TEST-NET-3
    (_V4("198.18.0.0/15"), "reserved"),  # benchmarking
    (_V4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast
)

_V6_UNSPECIFIED = ipaddress.IPv6Address("::")
_V6_LOOPBACK = ipaddress.IPv6Address("::1")
_V6_MAPPED = _V6("::ffff:0:0/96")
_V6_COMPAT = _V6("::/96")
_V6_NAT64 = _V6("64:ff9b::/96")
_V6_6TO4 = _V6("2002::/16")
_V6_TEREDO = _V6("2001::/32")

_V6_TABLE: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = (
    (_V6("fe80::/10"), "link_local"),
    (_V6("fec0::/10"), "private"),  # deprecated site-local
    (_V6("fc00::/7"), "private"),  # unique local
    (_V6("ff00::/8"), "multicast"),
    (_V6("64:ff9b:1::/48"), "private"),  # local-use NAT64
    (_V6("::ffff:0:0:0/96"), "reserved"),  # SIIT
    (_V6("100::/64"), "reserved"),  # discard-only
    (_V6("2001:db8::/32"), "reserved"),  # documentation
    (_V6("3fff::/20"), "reserved"),  # documentation (RFC 9637)
    (_V6("2001:2::/48"), "reserved"),  # benchmarking
    (_V6("2001:10::/28"), "reserved"),  # ORCHID
    (_V6("2001:20::/28"), "reserved"),  # ORCHIDv2
    (_V6("5f00::/16"), "reserved"),  # SRv6 SIDs
)
_V6_GLOBAL_UNICAST = _V6("2000::/3")

REASONS: Final[frozenset[str]] = frozenset(
    {
        "unspecified",
        "loopback",
        "private",
        "link_local",
        "cgnat",
        "multicast",
        "reserved",
        "ipv4_mapped",
        "ipv4_compatible",
        "6to4",
        "teredo",
    }
)


def embedded_ipv4(addr: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address carried inside an IPv6 one, with the name of the form, or None."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr in _V6_MAPPED:
        return "ipv4_mapped", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _V6_NAT64:
        return "nat64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _V6_COMPAT and addr not in (_V6_UNSPECIFIED, _V6_LOOPBACK):
        return "ipv4_compatible", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _V6_6TO4:
        return "6to4", ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF)
    if addr in _V6_TEREDO:
        # Teredo stores the client's address inverted in the low 32 bits.
        return "teredo", ipaddress.IPv4Address((int(addr) & 0xFFFFFFFF) ^ 0xFFFFFFFF)
    return None


def _classify_v4(addr: ipaddress.IPv4Address) -> str | None:
    for network, reason in _V4_TABLE:
        if addr in network:
            return reason
    if not addr.is_global:
        return "reserved"
    return None


def classify(addr: IPAddress) -> str | None:
    """A refusal reason for a non-public address (see ``REASONS``), or None when the address is public."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _classify_v4(addr)
    if addr.scope_id:
        return "link_local"
    if addr == _V6_UNSPECIFIED:
        return "unspecified"
    if addr == _V6_LOOPBACK:
        return "loopback"
    embedded = embedded_ipv4(addr)
    if embedded is not None:
        form, v4 = embedded
        inner = _classify_v4(v4)
        if inner is not None:
            return inner
        return None if form == "nat64" else form
    for network, reason in _V6_TABLE:
        if addr in network:
            return reason
    if addr not in _V6_GLOBAL_UNICAST or not addr.is_global:
        return "reserved"
    return None


def is_public(addr: IPAddress) -> bool:
    return classify(addr) is None
