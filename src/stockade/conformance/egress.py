"""Egress allowlist cases (suite ``network``): what a ``limited`` policy lets through, judged at the upstream.

Every case needs ``ConformanceOptions.upstream_name`` / ``upstream_address`` (a name the backend's resolver maps
to a test listener address); without them it reports ``not_measured``. A backend without ``network_policy``
must refuse the spec (``expect_unsupported``). The canary is always what the host-side listener received, never
only what the guest says; each refusal has an admitted sibling in the same case.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading

import anyio

from ..errors import Unsupported
from ..models import NetworkPolicy
from .context import (
    CaseContext,
    Finding,
    Stop,
    case,
    conforms,
    escaped,
    not_applicable,
    not_measured,
    overrefused,
    probe_broken,
    show,
)

__all__: list[str] = []


class RecordingListener:
    """A TCP listener that keeps each connection open, echoes what it gets and records the bytes."""

    def __init__(self, address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((address, 0))
        self._sock.listen(32)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True, name="stockade-egress-upstream").start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.received)

    def data(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                index = len(self.received)
                self.received.append(b"")
            threading.Thread(target=self._handle, args=(conn, index), daemon=True).start()

    def _handle(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(1.0)
        with conn, contextlib.suppress(OSError):
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                with self._lock:
                    self.received[index] += data
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _upstream(ctx: CaseContext) -> tuple[str, str]:
    name, address = ctx.options.upstream_name, ctx.options.upstream_address
    if name is None or address is None:
        raise Stop(
            not_measured(
                "needs an upstream to measure egress against (ConformanceOptions.upstream_name and "
                "upstream_address: a name the backend resolves to a test listener address)"
            )
        )
    return name, address


def _recording(ctx: CaseContext, address: str) -> RecordingListener:
    listener = RecordingListener(address)
    ctx._cleanups.append(listener.close)
    return listener


async def _limited_or_refused(ctx: CaseContext) -> Finding | None:
    """None when the backend claims allowlists; else the verdict on its refusal of one."""
    if ctx.caps.network_policy:
        return None
    spec = ctx.spec(network_policy=NetworkPolicy.limited("example.test"))
    return await ctx.expect_unsupported(spec, "a limited network policy")


async def _python(ctx: CaseContext, session_id: str) -> None:
    tools = await ctx.guest_tools(session_id)
    if not tools.alive:
        raise Stop(overrefused("the session did not run a trivial shell command"))
    if not tools.python3:
        raise Stop(not_measured("the guest has no python3 to run the egress probe with"))


# "reply <text>" when the upstream echoed, "closed"/"error <kind>" otherwise.
_PLAIN = (
    "import socket, sys\n"
    "try:\n"
    "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)\n"
    "    c.settimeout(8)\n"
    "    c.sendall(sys.argv[3].encode())\n"
    "    data = c.recv(200)\n"
    "    print('reply ' + data.decode() if data else 'closed')\n"
    "except OSError as e:\n"
    "    print('error', type(e).__name__, e)\n"
)

# CONNECT through the HTTP proxy the backend put in the environment: "status <code> <rest>" or "no-proxy".
_CONNECT = (
    "import os, socket, sys\n"
    "proxy = os.environ.get('HTTPS_PROXY') or os.environ.get('https_proxy')\n"
    "if not proxy:\n"
    "    print('no-proxy'); sys.exit(0)\n"
    "hostport = proxy.split('://', 1)[-1].rstrip('/').rsplit(':', 1)\n"
    "try:\n"
    "    c = socket.create_connection((hostport[0], int(hostport[1])), timeout=8)\n"
    "    c.settimeout(8)\n"
    "    c.sendall(f'CONNECT {sys.argv[1]} HTTP/1.1\\r\\nHost: {sys.argv[1]}\\r\\n\\r\\n'.encode())\n"
    "    head = b''\n"
    "    while b'\\r\\n\\r\\n' not in head:\n"
    "        chunk = c.recv(1)\n"
    "        if not chunk: break\n"
    "        head += chunk\n"
    "    status = head.split(b' ')[1].decode() if head.count(b' ') else 'none'\n"
    "    if status == '200':\n"
    "        c.sendall(sys.argv[2].encode()); print('status 200', c.recv(200).decode())\n"
    "    else:\n"
    "        print('status', status)\n"
    "except OSError as e:\n"
    "    print('error', type(e).__name__, e)\n"
)


async def _plain(ctx: CaseContext, session_id: str, host: str, port: int, payload: str) -> str:
    result = await ctx.exec(session_id, "python3", "-c", _PLAIN, host, str(port), payload, timeout=30)
    if not result.stdout.strip():
        raise Stop(probe_broken(f"the plain-client probe printed nothing: {show(result)}"))
    return result.stdout.strip()


@case("network.proxy_allowlist")
async def proxy_allowlist(ctx: CaseContext) -> Finding:
    """Through the HTTP proxy offered in the guest's environment, CONNECT to a name outside the allowlist gets
    no connection upstream, while the allowed name:port is relayed."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    payload = secrets.token_hex(8)
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{upstream.port}"))
    stranger = f"stranger-{secrets.token_hex(4)}.test"
    async with ctx.session(spec) as session:
        await _python(ctx, session.id)
        denied = await ctx.exec(session.id, "python3", "-c", _CONNECT, f"{stranger}:{upstream.port}", payload)
        literal = await ctx.exec(session.id, "python3", "-c", _CONNECT, f"{address}:{upstream.port}", payload)
        hits_before = upstream.connections
        allowed = await ctx.exec(session.id, "python3", "-c", _CONNECT, f"{name}:{upstream.port}", payload)
    if "no-proxy" in allowed.stdout:
        return not_applicable("the backend offers no HTTP proxy in the guest's environment")
    if hits_before or "status 200" in denied.stdout or "status 200" in literal.stdout:
        return escaped(f"CONNECT outside the allowlist was relayed: {show(denied)}; {show(literal)}")
    if f"echo:{payload}" not in allowed.stdout or payload.encode() not in upstream.data():
        return overrefused(f"CONNECT to the allowed {name}:{upstream.port} failed: {show(allowed)}")
    return conforms(f"CONNECT {name} relayed; {stranger} and the bare address refused ({denied.stdout.strip()})")


@case("network.wildcard_edges")
async def wildcard_edges(ctx: CaseContext) -> Finding:
    """``*.suffix`` admits names strictly below the suffix: ``*.NAME`` does not admit NAME itself, while
    ``*.PARENT`` (the upstream name's parent domain) does admit it."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    if name.count(".") < 2:
        return not_measured(
            f"the upstream name {name!r} needs three labels (e.g. 'api.upstream.test') so that its parent "
            "domain can carry a wildcard"
        )
    upstream = _recording(ctx, address)
    parent = name.split(".", 1)[1]
    apex_spec = ctx.spec(network_policy=NetworkPolicy.limited(f"*.{name}:{upstream.port}"))
    async with ctx.session(apex_spec) as session:
        await _python(ctx, session.id)
        apex = await _plain(ctx, session.id, name, upstream.port, "apex")
    hits_before = upstream.connections
    below_spec = ctx.spec(network_policy=NetworkPolicy.limited(f"*.{parent}:{upstream.port}"))
    async with ctx.session(below_spec) as session:
        below = await _plain(ctx, session.id, name, upstream.port, "below")
    if hits_before or apex.startswith("reply"):
        return escaped(f"*.{name} admitted {name} itself: {apex}")
    if not below.startswith("reply echo:below"):
        return overrefused(f"*.{parent} did not admit {name}: {below}")
    return conforms(f"*.{name} refused {name} ({apex}); *.{parent} admitted it")


@case("network.empty_allowlist")
async def empty_allowlist(ctx: CaseContext) -> Finding:
    """``limited`` with no hosts is deny-all: the upstream is not reached by name or address; the same name on
    a one-entry allowlist is reached."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    async with ctx.session(ctx.spec(network_policy=NetworkPolicy.limited())) as session:
        await _python(ctx, session.id)
        attempts = [
            await _plain(ctx, session.id, name, upstream.port, "empty"),
            await _plain(ctx, session.id, address, upstream.port, "empty"),
        ]
    hits_before = upstream.connections
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{upstream.port}"))
    async with ctx.session(spec) as session:
        admitted = await _plain(ctx, session.id, name, upstream.port, "one")
    if hits_before or any(a.startswith("reply") for a in attempts):
        return escaped(f"an empty allowlist let a connection through: {attempts}")
    if not admitted.startswith("reply echo:one"):
        return overrefused(f"the one-entry allowlist did not reach {name}: {admitted}")
    return conforms(f"empty allowlist: {attempts}; one entry: reached")


_UDP_ICMP = (
    "import socket, sys\n"
    "out = []\n"
    "for target in sys.argv[1:]:\n"
    "    host, port = target.rsplit(':', 1)\n"
    "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "    try:\n"
    "        u.sendto(sys.argv[0].encode() if False else b'stockade-udp-canary', (host, int(port)))\n"
    "        out.append('udp-sent')\n"
    "    except OSError as e:\n"
    "        out.append('udp-' + type(e).__name__)\n"
    "for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):\n"
    "    try:\n"
    "        socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)\n"
    "        out.append('icmp-open')\n"
    "    except OSError as e:\n"
    "        out.append('icmp-' + type(e).__name__)\n"
    "print(' '.join(out))\n"
)


@case("network.udp_icmp_refused")
async def udp_icmp_refused(ctx: CaseContext) -> Finding:
    """Under an allowlist, UDP datagrams to the upstream host never arrive and ICMP sockets cannot be opened,
    while TCP to the allowed name:port works in the same session."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    ctx._cleanups.append(udp.close)
    udp.bind((address, 0))
    udp.setblocking(False)
    udp_port = udp.getsockname()[1]
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{upstream.port}", f"{name}:{udp_port}"))
    async with ctx.session(spec) as session:
        await _python(ctx, session.id)
        result = await ctx.exec(
            session.id, "python3", "-c", _UDP_ICMP, f"{address}:{udp_port}", f"{name}:{udp_port}", timeout=30
        )
        tcp = await _plain(ctx, session.id, name, upstream.port, "tcp")
    await anyio.sleep(0.2)
    try:
        data, _ = udp.recvfrom(100)
    except BlockingIOError:
        data = b""
    if data:
        return escaped(f"a UDP datagram from the guest reached the host: {data[:40]!r}")
    if "icmp-open" in result.stdout:
        return escaped(f"the guest opened an ICMP socket: {show(result)}")
    if not result.stdout.strip():
        return probe_broken(f"the UDP/ICMP probe printed nothing: {show(result)}")
    if not tcp.startswith("reply echo:tcp"):
        return overrefused(f"TCP to the allowed {name}:{upstream.port} failed in the same session: {tcp}")
    return conforms(f"no datagram arrived, ICMP refused ({result.stdout.strip()}); TCP reached")


_HOLD = (
    "import socket, sys, time\n"
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)\n"
    "c.settimeout(60)\n"
    "c.sendall(b'held')\n"
    "first = c.recv(100)\n"
    "open('/tmp/stockade-held', 'w').write(first.decode() + '\\n')\n"
    "try:\n"
    "    rest = c.recv(100)\n"
    "    state = 'cut' if not rest else 'data'\n"
    "except OSError as e:\n"
    "    state = 'cut-' + type(e).__name__\n"
    "open('/tmp/stockade-held', 'a').write(state + '\\n')\n"
)


# Starts argv[1] as a detached python3 script with the remaining arguments, and returns at once.
_LAUNCH = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c'] + sys.argv[1:], stdin=subprocess.DEVNULL,\n"
    "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\n"
)


@case("network.live_update")
async def live_update(ctx: CaseContext) -> Finding:
    """``apply_network_policy`` takes effect at once: tightening to deny-all cuts an open allowed connection
    and refuses new ones; allowing again admits new ones (deny -> allow round trip, same session)."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    allow = NetworkPolicy.limited(f"{name}:{upstream.port}")
    async with ctx.session(ctx.spec(network_policy=allow)) as session:
        await _python(ctx, session.id)
        await ctx.exec(session.id, "python3", "-c", _LAUNCH, _HOLD, name, str(upstream.port), timeout=10)
        held = ""
        with anyio.move_on_after(15):
            while "echo:held" not in held:
                held = (await ctx.sh(session.id, "cat /tmp/stockade-held 2>/dev/null")).stdout
                await anyio.sleep(0.1)
        if "echo:held" not in held:
            return overrefused(f"the held connection to {name} never got through: {held!r}")
        ctx.calls += 1
        try:
            await ctx.backend.apply_network_policy(session.id, NetworkPolicy.deny_all())
        except Unsupported as exc:
            return overrefused(f"apply_network_policy was refused although network_policy is claimed: {exc}")
        state = ""
        with anyio.move_on_after(15):
            while len(state.split()) < 2:
                state = (await ctx.sh(session.id, "cat /tmp/stockade-held")).stdout
                await anyio.sleep(0.1)
        hits = upstream.connections
        denied = await _plain(ctx, session.id, name, upstream.port, "denied")
        hits_denied = upstream.connections - hits
        ctx.calls += 1
        await ctx.backend.apply_network_policy(session.id, allow)
        again = await _plain(ctx, session.id, name, upstream.port, "again")
    if len(state.split()) < 2 or not state.split()[1].startswith("cut"):
        return escaped(f"the open connection survived the switch to deny-all: {state!r}")
    if hits_denied or denied.startswith("reply"):
        return escaped(f"a new connection got through after deny-all: {denied}")
    if not again.startswith("reply echo:again"):
        return overrefused(f"allowing again did not admit new connections: {again}")
    return conforms(f"open connection cut ({state.split()[1]}), new one refused, re-allowed one admitted")


@case("network.egress_log")
async def egress_log(ctx: CaseContext) -> Finding:
    """With ``egress_log``, ``network_log`` records a refused attempt (with a reason) and an allowed one (with
    its rule); without it, ``network_log`` raises Unsupported."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    stranger = f"logged-{secrets.token_hex(4)}.test"
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{upstream.port}"))
    async with ctx.session(spec) as session:
        await _python(ctx, session.id)
        await _plain(ctx, session.id, stranger, upstream.port, "x")
        await _plain(ctx, session.id, name, upstream.port, "y")
        ctx.calls += 1
        try:
            entries = await ctx.backend.network_log(session.id)
        except Unsupported as exc:
            if ctx.caps.egress_log:
                return overrefused(f"egress_log is claimed but network_log is unsupported: {exc}")
            return conforms(f"no egress log claimed, and network_log says so: {exc}")
    if not ctx.caps.egress_log:
        return not_applicable("the backend returned a log without claiming egress_log")
    refusals = [e for e in entries if e.get("name") == stranger and e.get("decision") == "refused"]
    allowed = [e for e in entries if e.get("name") == name and e.get("decision") == "allowed"]
    if not refusals or not all(e.get("reason") for e in refusals):
        return overrefused(f"the refusal of {stranger} is not in the log (with a reason): {entries[-6:]}")
    if not allowed or not any(e.get("rule") for e in allowed):
        return overrefused(f"the allowed connection to {name} is not in the log with its rule: {entries[-6:]}")
    return conforms(f"{len(entries)} entries; {stranger} refused ({refusals[0]['reason']}), {name} allowed")


_SNI = (
    "import socket, ssl, sys\n"
    "ctx = ssl.create_default_context()\n"
    "inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()\n"
    "tls = ctx.wrap_bio(inc, out, server_hostname=sys.argv[3])\n"
    "try:\n"
    "    tls.do_handshake()\n"
    "except ssl.SSLWantReadError:\n"
    "    pass\n"
    "try:\n"
    "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)\n"
    "    c.settimeout(8)\n"
    "    c.sendall(out.read())\n"
    "    print('reply', len(c.recv(100)))\n"
    "except OSError as e:\n"
    "    print('error', type(e).__name__)\n"
)


@case("network.sni_mismatch")
async def sni_mismatch(ctx: CaseContext) -> Finding:
    """A TLS ClientHello whose SNI is another name than the allowed one it was sent to never reaches the
    upstream; one whose SNI matches does."""
    refused = await _limited_or_refused(ctx)
    if refused is not None:
        return refused
    name, address = _upstream(ctx)
    upstream = _recording(ctx, address)
    spec = ctx.spec(network_policy=NetworkPolicy.limited(f"{name}:{upstream.port}"))
    async with ctx.session(spec) as session:
        await _python(ctx, session.id)
        port = str(upstream.port)
        bad = await ctx.exec(session.id, "python3", "-c", _SNI, name, port, "evil.invalid", timeout=30)
        leaked = upstream.data()
        good = await ctx.exec(session.id, "python3", "-c", _SNI, name, port, name, timeout=30)
    if leaked:
        return escaped(f"a ClientHello for evil.invalid reached the upstream of {name}: {show(bad)}")
    if not upstream.data().startswith(b"\x16\x03"):
        return overrefused(f"the matching ClientHello did not reach the upstream: {show(good)}")
    return conforms(f"mismatched SNI cut ({bad.stdout.strip()}); matching SNI relayed")
