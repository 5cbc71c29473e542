"""``python -m stockade.gateway``: started with inherited fds, controlled over its unix socket, stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

import stockade
from stockade.gateway import audit
from stockade.gateway.dns import build_query, parse_response
from stockade.gateway.process import control, control_sync

pytestmark = pytest.mark.timeout(60)

UPSTREAM = "127.0.0.2"
STEP = 10.0
SRC = str(Path(stockade.__file__).resolve().parents[1])


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(50):
            await coro

    asyncio.run(bounded())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _tcp(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


async def _start(
    tmp_path: Path, policy: dict[str, Any], echo_port: int
) -> tuple[asyncio.subprocess.Process, dict[str, Any], dict[str, Any]]:
    http, socks = _tcp("127.0.0.1"), _tcp("127.0.0.1")
    transparent = _tcp("127.100.0.1", echo_port)  # the first name the stub hands out gets .1
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 0))
    socks_addr = socks.getsockname()
    config = {
        "session": "proc-1",
        "http_fd": http.fileno(),
        "socks_fd": socks.fileno(),
        "dns_fd": dns.fileno(),
        "transparent_fds": [transparent.fileno()],
        "control_path": str(tmp_path / "ctl.sock"),
        "log_path": str(tmp_path / "audit.jsonl"),
        "ready_path": str(tmp_path / "ready"),
        "policy": policy,
        "resolve": {"allowed.test": UPSTREAM},
        "die_with_parent": True,
    }
    cfg = tmp_path / "gateway.json"
    cfg.write_text(json.dumps(config))
    fds = [s.fileno() for s in (http, socks, transparent, dns)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stockade.gateway",
        "--config",
        str(cfg),
        pass_fds=fds,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    addrs = {
        "http": http.getsockname(),
        "socks": socks_addr,
        "dns": dns.getsockname(),
        "transparent": transparent.getsockname(),
    }
    # The child owns the sockets now: closing our copies means a dead gateway refuses connections.
    for s in (http, socks, transparent, dns):
        s.close()
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), STEP)
    if line != b"ready\n":
        assert proc.stderr is not None
        err = await proc.stderr.read()
        raise AssertionError(f"gateway did not start: {line!r} {err.decode()}")
    return proc, config, addrs


async def _tunnel(
    http: tuple[str, int], target: str
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*http)
    writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
    return int(head.split(b" ")[1]), reader, writer


def test_gateway_process_lifecycle(tmp_path: Path) -> None:
    async def go() -> None:
        echo = await asyncio.start_server(_echo, UPSTREAM, 0)
        p = echo.sockets[0].getsockname()[1]
        policy = {"mode": "limited", "allowed_hosts": [f"allowed.test:{p}", f"{UPSTREAM}:{p}"]}
        proc, config, addrs = await _start(tmp_path, policy, p)
        try:
            ctl = config["control_path"]
            assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
            assert (tmp_path / "ready").exists()
            pong = await control(ctl, {"op": "ping"})
            assert pong == {"ok": True, "session": "proc-1", "connections": 0}

            status, reader, writer = await _tunnel(addrs["http"], f"allowed.test:{p}")
            assert status == 200
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), STEP) == b"ping"

            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
                q.setblocking(False)
                await loop.sock_sendto(q, build_query("allowed.test"), addrs["dns"])
                _id, rcode, got = parse_response(await asyncio.wait_for(loop.sock_recv(q, 512), STEP))
            assert (rcode, got) == (0, ["127.100.0.1"])
            t_reader, t_writer = await asyncio.open_connection(*addrs["transparent"])
            t_writer.write(b"tp")
            assert await asyncio.wait_for(t_reader.readexactly(2), STEP) == b"tp"

            conns = await control(ctl, {"op": "connections"})
            assert len(conns["connections"]) == 2

            bad = control_sync(ctl, {"op": "policy", "policy": {"mode": "limited", "allowed_hosts": ["*"]}})
            assert bad["ok"] is False
            assert bad["error"]["code"] == "invalid_request"

            update = await control(ctl, {"op": "policy", "policy": {"mode": "limited", "allowed_hosts": []}})
            assert (update["ok"], update["closed"]) == (True, 2)
            assert await asyncio.wait_for(reader.read(), STEP) == b""
            writer.close()
            t_writer.close()
            status, _r, w2 = await _tunnel(addrs["http"], f"allowed.test:{p}")
            assert status == 403
            w2.close()

            assert (await control(ctl, {"op": "nope"}))["ok"] is False
            assert (await control(ctl, {"op": "stop"}))["ok"] is True
            assert await asyncio.wait_for(proc.wait(), STEP) == 0
            # Fail closed: with the gateway gone, its listeners are gone too.
            with pytest.raises(OSError):
                await asyncio.open_connection(*addrs["http"])

            lines = audit.read(Path(config["log_path"]))
            kinds = {(x["kind"], x["via"], x["decision"]) for x in lines}
            assert ("connect", "connect", "allowed") in kinds
            assert ("connect", "connect", "refused") in kinds
            assert ("connect", "transparent", "allowed") in kinds
            assert ("dns", "dns", "allowed") in kinds
            assert all(x["session"] == "proc-1" for x in lines)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            echo.close()

    run(go())
    assert not (tmp_path / "ctl.sock").exists()


def test_gateway_process_sigterm(tmp_path: Path) -> None:
    async def go() -> None:
        proc, _config, _addrs = await _start(tmp_path, {"mode": "unrestricted"}, 0)
        try:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), STEP) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(go())


def test_gateway_process_bad_config(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = tmp_path / "bad.json"
        cfg.write_text(json.dumps({"session": "x", "control_path": str(tmp_path / "c"), "http_fd": "five"}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stockade.gateway",
            "--config",
            str(cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        out, err = await asyncio.wait_for(proc.communicate(), STEP)
        assert proc.returncode == 2
        assert b"http_fd" in err
        assert out == b""

    run(go())
