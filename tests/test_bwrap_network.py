"""Egress of bwrap sessions through the gateway, judged by what fake upstreams on 127.0.0.x actually receive.

Upstreams are threaded listeners on 127.0.0.2 (``allowed.test`` in the gateway's injected resolver, and
treated as public for name rules); every other address a test names is refused by the gateway before it
dials, so nothing but loopback is ever contacted. Each refusal has an admitted sibling.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stockade.backends.bwrap import BwrapBackend
from stockade.backends.bwrap._network import find_tool
from stockade.errors import LifecycleError, Unsupported
from stockade.models import ExecRequest, NetworkPolicy, SandboxSpec

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="egress through the gateway needs root on the host"),
    pytest.mark.skipif(find_tool("nft") is None, reason="nft (Debian nftables) is not installed"),
]

UPSTREAM = "127.0.0.2"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Upstream:
    """A TCP server on 127.0.0.2 that records what each connection sent and echoes it back."""

    def __init__(self, address: str = UPSTREAM) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        return len(self.received)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        index = len(self.received)
        self.received.append(b"")
        conn.settimeout(30)
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                self.received[index] += data
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


class FakeDns:
    """A UDP DNS server on 127.0.0.2 answering every A query with 127.0.0.2, recording the names asked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((UPSTREAM, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            pos, labels = 12, []
            while data[pos]:
                labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
                pos += data[pos] + 1
            question = data[12 : pos + 5]
            self.names.append(".".join(labels))
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(UPSTREAM)
            head = struct.pack("!HHHHHH", int.from_bytes(data[:2], "big"), 0x8180, 1, 1, 0, 0)
            self.sock.sendto(head + question + answer, peer)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def backend(tmp_path: Path) -> BwrapBackend:
    return BwrapBackend(
        tmp_path / "state",
        resolve={
            "allowed.test": UPSTREAM,
            "api.wild.test": UPSTREAM,
            "loop.test": "127.0.0.1",
            "metadata.test": "169.254.169.254",
            "private.test": "10.0.0.7",
        },
        public_overrides=[UPSTREAM],
    )


@contextlib.asynccontextmanager
async def session(backend: BwrapBackend, *hosts: str, mode: str = "limited") -> AsyncIterator[str]:
    policy = {"mode": mode} if mode == "unrestricted" else {"mode": "limited", "allowed_hosts": list(hosts)}
    sess = await backend.provision(SandboxSpec.parse({"network_policy": policy}))
    try:
        yield sess.id
    finally:
        await backend.terminate(sess.id)


async def py(backend: BwrapBackend, session_id: str, code: str, *args: str) -> str:
    request = ExecRequest.parse({"command": "python3", "args": ["-c", code, *args], "timeout": 30})
    result = await backend.exec(session_id, request)
    assert result.exit_code == 0, result.stderr
    return result.stdout


# A plain client: resolves through the guest's resolver (the DNS stub) and connects, no proxy involved.
PLAIN = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    c = socket.create_connection((host, port), timeout=10)
    c.settimeout(10)
    c.sendall(b"ping")
    print("reply", c.recv(100).decode() or "closed")
except OSError as e:
    print("error", type(e).__name__)
"""

# A proxy-aware client: CONNECT through the HTTP proxy named in the environment.
CONNECT = """
import os, socket, sys
proxy = os.environ["HTTP_PROXY"].rsplit(":", 1)
c = socket.create_connection(("127.0.0.1", int(proxy[1])), timeout=10)
c.settimeout(10)
c.sendall(f"CONNECT {sys.argv[1]} HTTP/1.1\\r\\nHost: {sys.argv[1]}\\r\\n\\r\\n".encode())
head = b""
while b"\\r\\n\\r\\n" not in head:
    chunk = c.recv(1)
    if not chunk:
        break
    head += chunk
status = head.split(b" ")[1].decode() if head else "none"
if status == "200":
    c.sendall(b"ping")
    print("status", status, c.recv(100).decode())
else:
    print("status", status, c.recv(300).decode(errors="replace").replace("\\n", " "))
"""


def log_for(entries: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in entries if all(e.get(k) == v for k, v in match.items())]


async def test_plain_client_reaches_allowed_name_only(backend: BwrapBackend, upstream: Upstream) -> None:
    other = Upstream()
    try:
        async with session(backend, f"allowed.test:{upstream.port}") as sid:
            stranger = f"stranger-{secrets.token_hex(4)}.test"
            refused = [
                await py(backend, sid, PLAIN, stranger, str(upstream.port)),  # not in the allowlist
                await py(backend, sid, PLAIN, "allowed.test", str(other.port)),  # allowed name, other port
            ]
            assert upstream.connections == 0 and other.connections == 0, refused
            admitted = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
            log = await backend.network_log(sid)
    finally:
        other.close()
    assert admitted.strip() == "reply echo:ping"
    assert upstream.received == [b"ping"]
    assert other.connections == 0
    assert refused[0].startswith("error gaierror")  # the stub answered NXDOMAIN
    # Accepted by the transparent listener, then refused: the guest sees the connection cut.
    assert refused[1].strip() in ("reply closed", "error ConnectionResetError")
    assert log_for(log, kind="dns", name=stranger, decision="refused", reason="not_in_allowlist")
    assert log_for(log, kind="connect", name="allowed.test", port=other.port, reason="port_not_allowed")
    allowed = log_for(log, kind="connect", name="allowed.test", port=upstream.port, decision="allowed")
    assert allowed and allowed[0]["rule"] == f"allowed.test:{upstream.port}" and allowed[0]["bytes_up"] == 4


async def test_proxy_client_connect_and_403(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        refused = await py(backend, sid, CONNECT, f"denied.test:{upstream.port}")
        assert upstream.connections == 0
        admitted = await py(backend, sid, CONNECT, f"allowed.test:{upstream.port}")
        env = (await backend.exec(sid, ExecRequest(command="env"))).stdout
    assert admitted.strip() == "status 200 echo:ping"
    assert refused.startswith("status 403") and "not_in_allowlist" in refused
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "no_proxy"):
        assert f"{var}=" in env


async def test_wildcard_edges(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"*.wild.test:{upstream.port}") as sid:
        apex = await py(backend, sid, CONNECT, f"wild.test:{upstream.port}")
        lookalike = await py(backend, sid, CONNECT, f"evil-wild.test:{upstream.port}")
        assert upstream.connections == 0
        below = await py(backend, sid, CONNECT, f"api.wild.test:{upstream.port}")
    assert apex.startswith("status 403") and lookalike.startswith("status 403")
    assert below.strip() == "status 200 echo:ping"


async def test_addresses_need_their_own_rule(backend: BwrapBackend, upstream: Upstream) -> None:
    """Direct IPs, and allowed names resolving to loopback, metadata or private addresses, are refused."""
    hosts = [f"{n}:{upstream.port}" for n in ("allowed.test", "loop.test", "metadata.test", "private.test")]
    async with session(backend, *hosts) as sid:
        literal = await py(backend, sid, CONNECT, f"{UPSTREAM}:{upstream.port}")
        bad = {n: await py(backend, sid, CONNECT, n) for n in hosts[1:]}
        # A plain client dialling an address the stub never handed out (curl --resolve NAME:PORT:ADDRESS).
        plain_literal = await py(backend, sid, PLAIN, "10.9.9.9", str(upstream.port))
        assert upstream.connections == 0
        admitted = await py(backend, sid, CONNECT, f"allowed.test:{upstream.port}")
        log = await backend.network_log(sid)
    assert literal.startswith("status 403") and "ip_literal_not_allowed" in literal
    assert "loopback" in bad[hosts[1]] and "link_local" in bad[hosts[2]] and "private" in bad[hosts[3]]
    assert all(v.startswith("status 403") for v in bad.values())
    assert plain_literal.strip() in ("reply closed", "error ConnectionResetError")
    assert log_for(log, kind="connect", via="transparent", address="10.9.9.9", decision="refused")
    assert admitted.strip() == "status 200 echo:ping"


async def test_explicit_address_rule_admits_a_literal(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"{UPSTREAM}:{upstream.port}") as sid:
        other_port = await py(backend, sid, CONNECT, f"{UPSTREAM}:{upstream.port + 1}")
        admitted = await py(backend, sid, CONNECT, f"{UPSTREAM}:{upstream.port}")
    assert other_port.startswith("status 403")
    assert admitted.strip() == "status 200 echo:ping"


SNI = """
import os, socket, ssl, sys
name, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
c = socket.create_connection(("allowed.test", port), timeout=10)
c.settimeout(10)
c.sendall(hello)
try:
    print("reply", len(c.recv(100)))
except OSError as e:
    print("error", type(e).__name__)
"""


async def test_sni_must_match_the_name(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        mismatch = await py(backend, sid, SNI, "evil.test", str(upstream.port))
        assert not any(upstream.received), mismatch  # the upstream saw no byte of the hello
        match = await py(backend, sid, SNI, "allowed.test", str(upstream.port))
        log = await backend.network_log(sid)
    assert match.startswith("reply") and int(match.split()[1]) > 0
    assert any(data.startswith(b"\x16\x03") for data in upstream.received)  # a TLS record reached it
    assert log_for(log, kind="connect", decision="refused", reason="sni_mismatch")


async def test_dns_for_refused_names_never_leaves(tmp_path: Path, upstream: Upstream) -> None:
    dns = FakeDns()
    try:
        backend = BwrapBackend(
            tmp_path / "state", dns_upstream=f"{UPSTREAM}:{dns.port}", public_overrides=[UPSTREAM]
        )
        canary = f"canary-{secrets.token_hex(6)}.test"
        async with session(backend, f"allowed.test:{upstream.port}") as sid:
            refused = await py(backend, sid, PLAIN, canary, str(upstream.port))
            admitted = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
    finally:
        dns.close()
    assert refused.startswith("error gaierror")
    assert admitted.strip() == "reply echo:ping"
    assert "allowed.test" in dns.names  # the gateway did resolve through the upstream resolver
    assert not any(canary in name for name in dns.names)


UDP_ICMP = """
import socket, sys
out = []
for addr in (("127.0.0.2", int(sys.argv[1])), ("10.9.9.9", int(sys.argv[1]))):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"canary", addr)
        out.append("udp-sent")
    except OSError as e:
        out.append("udp-" + type(e).__name__)
for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
    try:
        socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
        out.append("icmp-open")
    except OSError as e:
        out.append("icmp-" + type(e).__name__)
print(" ".join(out))
"""


async def test_udp_and_icmp_never_leave(backend: BwrapBackend, upstream: Upstream) -> None:
    host_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host_udp.bind((UPSTREAM, 0))
    host_udp.settimeout(0.5)
    try:
        async with session(backend, "allowed.test", mode="unrestricted") as sid:
            out = await py(backend, sid, UDP_ICMP, str(host_udp.getsockname()[1]))
            # The admitted sibling: TCP egress works in this very session.
            tcp = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
        with pytest.raises(TimeoutError):
            host_udp.recvfrom(100)
    finally:
        host_udp.close()
    assert "icmp-open" not in out, out
    assert "udp-PermissionError" in out  # the non-loopback datagram is dropped in the guest namespace
    assert tcp.strip() == "reply echo:ping"


async def test_empty_allowlist_is_deny_all(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend) as sid:
        out = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
        env = (await backend.exec(sid, ExecRequest(command="env"))).stdout
        info = await backend.get_session(sid)
    assert out.startswith("error")
    assert upstream.connections == 0
    assert "HTTP_PROXY" not in env and "gateway_pid" not in info.metadata


HOLD = """
import socket, sys, time
c = socket.create_connection(("allowed.test", int(sys.argv[1])), timeout=10)
c.settimeout(30)
c.sendall(b"one")
first = c.recv(100).decode()
open("/tmp/hold", "w").write(first + "\\n")
try:
    rest = c.recv(100)
    state = "closed" if not rest else "data"
except OSError as e:
    state = type(e).__name__
open("/tmp/hold", "a").write(state + "\\n")
"""


async def _wait_file(init_pid: int, lines: int) -> list[str]:
    path = Path(f"/proc/{init_pid}/root/tmp/hold")
    with anyio.fail_after(20):
        while True:
            with contextlib.suppress(OSError):
                text = path.read_text().splitlines()
                if len(text) >= lines:
                    return text
            await anyio.sleep(0.05)


async def test_live_tighten_cuts_open_connections_and_round_trips(
    backend: BwrapBackend, upstream: Upstream
) -> None:
    allow = NetworkPolicy.limited(f"allowed.test:{upstream.port}")
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        info = await backend.get_session(sid)
        init_pid = int(info.metadata["init_pid"])
        await backend.exec(sid, ExecRequest(command="sh", args=("-c", f"python3 -c '{HOLD}' {upstream.port} &")))
        assert await _wait_file(init_pid, 1) == ["echo:one"]
        await backend.apply_network_policy(sid, NetworkPolicy.deny_all())
        assert (await _wait_file(init_pid, 2))[1] in ("closed", "ConnectionResetError")
        denied = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
        await backend.apply_network_policy(sid, allow)
        again = await py(backend, sid, PLAIN, "allowed.test", str(upstream.port))
        await backend.apply_network_policy(sid, NetworkPolicy.deny_all())
        denied_again = await py(backend, sid, CONNECT, f"allowed.test:{upstream.port}")
        log = await backend.network_log(sid)
    assert denied.startswith("error")
    assert again.strip() == "reply echo:ping"
    assert denied_again.startswith("status 403")
    assert any(e.get("closed") == "policy_update: deny_all" or "policy_update" in str(e) for e in log)


async def test_deny_all_session_can_be_opened_later(backend: BwrapBackend, upstream: Upstream) -> None:
    sess = await backend.provision(SandboxSpec())
    try:
        before = await py(backend, sess.id, PLAIN, "allowed.test", str(upstream.port))
        await backend.apply_network_policy(sess.id, NetworkPolicy.limited(f"allowed.test:{upstream.port}"))
        after = await py(backend, sess.id, PLAIN, "allowed.test", str(upstream.port))
    finally:
        await backend.terminate(sess.id)
    assert before.startswith("error") and after.strip() == "reply echo:ping"


WATCH = """
import socket, sys, time
port = int(sys.argv[1])
with open("/tmp/watch", "w", buffering=1) as out:
    for _ in range(400):
        try:
            c = socket.create_connection(("allowed.test", port), timeout=2)
            c.settimeout(2)
            c.sendall(b"x")
            out.write("ok\\n" if c.recv(10) else "closed\\n")
            c.close()
        except OSError as e:
            out.write(type(e).__name__ + "\\n")
        time.sleep(0.02)
"""


async def test_gateway_death_fails_closed_and_restarts(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        info = await backend.get_session(sid)
        init_pid, gw_pid = int(info.metadata["init_pid"]), int(info.metadata["gateway_pid"])
        await backend.exec(sid, ExecRequest(command="sh", args=("-c", f"python3 -c '{WATCH}' {upstream.port} &")))
        watch = Path(f"/proc/{init_pid}/root/tmp/watch")
        with anyio.fail_after(20):
            while "ok" not in (watch.read_text() if watch.exists() else ""):
                await anyio.sleep(0.05)
        os.kill(gw_pid, signal.SIGKILL)
        reached = upstream.connections
        killed_at = len(watch.read_text().splitlines())
        # Attempts that started after the kill (one may have been in flight): none may succeed. Each fails fast
        # or after the guest resolver's 1 s timeout (the DNS stub died with the gateway).
        with anyio.fail_after(20):
            while len(lines_dead := watch.read_text().splitlines()[killed_at + 1 :]) < 2:
                await anyio.sleep(0.05)
        assert upstream.connections == reached  # nothing reached the upstream while the gateway was down
        down = await backend.get_session(sid)
        assert down.metadata["gateway"].startswith("down")
        # Any use of the session restarts the gateway with the current policy; egress comes back.
        await backend.exec(sid, ExecRequest(command="true"))
        up = await backend.get_session(sid)
        with anyio.fail_after(20):
            while watch.read_text().splitlines()[-1] != "ok":
                await anyio.sleep(0.05)
    assert "ok" not in lines_dead, lines_dead
    assert up.metadata["gateway"] == "running" and up.metadata["gateway_failures"] == "1"
    assert int(up.metadata["gateway_pid"]) != gw_pid


async def test_terminate_stops_the_gateway(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        gw_pid = int((await backend.get_session(sid)).metadata["gateway_pid"])
        assert Path(f"/proc/{gw_pid}").exists()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _running(gw_pid):
        time.sleep(0.02)
    assert not _running(gw_pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_host_network_is_explicit(tmp_path: Path) -> None:
    plain = BwrapBackend(tmp_path / "a")
    shared = BwrapBackend(tmp_path / "b", share_host_network=True)
    assert plain.capabilities().network_unrestricted and shared.capabilities().network_unrestricted
    sess = await shared.provision(SandboxSpec(network_policy=NetworkPolicy.unrestricted()))
    try:
        links = await shared.exec(sess.id, ExecRequest(command="cat", args=("/proc/net/dev",)))
        with pytest.raises(Unsupported):
            await shared.apply_network_policy(sess.id, NetworkPolicy.deny_all())
        with pytest.raises(Unsupported):
            await shared.network_log(sess.id)
    finally:
        await shared.terminate(sess.id)
    own = await plain.provision(SandboxSpec(network_policy=NetworkPolicy.unrestricted()))
    try:
        own_links = await plain.exec(own.id, ExecRequest(command="cat", args=("/proc/net/dev",)))
    finally:
        await plain.terminate(own.id)
    host_links = Path("/proc/net/dev").read_text()
    assert links.stdout.count("\n") == host_links.count("\n")  # the host's interfaces
    assert own_links.stdout.count("\n") == 3  # header (2 lines) + lo


def test_gateway_config_is_recorded(tmp_path: Path) -> None:
    """The per-session gateway config is on disk, owner-only, and names the session's policy."""

    async def go() -> dict[str, Any]:
        backend = BwrapBackend(tmp_path / "state", resolve={"allowed.test": UPSTREAM})
        async with session(backend, "allowed.test:8080") as sid:
            directory = Path((await backend.get_session(sid)).metadata["state_dir"]) / "gateway"
            assert directory.stat().st_mode & 0o077 == 0
            config: dict[str, Any] = json.loads((directory / "config.json").read_text())
            return config

    config = anyio.run(go)
    assert config["policy"] == {"mode": "limited", "allowed_hosts": ["allowed.test:8080"]}
    assert config["transparent_original_dst"] is True


async def test_gateway_failure_leaves_nothing_half_built(
    backend: BwrapBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stockade.backends.bwrap._backend as backend_module

    started: list[int] = []

    def broken(_session_id: str, _sdir: Path, init_pid: int, *_args: object, **_kwargs: object) -> None:
        started.append(init_pid)  # the sandbox was up when the gateway failed
        raise LifecycleError("the egress gateway failed to start: simulated")

    monkeypatch.setattr(backend_module, "start_gateway", broken)
    with pytest.raises(LifecycleError, match="simulated"):
        await backend.provision(SandboxSpec(network_policy=NetworkPolicy.limited("allowed.test")))
    assert backend.store.ids() == [] and len(started) == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _running(started[0]):
        time.sleep(0.02)
    assert not _running(started[0])  # the sandbox started for it is gone again


def test_cli_egress_log(tmp_path: Path, upstream: Upstream) -> None:
    """``stockade run --allow-host ... --resolve ... --egress-log FILE``: the decisions land in FILE."""
    import subprocess
    import sys

    log = tmp_path / "egress.jsonl"
    code = "import socket,sys\nc=socket.create_connection(('allowed.test',int(sys.argv[1])),timeout=5)\n" \
        "c.sendall(b'cli')\nprint(c.recv(100).decode())"
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "run", "--backend", "bwrap",
         "--allow-host", f"allowed.test:{upstream.port}", "--allow-host", f"{UPSTREAM}:{upstream.port}",
         "--resolve", f"allowed.test={UPSTREAM}", "--egress-log", str(log),
         "--", "python3", "-c", code, str(upstream.port)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "echo:cli"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    allowed = log_for(entries, kind="connect", decision="allowed", name="allowed.test")
    assert allowed and allowed[0]["address_rule"] == f"{UPSTREAM}:{upstream.port}"


async def test_concurrent_execs_restart_a_dead_gateway_once(backend: BwrapBackend, upstream: Upstream) -> None:
    async with session(backend, f"allowed.test:{upstream.port}") as sid:
        gw_pid = int((await backend.get_session(sid)).metadata["gateway_pid"])
        os.kill(gw_pid, signal.SIGKILL)
        while _running(gw_pid):
            await anyio.sleep(0.01)
        outputs: list[str] = []

        async def one() -> None:
            outputs.append(await py(backend, sid, PLAIN, "allowed.test", str(upstream.port)))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        info = await backend.get_session(sid)
    assert outputs == ["reply echo:ping\n"] * 4
    assert info.metadata["gateway_failures"] == "1"
