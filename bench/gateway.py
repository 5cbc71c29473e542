"""The egress gateway as a session runs it (``python -m stockade.gateway``), against a fake upstream.

Everything is on loopback: the gateway's HTTP-proxy and SOCKS5 listeners on 127.0.0.1, the fake upstream
(``bench.upstream``) on 127.0.0.2, reached by the allowed name ``upstream.bench.test`` through the gateway's
static resolver. Baseline: the same client talking to the same upstream directly, in the same run, with the
direct and gateway samples interleaved so that drift in the machine's load hits both alike.

Measured: connection setup (connect, tunnel, one echoed byte), one stream's throughput, N concurrent
tunnels (each echoing a message while all are open), and the gateway process's memory at idle and after load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio.to_thread

from .config import RunConfig
from .procmem import process_memory
from .results import SystemResult
from .stats import ms, summarise

__all__ = ["run_gateway"]

NAME = "upstream.bench.test"
UPSTREAM = "127.0.0.2"
STEP = 30.0


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


class _Processes:
    """The upstream and gateway processes of one run; stopped by pid, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.upstream: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.proxy: dict[str, tuple[str, int]] = {}
        self.control = workdir / "gateway-ctl.sock"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--host", UPSTREAM],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.upstream.stdout is not None
        self.ports = json.loads(self.upstream.stdout.readline() or b"{}")
        if set(self.ports) != {"echo", "source"}:
            raise RuntimeError("the fake upstream did not start")
        http, socks = _listener(), _listener()
        self.proxy = {"http": http.getsockname(), "socks": socks.getsockname()}
        allowed = [f"{host}:{port}" for host in (NAME, UPSTREAM) for port in self.ports.values()]
        config = {
            "session": "bench",
            "http_fd": http.fileno(),
            "socks_fd": socks.fileno(),
            "control_path": str(self.control),
            "policy": {"mode": "limited", "allowed_hosts": allowed},
            "resolve": {NAME: UPSTREAM},
            "die_with_parent": True,
        }
        path = self.workdir / "gateway.json"
        path.write_text(json.dumps(config))
        self.gateway = subprocess.Popen([sys.executable, "-m", "stockade.gateway", "--config", str(path)],
                                        pass_fds=(http.fileno(), socks.fileno()), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env)
        http.close()
        socks.close()
        assert self.gateway.stdout is not None
        line = self.gateway.stdout.readline()
        if line != b"ready\n":
            err = self.gateway.stderr.read().decode(errors="replace") if self.gateway.stderr else ""
            raise RuntimeError(f"the gateway did not start: {line!r} {err[-500:]}")

    def stop(self) -> None:
        for proc in (self.gateway, self.upstream):
            if proc is None or proc.poll() is not None:
                continue
            if proc is self.upstream and proc.stdin is not None:
                proc.stdin.close()  # its signal to leave
            else:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------------- clients


async def _tunnel_http(proxy: tuple[str, int], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(f"CONNECT {NAME}:{port} HTTP/1.1\r\nHost: {NAME}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if head.split(b" ", 2)[1:2] != [b"200"]:
        writer.close()
        raise ConnectionError(f"gateway refused the tunnel: {head[:80]!r}")
    return reader, writer


async def _tunnel_socks(proxy: tuple[str, int], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"\x05\x01\x00")
    if await reader.readexactly(2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 greeting refused")
    name = NAME.encode()
    writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    ver, rep, _rsv, atyp = await reader.readexactly(4)
    if ver != 5 or rep != 0:
        raise ConnectionError(f"SOCKS5 reply {rep}")
    length = {1: 4, 4: 16}.get(atyp) or (await reader.readexactly(1))[0]
    await reader.readexactly(length + 2)
    return reader, writer


async def _direct(_proxy: tuple[str, int], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(UPSTREAM, port)


async def _setup_echo(open_: Any, proxy: tuple[str, int], port: int) -> float:
    """Seconds from connect to the first echoed byte."""
    start = time.perf_counter()
    reader, writer = await open_(proxy, port)
    writer.write(b"x")
    await reader.readexactly(1)
    elapsed = time.perf_counter() - start
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return elapsed


def _blocking_stream(proxy: tuple[str, int] | None, port: int, size: int) -> float:
    """Seconds to receive ``size`` bytes from the source upstream, directly (proxy None) or by CONNECT."""
    if proxy is None:
        sock = socket.create_connection((UPSTREAM, port))
    else:
        sock = socket.create_connection(proxy)
        sock.sendall(f"CONNECT {NAME}:{port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("the gateway closed the tunnel")
            head += chunk
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise ConnectionError(f"gateway refused the tunnel: {head[:80]!r}")
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    with sock:
        start = time.perf_counter()
        sock.sendall(b"%d\n" % size)
        while got < size:
            n = sock.recv_into(view)
            if not n:
                raise ConnectionError(f"stream ended after {got} of {size} bytes")
            got += n
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- measurements


async def _latency(procs: _Processes, cfg: RunConfig) -> dict[str, list[float]]:
    port = procs.ports["echo"]
    ways = {"direct": (_direct, procs.proxy["http"]), "http": (_tunnel_http, procs.proxy["http"]),
            "socks5": (_tunnel_socks, procs.proxy["socks"])}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(cfg.gateway_latency_warmup + cfg.gateway_latency_runs):
        for name, (open_, proxy) in ways.items():
            elapsed = await asyncio.wait_for(_setup_echo(open_, proxy, port), STEP)
            if i >= cfg.gateway_latency_warmup:
                samples[name].append(elapsed)
    return samples


async def _throughput(procs: _Processes, cfg: RunConfig) -> dict[str, list[float]]:
    port, size = procs.ports["source"], cfg.gateway_stream_bytes
    rates: dict[str, list[float]] = {"direct": [], "http": []}
    for i in range(1 + cfg.gateway_stream_runs):
        for name, proxy in (("direct", None), ("http", procs.proxy["http"])):
            seconds = await anyio.to_thread.run_sync(_blocking_stream, proxy, port, size)
            if i >= 1:
                rates[name].append(size / 1e6 / seconds)
    return rates


async def _concurrent(procs: _Processes, n: int) -> dict[str, Any]:
    """``n`` tunnels open at once, each echoing a message; counts errors and the gateway's open relays."""
    port, proxy = procs.ports["echo"], procs.proxy["http"]
    all_open, all_done = asyncio.Event(), asyncio.Event()
    opened: list[float] = []
    errors: list[str] = []
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        start = time.perf_counter()
        try:
            reader, writer = await _tunnel_http(proxy, port)
            writers.append(writer)
            message = b"%06d" % i
            writer.write(message)
            if await reader.readexactly(len(message)) != message:
                raise ConnectionError("echo mismatch")
            opened.append(time.perf_counter() - start)
        except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if len(opened) + len(errors) == n:
                all_done.set()
        await all_open.wait()

    start = time.perf_counter()
    async with asyncio.timeout(120):
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await all_done.wait()
        all_open.set()
        wall = time.perf_counter() - start
        from stockade.gateway.process import control

        reply = await control(procs.control, {"op": "connections"})
        peak = len(reply.get("connections", []))
        assert procs.gateway is not None
        peak_memory = process_memory([procs.gateway.pid])
        await asyncio.gather(*tasks)
    for writer in writers:
        writer.close()
    return {
        "connections": n,
        "errors": len(errors),
        "first_errors": errors[:5],
        "open_in_gateway_at_peak": peak,
        "all_open_wall_ms": wall * 1000,
        "setup": summarise(ms(opened), "ms", 0) if opened else None,
        "gateway_rss_at_peak_mib": peak_memory.rss_kib / 1024,
    }


def _memory(pid: int) -> dict[str, float]:
    use = process_memory([pid])
    return {"rss_mib": use.rss_kib / 1024, "pss_mib": use.pss_kib / 1024, "uss_mib": use.uss_kib / 1024}


async def run_gateway(cfg: RunConfig, workdir: Path) -> SystemResult:
    system = SystemResult("gateway", "backend", "stockade egress gateway (`python -m stockade.gateway`)")
    procs = _Processes(workdir)
    try:
        try:
            procs.start()
        except (OSError, RuntimeError, ValueError) as exc:
            system.unavailable(f"could not start the gateway or the fake upstream: {exc}")
            return system
        assert procs.gateway is not None
        await anyio.sleep(0.5)
        system.info["memory_idle"] = _memory(procs.gateway.pid)
        system.info["upstream"] = f"{UPSTREAM} (name {NAME} via the gateway's static resolver)"

        latency = await _latency(procs, cfg)
        for name, samples in latency.items():
            system.put(f"connect_{name}", summarise(ms(samples), "ms", cfg.gateway_latency_warmup))
        direct = system.metrics["connect_direct"]["p50"]
        system.info["added_connect_ms"] = {
            way: system.metrics[f"connect_{way}"]["p50"] - direct for way in ("http", "socks5")}

        rates = await _throughput(procs, cfg)
        for name, samples in rates.items():
            system.put(f"stream_{name}", summarise(samples, "MB/s", 1, bytes=cfg.gateway_stream_bytes))
        system.info["stream_ratio"] = system.metrics["stream_http"]["p50"] / system.metrics["stream_direct"]["p50"]

        system.info["concurrent"] = await _concurrent(procs, cfg.gateway_concurrent)
        await anyio.sleep(1.0)
        system.info["memory_after_load"] = _memory(procs.gateway.pid)
        if procs.gateway.poll() is not None:
            system.skip("gateway", f"the gateway process exited ({procs.gateway.returncode}) during the run")
    except Exception as exc:
        system.skip("gateway", f"failed: {type(exc).__name__}: {exc}")
    finally:
        procs.stop()
    return system
