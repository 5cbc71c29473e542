"""A fake upstream for the gateway benchmark, in its own process, on a loopback address (stdlib only).

    python -m bench.upstream --host 127.0.0.2

Prints ``{"echo": PORT, "source": PORT}`` once listening. ``echo`` sends back what it gets (latency and
concurrency); ``source`` reads a decimal byte count and a newline, sends that many zero bytes and closes
(throughput). It exits when its stdin closes (the benchmark went away) or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import sys
import threading

__all__ = ["main"]

_BLOCK = memoryview(bytes(4 << 20))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _source_one(conn: socket.socket) -> None:
    with conn:
        line = b""
        while not line.endswith(b"\n") and len(line) < 32:
            chunk = conn.recv(32)
            if not chunk:
                return
            line += chunk
        left = int(line.strip() or b"0")
        try:
            while left > 0:
                view = _BLOCK[: min(left, len(_BLOCK))]
                conn.sendall(view)
                left -= len(view)
        except OSError:
            return


def _source_loop(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_source_one, args=(conn,), daemon=True).start()


async def _serve(host: str, max_seconds: float) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit("bench.upstream serves on loopback addresses only")
    echo = await asyncio.start_server(_echo, host, 0, backlog=4096, limit=65536)
    source = socket.create_server((host, 0), backlog=256)
    threading.Thread(target=_source_loop, args=(source,), daemon=True).start()
    ports = {"echo": echo.sockets[0].getsockname()[1], "source": source.getsockname()[1]}
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def watch_stdin() -> None:  # a daemon thread: a blocked read must not keep the process alive
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin_closed.wait(), max_seconds)
    echo.close()
    source.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
