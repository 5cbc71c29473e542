"""Network escapes: TCP, UDP and DNS to host loopback listeners (IPv4 and IPv6), raw, packet and ICMP
sockets, pathname and abstract unix sockets of host daemons (the ``docker.sock`` class of breaks of
sandbox-runtime and bubblewrap wrappers), and the host's loopback through the egress gateway of a limited
policy, spelled every way a parser might get wrong.

Only loopback is ever a target: a backend that leaks sends nothing beyond this host.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
from pathlib import Path

from ...models import NetworkPolicy, SandboxSpec
from ..canaries import HostListener
from ..context import CaseContext, Finding, case, conforms, escaped, overrefused
from ._canaries import HostUdpListener, HostUnixListener
from ._declared import declared_absent
from ._support import CANARY_TARGET, gated, mount, mounted_paths, need_python, require, run_py, scratch

__all__: list[str] = []

ALLOWED_NAME = "escape-allowed.invalid"


def _v6() -> bool:
    return HostListener.ipv6_loopback_available()


async def _deny_all(ctx: CaseContext, **fields: object) -> SandboxSpec:
    spec = ctx.spec(network_policy=NetworkPolicy.deny_all(), **fields)
    await gated(ctx, spec, "a deny-all network policy")
    return spec


_TCP = """
import socket
out = {}
for host, port in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection((host, port), timeout=3)
        data = s.recv(64)
        s.close()
        out["%s:%s" % (host, port)] = "connected " + data.decode(errors="replace").strip()
    except OSError as e:
        out["%s:%s" % (host, port)] = "error: " + str(e)
emit({"tcp": out})
"""


def _listeners(ctx: CaseContext) -> list[HostListener]:
    listeners = [ctx.listener("127.0.0.1"), ctx.listener("127.0.0.2")]
    if _v6():
        listeners.append(ctx.listener("::1"))
    return listeners


@case("escape.net.tcp_loopback")
async def tcp_loopback(ctx: CaseContext) -> Finding:
    """Under deny-all, host TCP listeners on 127.0.0.1, 127.0.0.2 and ::1 are unreachable (also as
    ``localhost``)."""
    spec = await _deny_all(ctx)
    listeners = _listeners(ctx)
    targets = [[lst.address, lst.port] for lst in listeners] + [["localhost", listeners[0].port]]
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _TCP, json.dumps(targets))
    hits = [f"{lst.address}:{lst.port} from {lst.peers}" for lst in listeners if lst.connections]
    if hits:
        return escaped(f"host listeners reached under deny-all: {hits} ({found.get('tcp')})")
    require(len(found.get("tcp", {})) == len(targets), "the TCP probe did not try every target", result)
    return conforms(f"no host listener reached: {found['tcp']}")


_UDP = """
import socket
out = {}
payload = sys.argv[2].encode()
for host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                s.sendto(payload, (host, port))
        out["%s:%s" % (host, port)] = "sent"
    except OSError as e:
        out["%s:%s" % (host, port)] = "error: " + str(e)
emit({"udp": out})
"""


def _udp_listeners(ctx: CaseContext) -> list[HostUdpListener]:
    listeners = [HostUdpListener("127.0.0.1")]
    if _v6():
        listeners.append(HostUdpListener("::1"))
    for listener in listeners:
        ctx.on_cleanup(listener.close)
    return listeners


@case("escape.net.udp_loopback")
async def udp_loopback(ctx: CaseContext) -> Finding:
    """Under deny-all, UDP datagrams to host sockets on 127.0.0.1 and ::1 never arrive."""
    spec = await _deny_all(ctx)
    listeners = _udp_listeners(ctx)
    payload = "stockade-udp-" + secrets.token_hex(8)
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _UDP,
                                     json.dumps([[u.address, u.port] for u in listeners]), payload)
    arrived = [f"{u.address}:{u.port}" for u in listeners if any(payload in h for h in u.hits)]
    if arrived:
        return escaped(f"datagrams from the guest arrived at {arrived}")
    require("udp" in found, "the UDP probe did not run", result)
    return conforms(f"nothing arrived; the guest saw {found['udp']}")


def _dns_query(name: str) -> bytes:
    header = struct.pack(">HHHHHH", secrets.randbelow(65536), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack(">HH", 1, 1)


_DNS = """
import socket, base64
query = base64.b64decode(sys.argv[2])
out = {}
for host, port, proto in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    key = "%s %s:%s" % (proto, host, port)
    try:
        if proto == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.sendto(query, (host, port))
        else:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(len(query).to_bytes(2, "big") + query)
        out[key] = "sent"
    except OSError as e:
        out[key] = "error: " + str(e)
emit({"dns": out})
"""


@case("escape.net.dns_loopback")
async def dns_loopback(ctx: CaseContext) -> Finding:
    """Under deny-all, a DNS query (UDP and TCP, IPv4 and IPv6) to a resolver on the host's loopback never
    arrives: the name in it is a canary."""
    spec = await _deny_all(ctx)
    udp = _udp_listeners(ctx)
    tcp = _listeners(ctx)
    name = f"q{secrets.token_hex(6)}.escape.test"
    targets = [[u.address, u.port, "udp"] for u in udp] + [[t.address, t.port, "tcp"] for t in tcp]
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _DNS, json.dumps(targets),
                                     base64.b64encode(_dns_query(name)).decode())
    label = name.split(".")[0]
    arrived = [f"udp {u.address}" for u in udp if any(label in h for h in u.hits)]
    arrived += [f"tcp {t.address}" for t in tcp if t.connections]
    if arrived:
        return escaped(f"DNS queries from the guest reached host resolvers: {arrived}")
    require("dns" in found, "the DNS probe did not run", result)
    return conforms(f"no query for {name} arrived ({len(targets)} resolvers)")


_RAW = """
import socket
attempts = {
    "inet raw icmp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "inet raw ipproto_raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "inet6 raw icmpv6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
    "inet dgram icmp (ping)": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "inet6 dgram icmpv6 (ping)": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6),
    "packet raw": (getattr(socket, "AF_PACKET", 17), socket.SOCK_RAW, 0x0300),
    "packet dgram": (getattr(socket, "AF_PACKET", 17), socket.SOCK_DGRAM, 0x0300),
}
out = {}
for name, args in attempts.items():
    try:
        s = socket.socket(*args)
    except OSError as e:
        out[name] = "error: " + str(e.strerror or e)
        continue
    out[name] = "created"
    s.close()
def control(make):
    try:
        for s in make():
            s.close()
        return "ok"
    except OSError as e:
        return "error: " + str(e)
emit({"sockets": out, "control": control(lambda: [socket.socket(socket.AF_INET, socket.SOCK_STREAM)]),
      "control_pair": control(socket.socketpair)})
"""


@case("escape.net.raw_packet_icmp")
async def raw_packet_icmp(ctx: CaseContext) -> Finding:
    """No raw or packet socket can be created under deny-all, nor those or an ICMP (ping) socket under a
    limited policy where the backend offers one; an ordinary TCP socket can (control). A backend without a
    private loopback (``private_loopback`` false) refuses every IP socket under deny-all, ping sockets included
    (they would use the host's network); its control there is a socketpair."""
    own_loopback = ctx.caps.private_loopback
    specs = [("deny-all", await _deny_all(ctx))]
    if ctx.caps.network_policy:
        specs.append(("limited", ctx.spec(network_policy=NetworkPolicy.limited(f"{ALLOWED_NAME}:443"))))
    created: dict[str, list[str]] = {}
    seen = {}
    for label, spec in specs:
        async with ctx.session(spec) as session:
            await need_python(ctx, session.id)
            found, result = await run_py(ctx, session.id, _RAW)
        seen[label] = found.get("sockets", {})
        # An ICMP "ping" socket needs no privilege and, in the empty namespace of deny-all, reaches only the
        # guest's own loopback; raw and packet sockets need CAP_NET_RAW, which no guest may hold.
        created[label] = [n for n, o in seen[label].items()
                          if o == "created" and (label != "deny-all" or "(ping)" not in n or not own_loopback)]
        if label == "deny-all" and not own_loopback:
            if found.get("control_pair") != "ok":
                return overrefused(f"not even a socketpair can be created ({label}): {found.get('control_pair')}")
        elif found.get("control") != "ok":
            return overrefused(f"an ordinary TCP socket cannot be created ({label}): {found.get('control')}")
        require(bool(seen[label]), "the socket probe did not run", result)
    if any(created.values()):
        return escaped(f"privileged sockets created: {created}")
    return conforms(f"refused under {', '.join(seen)}: {seen['deny-all']}")


_UNIX = """
import socket
out = {}
for path in json.loads(sys.argv[1]):
    key = path.replace("\\0", "@")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(path)
            out[key] = "connected " + s.recv(64).decode(errors="replace").strip()
    except OSError as e:
        out[key] = "error: " + str(e.strerror or e)
emit({"unix": out})
"""


def _daemon(ctx: CaseContext, **where: object) -> HostUnixListener:
    listener = HostUnixListener(**where)  # type: ignore[arg-type]
    ctx.on_cleanup(listener.close)
    return listener


@case("escape.net.unix_pathname")
async def unix_pathname(ctx: CaseContext) -> Finding:
    """Host daemons' pathname unix sockets outside every mount (in a host directory and in the host's /tmp)
    are unreachable: by path, and through ``/proc/<pid>/root``."""
    spec = await _deny_all(ctx)
    directory = ctx.host_dir(0o755)
    daemons = [_daemon(ctx, path=directory / "daemon.sock"),
               _daemon(ctx, path=Path("/tmp") / f"stockade-escape-{secrets.token_hex(6)}.sock")]
    paths = []
    for d in daemons:
        assert d.path is not None
        paths += [str(d.path), f"/proc/1/root{d.path}", f"/proc/self/root{d.path}"]
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _UNIX, json.dumps(paths))
    hits = [str(d.path) for d in daemons if d.count]
    if hits:
        return escaped(f"host daemon sockets reached: {hits} ({found.get('unix')})")
    require(len(found.get("unix", {})) == len(paths), "the unix-socket probe did not try every path", result)
    return conforms(f"{len(paths)} routes to {len(daemons)} host daemon sockets failed")


@case("escape.net.unix_abstract")
async def unix_abstract(ctx: CaseContext) -> Finding:
    """A host daemon listening on an abstract unix socket (the X11 and D-Bus kind) is unreachable under
    deny-all."""
    spec = await _deny_all(ctx)
    daemon = _daemon(ctx, abstract=f"stockade-escape-{secrets.token_hex(8)}")
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _UNIX, json.dumps(["\0" + str(daemon.abstract)]))
    if daemon.count:
        return escaped(f"the host's abstract socket @{daemon.abstract} was reached: {found.get('unix')}")
    require(bool(found.get("unix")), "the abstract-socket probe did not run", result)
    return conforms(f"@{daemon.abstract} unreachable: {found['unix']}")


@case("escape.net.unix_in_ro_mount")
async def unix_in_ro_mount(ctx: CaseContext) -> Finding:
    """A host daemon's socket inside a directory mounted read-only is not a way out under deny-all: a
    read-only mount grants reading files, not talking to the daemons whose sockets sit there (connect() on a
    socket ignores the mount's read-only flag, so this needs its own defence)."""
    directory = ctx.host_dir(0o755)
    daemon = _daemon(ctx, path=directory / "daemon.sock")
    (directory / "readme.txt").write_text("visible\n")
    m = mount(directory, CANARY_TARGET)
    spec = await _deny_all(ctx, mounts=(m,))
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        ro = (await mounted_paths(ctx, session))[CANARY_TARGET]
        found, result = await run_py(ctx, session.id, _UNIX, json.dumps([f"{ro}/daemon.sock"]))
        listing = await ctx.sh(session.id, f"ls {ro}")
    if daemon.count:
        return escaped(f"the host daemon socket {daemon.path}, mounted read-only at {CANARY_TARGET}, answered the "
                       f"guest: {found.get('unix')}")
    require("readme.txt" in listing.stdout, "the read-only mount was not visible", listing)
    require(bool(found.get("unix")), "the probe did not run", result)
    return conforms(f"the socket is visible but refuses the guest: {found['unix']}")


_LOCAL = """
import socket, threading
out = {}
def serve(srv):
    conn, _ = srv.accept()
    conn.sendall(b"pong")
    conn.close()
def roundtrip(family, address):
    if family == socket.AF_UNIX and not address.startswith("\\0"):
        # Relative to the directory: a long $TMPDIR must not hit the 108-byte limit of sun_path.
        os.makedirs(os.path.dirname(address), exist_ok=True)
        os.chdir(os.path.dirname(address))
        address = os.path.basename(address)
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind(address)
    srv.listen(1)
    t = threading.Thread(target=serve, args=(srv,))
    t.start()
    c = socket.socket(family, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(srv.getsockname() if family != socket.AF_UNIX else address)
    data = c.recv(4)
    t.join()
    c.close()
    srv.close()
    return data.decode()
cases = {"tcp4": (socket.AF_INET, ("127.0.0.1", 0)), "unix path": (socket.AF_UNIX, sys.argv[2]),
         "unix abstract": (socket.AF_UNIX, "\\0" + os.path.basename(sys.argv[2]))}
if sys.argv[1] == "v6":
    cases["tcp6"] = (socket.AF_INET6, ("::1", 0))
for name, (family, address) in cases.items():
    try:
        out[name] = roundtrip(family, address)
    except OSError as e:
        out[name] = "error: " + str(e)
try:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.sendto(b"pong", a.getsockname())
    a.settimeout(5)
    out["udp4"] = a.recv(4).decode()
except OSError as e:
    out["udp4"] = "error: " + str(e)
emit({"local": out})
"""


@case("escape.net.guest_local_admitted")
async def guest_local_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: inside a deny-all guest, its own loopback (TCP, UDP, IPv6 where the host has it) and
    its own unix sockets (pathname and abstract) work."""
    spec = await _deny_all(ctx)
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, _result = await run_py(ctx, session.id, _LOCAL, "v6" if _v6() else "v4", scratch(ctx))
    local: dict[str, str] = found.get("local", {})
    broken = {k: v for k, v in local.items() if v != "pong"}
    if broken and local:
        declared = declared_absent(ctx, "private_loopback", f"refused: {broken}; working: "
                                   f"{sorted(set(local) - set(broken)) or 'none'}")
        if declared is not None:
            return declared
    if broken or not local:
        return overrefused(f"the guest's own local networking is broken: {broken or local}")
    return conforms(f"{', '.join(local)} round trips inside the guest work")


_PROXY = """
import socket
from urllib.parse import urlsplit
targets = json.loads(sys.argv[1])
out = {}
def via_http(proxy, host, port):
    u = urlsplit(proxy)
    s = socket.create_connection((u.hostname, u.port or 80), timeout=5)
    h = host if ":" not in host else "[%s]" % host
    s.sendall(("CONNECT %s:%d HTTP/1.1\\r\\nHost: %s:%d\\r\\n\\r\\n" % (h, port, h, port)).encode())
    data = s.recv(256)
    s.close()
    return data.decode(errors="replace").split("\\r\\n")[0]
def via_socks(proxy, host, port):
    u = urlsplit(proxy)
    s = socket.create_connection((u.hostname, u.port or 1080), timeout=5)
    s.sendall(b"\\x05\\x01\\x00")
    s.recv(2)
    name = host.encode()
    s.sendall(b"\\x05\\x01\\x00\\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    reply = s.recv(10)
    s.close()
    return "socks reply %s" % (reply[1] if len(reply) > 1 else "none")
def direct(host, port):
    s = socket.create_connection((host, port), timeout=3)
    s.close()
    return "connected"
http = os.environ.get("HTTPS_PROXY") or os.environ.get("HTTP_PROXY") or os.environ.get("https_proxy")
socks = os.environ.get("ALL_PROXY") or os.environ.get("all_proxy")
for host, port in targets:
    for kind, fn in (("http", via_http if http else None), ("socks", via_socks if socks else None),
                     ("direct", direct)):
        if fn is None:
            continue
        try:
            out["%s %s:%s" % (kind, host, port)] = fn(http if kind == "http" else socks, host, port) \\
                if kind != "direct" else fn(host, port)
        except OSError as e:
            out["%s %s:%s" % (kind, host, port)] = "error: " + str(e)
emit({"attempts": out, "proxies": [http, socks]})
"""


@case("escape.net.limited_loopback")
async def limited_loopback(ctx: CaseContext) -> Finding:
    """Under a limited policy (one allowed name), the host's loopback listeners stay unreachable through the
    gateway's HTTP and SOCKS proxies and directly, however the address is spelled (localhost, 127.1,
    2130706433, 0x7f000001, 0.0.0.0, ::ffff:127.0.0.1, [::1])."""
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{ALLOWED_NAME}:443"))
    await gated(ctx, spec, "a limited network policy")
    listeners = _listeners(ctx)
    port = listeners[0].port
    spellings = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "0.0.0.0", "::ffff:127.0.0.1"]
    targets = [[s, port] for s in spellings] + [[lst.address, lst.port] for lst in listeners[1:]]
    async with ctx.session(spec) as session:
        await need_python(ctx, session.id)
        found, result = await run_py(ctx, session.id, _PROXY, json.dumps(targets), timeout=60)
    hits = [f"{lst.address}:{lst.port} from {lst.peers}" for lst in listeners if lst.connections]
    if hits:
        return escaped(f"host loopback reached under a limited policy: {hits}; {found.get('attempts')}")
    require(bool(found.get("attempts")), "the probe made no attempt", result)
    return conforms(f"{len(found['attempts'])} attempts (proxies {found.get('proxies')}) never reached the host")

