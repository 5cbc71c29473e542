"""Name resolution for the gateway: injectable, so tests never touch real DNS."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from stockade.hostpatterns import IPAddress, normalise_name

__all__ = [
    "RecordingResolver",
    "ResolveError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "UpstreamResolver",
]


class ResolveError(Exception):
    """The name has no usable address (unknown name, resolver failure or timeout)."""


@runtime_checkable
class Resolver(Protocol):
    async def resolve(self, name: str) -> list[IPAddress]:
        """All addresses of ``name`` in preference order; raises ``ResolveError`` when there are none."""
        ...


class StaticResolver:
    """A fixed name -> addresses map (names normalised); unknown names fail."""

    def __init__(self, mapping: Mapping[str, str | IPAddress | Iterable[str | IPAddress]]) -> None:
        table: dict[str, list[IPAddress]] = {}
        for name, value in mapping.items():
            values: Iterable[str | IPAddress]
            values = [value] if isinstance(value, str | ipaddress.IPv4Address | ipaddress.IPv6Address) else value
            table[normalise_name(name)] = [ipaddress.ip_address(v) for v in values]
        self._table = table

    async def resolve(self, name: str) -> list[IPAddress]:
        addrs = self._table.get(normalise_name(name))
        if not addrs:
            raise ResolveError(f"no address for {name!r}")
        return list(addrs)


class RecordingResolver:
    """Wraps a resolver and remembers every name asked for (tests use it to prove what never reached DNS)."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def resolve(self, name: str) -> list[IPAddress]:
        self.calls.append(name)
        return await self.inner.resolve(name)


class SystemResolver:
    """The host's resolver through ``getaddrinfo`` (runs in the loop's thread pool)."""

    def __init__(self, timeout: float = 10.0, family: int = socket.AF_UNSPEC) -> None:
        self.timeout = timeout
        self.family = family

    async def resolve(self, name: str) -> list[IPAddress]:
        name = normalise_name(name)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, family=self.family, type=socket.SOCK_STREAM), self.timeout
            )
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {name!r}: {exc}") from exc
        out: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            try:
                addr = ipaddress.ip_address(sockaddr[0])
            except ValueError:
                continue
            if addr not in out:
                out.append(addr)
        if not out:
            raise ResolveError(f"no address for {name!r}")
        return out


class UpstreamResolver:
    """Asks one DNS server directly over UDP for A records (the gateway's own resolver, tests' fake upstream).

    Only names the policy already admitted are ever asked for: the gateway decides before it resolves.
    """

    def __init__(self, server: str, port: int = 53, timeout: float = 5.0) -> None:
        self.server = str(ipaddress.ip_address(server))
        self.port = port
        self.timeout = timeout

    async def resolve(self, name: str) -> list[IPAddress]:
        from stockade.gateway.dns import build_query, parse_response

        name = normalise_name(name)
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        query_id = int.from_bytes(os.urandom(2), "big")
        try:
            await loop.sock_connect(sock, (self.server, self.port))
            await loop.sock_sendall(sock, build_query(name, query_id=query_id))
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), self.timeout)
                got_id, rcode, addrs = parse_response(data)
                if got_id == query_id:
                    break
        except (OSError, TimeoutError, ValueError, IndexError, struct.error) as exc:
            raise ResolveError(f"cannot resolve {name!r} at {self.server}:{self.port}: {exc}") from exc
        finally:
            sock.close()
        if rcode != 0 or not addrs:
            raise ResolveError(f"no address for {name!r} (rcode {rcode})")
        return [ipaddress.ip_address(a) for a in addrs]
