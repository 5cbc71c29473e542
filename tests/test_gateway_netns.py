"""The plumbing end to end: listeners bound inside an empty network namespace, served from the host one.

A child process unshares a network namespace (only ``lo``), binds the guest-side listeners there (HTTP proxy
on 127.0.0.1:3128, a transparent listener on 0.0.0.0:PORT, the DNS stub on 127.0.0.53:53), hands the fds over
SCM_RIGHTS and closes its copies; the gateway serves them from the test's (host) namespace and dials the fake
upstream on 127.0.0.2. The child then acts as a guest. No packet leaves loopback: the guest namespace has no
route anywhere, and the gateway's connector refuses anything but loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

import stockade
from stockade.gateway.audit import AuditLog
from stockade.gateway.dns import FakeAddressMap
from stockade.gateway.policy import GatewayPolicy
from stockade.gateway.resolver import StaticResolver
from stockade.gateway.server import Gateway

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a network namespace needs root here"),
]

SRC = str(Path(stockade.__file__).resolve().parents[1])

GUEST = r"""
import ctypes, json, socket, subprocess, sys
from stockade.gateway.dns import build_query, parse_response

libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
    print(json.dumps({"error": f"unshare errno {ctypes.get_errno()}"}))
    sys.exit(3)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
chan = socket.socket(fileno=int(sys.argv[1]))
port = int(sys.argv[2])
http = socket.socket(); http.bind(("127.0.0.1", 3128)); http.listen(16)
tp = socket.socket(); tp.bind(("0.0.0.0", port)); tp.listen(16)
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.bind(("127.0.0.53", 53))
socket.send_fds(chan, [b"fds"], [http.fileno(), tp.fileno(), dns.fileno()])
for s in (http, tp, dns):
    s.close()
chan.settimeout(20)
assert chan.recv(2) == b"go"
out = {}

def resolve(name):
    q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    q.settimeout(5)
    q.sendto(build_query(name), ("127.0.0.53", 53))
    _id, rcode, addrs = parse_response(q.recv(512))
    return rcode, addrs

def talk(addr, data=b"hi"):
    c = socket.create_connection(addr, timeout=5)
    c.sendall(data)
    try:
        return c.recv(100).decode() or "closed"
    except ConnectionResetError:
        return "closed"

out["dns_allowed"] = resolve("allowed.test")
out["dns_other"] = resolve("other.test")
out["transparent"] = talk((out["dns_allowed"][1][0], port))
# A real address inside the guest lands on the transparent listener too, and is refused there.
out["direct_ip"] = talk(("127.0.0.2", port))
c = socket.create_connection(("127.0.0.1", 3128), timeout=5)
c.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += c.recv(1)
c.sendall(b"via-proxy")
out["proxy"] = [head.split(b" ")[1].decode(), c.recv(100).decode()]
print(json.dumps(out))
"""


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _loopback_only(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert host.startswith("127."), host
    return await asyncio.open_connection(host, port)


def test_guest_netns_listeners_served_from_host(tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        echo = await asyncio.start_server(_echo, "127.0.0.2", 0)
        port = echo.sockets[0].getsockname()[1]
        parent, child = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            GUEST,
            str(child.fileno()),
            str(port),
            pass_fds=[child.fileno()],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        child.close()
        gw = Gateway(
            "netns",
            GatewayPolicy("limited", [f"allowed.test:{port}", f"127.0.0.2:{port}"]),
            StaticResolver({"allowed.test": "127.0.0.2"}),
            AuditLog(tmp_path / "audit.jsonl"),
            fake_map=FakeAddressMap(),
            connector=_loopback_only,
        )
        try:
            parent.settimeout(20)
            loop = asyncio.get_running_loop()
            _msg, fds, _flags, _addr = await loop.run_in_executor(None, socket.recv_fds, parent, 16, 3)
            assert len(fds) == 3, await proc.communicate()
            http, tp, dns = (socket.socket(fileno=fd) for fd in fds)
            await gw.serve_http_proxy(http)
            await gw.serve_transparent(tp)
            await gw.serve_dns(dns)
            parent.sendall(b"go")
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            result: dict[str, Any] = json.loads(out)
            return result
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await gw.aclose()
            echo.close()
            parent.close()

    result = asyncio.run(go())
    assert result["dns_allowed"] == [0, ["127.100.0.1"]]
    assert result["dns_other"] == [3, []]
    assert result["transparent"] == "hi"
    assert result["direct_ip"] == "closed"
    assert result["proxy"] == ["200", "via-proxy"]
