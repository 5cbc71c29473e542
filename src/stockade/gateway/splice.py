"""Relaying one direction of an allowed connection with ``splice(2)``: socket -> pipe -> socket in the kernel.

Why: once the gateway has decided a connection (and checked a TLS ClientHello's SNI), it only copies bytes.
Copying them through Python (``StreamReader.read`` then ``StreamWriter.write``) costs a user-space copy and
several event-loop callbacks per chunk; ``splice`` moves the pages between the two sockets through a pipe
without them reaching user space, which matters for one big download and costs nothing for small requests.

How it takes over from asyncio's streams without losing or reordering a byte:

1. the source transport stops reading (``pause_reading``); whatever it had already read sits in the
   ``StreamReader``'s buffer, which is taken as it is (a private attribute, checked: without it, or for a
   transport that is not a plain socket, :func:`splice_relay` declines and the caller copies as before) and
   written first;
2. the destination transport's write buffer is flushed completely (high-water mark 0, then ``drain``);
3. from then on this coroutine owns both directions' bytes on duplicates of the two descriptors (asyncio
   refuses a second watcher on a transport's own descriptor), waiting for readiness with ``add_reader`` /
   ``add_writer``. An EOF from the source is passed on as ``shutdown(SHUT_WR)``, as ``write_eof`` did.

Cancelling the coroutine (a policy update cutting the connection, the other direction failing) closes the
duplicates and the pipe; the transports themselves are closed or aborted by the caller as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable

__all__ = ["available", "splice_relay"]

_CHUNK = 1 << 20
"""Bytes asked for per splice; the pipe is resized towards this (the kernel caps it at pipe-max-size)."""
_F_SETPIPE_SZ = 1031


def available() -> bool:
    """Whether this Python and platform have ``os.splice`` (Linux, Python 3.10+)."""
    return hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")


def _socket_of(transport: asyncio.BaseTransport) -> socket.socket | None:
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type != socket.SOCK_STREAM:
        return None
    return sock  # type: ignore[no-any-return]


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():  # level-triggered: it can fire again before this coroutine runs
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def splice_relay(
    reader: asyncio.StreamReader,
    source: asyncio.BaseTransport,
    writer: asyncio.StreamWriter,
    count: Callable[[int], None],
) -> bool:
    """Relay ``source`` (read through ``reader``) into ``writer`` until EOF; False if splice cannot be used here
    (nothing was touched then, and the caller relays the ordinary way)."""
    if not available():
        return False
    src_sock, dst_sock = _socket_of(source), _socket_of(writer.transport)
    buffer = getattr(reader, "_buffer", None)
    if src_sock is None or dst_sock is None or not isinstance(buffer, bytearray):
        return False
    if not isinstance(source, asyncio.ReadTransport):
        return False
    loop = asyncio.get_running_loop()
    source.pause_reading()
    # Everything the transport read before the pause is in the reader's buffer: it goes first.
    pending = bytes(buffer)
    del buffer[:]
    eof = reader.at_eof() or bool(getattr(reader, "_eof", False))
    if pending:
        writer.write(pending)
        count(len(pending))
    # With both water marks at 0, drain() returns only once the transport's buffer is empty: nothing it still
    # holds can be overtaken by what splice writes to the socket directly.
    writer.transport.set_write_buffer_limits(high=0, low=0)
    await writer.drain()
    if writer.transport.get_write_buffer_size():
        raise ConnectionResetError(errno.EPIPE, "the destination closed before its buffer was written")
    if eof:
        with contextlib.suppress(OSError):
            dst_sock.shutdown(socket.SHUT_WR)
        return True

    src_fd = os.dup(src_sock.fileno())
    dst_fd = -1
    pipe_r = pipe_w = -1
    try:
        dst_fd = os.dup(dst_sock.fileno())
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, _CHUNK)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while True:
            try:
                moved = os.splice(src_fd, pipe_w, _CHUNK, flags=flags)
            except BlockingIOError:
                await _ready(loop, src_fd, write=False)
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    raise ConnectionResetError(exc.errno, exc.strerror) from None
                raise
            if moved == 0:
                with contextlib.suppress(OSError):
                    dst_sock.shutdown(socket.SHUT_WR)
                return True
            left = moved
            while left:
                try:
                    left -= os.splice(pipe_r, dst_fd, left, flags=flags)
                except BlockingIOError:
                    await _ready(loop, dst_fd, write=True)
                except OSError as exc:
                    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                        raise ConnectionResetError(exc.errno, exc.strerror) from None
                    raise
            count(moved)
    finally:
        for fd in (src_fd, dst_fd, pipe_r, pipe_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
