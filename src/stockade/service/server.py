"""Binding and serving: a 0600 unix socket by default, TCP only when asked and then only with a bearer token.

The sockets are bound here, not by uvicorn: uvicorn makes unix sockets 0666, and the permissions *are* the
access control of a socket without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, LifecycleError
from .auth import TokenSource, ensure_token
from .paths import default_service_dir, default_socket_path, default_token_path
from .wire import ServiceLimits

__all__ = ["ServeOptions", "bind_tcp", "bind_unix", "serve"]


@dataclass(frozen=True)
class ServeOptions:
    """What ``stockade serve`` was asked for. ``host`` set means TCP (a token is then mandatory)."""

    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    unix: Path | None = None
    host: str | None = None
    port: int = 8765
    token_file: Path | None = None
    state_dir: Path | None = None
    limits: ServiceLimits = field(default_factory=ServiceLimits)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, in a directory created 0700 when missing.

    A stale socket (nobody accepting) is replaced; a live one or anything that is not a socket is refused.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidRequest(f"{path} exists and is not a socket; remove it or pick another path", field="unix")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale: left behind by a service that died
        else:
            raise LifecycleError(f"another service is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask while binding: the socket never exists with wider permissions, not even for a moment.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise LifecycleError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False, backlog=256)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LifecycleError(f"{host}:{port} is already in use") from exc
        raise LifecycleError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _token_for(options: ServeOptions) -> TokenSource | None:
    if options.host is not None:
        path = options.token_file or default_token_path()
    elif options.token_file is not None:
        path = options.token_file
    else:
        return None  # the socket's 0600 permissions are the access control
    ensure_token(path)
    return TokenSource(path=path)


def serve(options: ServeOptions, announce: Callable[[str], None] | None = None) -> None:
    """Bind, then serve until SIGINT/SIGTERM. ``announce`` gets one line once the service accepts requests."""
    try:
        import uvicorn
    except ImportError as exc:
        raise LifecycleError(f"the service needs uvicorn and starlette: pip install 'stockade[service]' ({exc})"
                             ) from exc
    from ..registry import open_backend
    from .app import create_app

    token = _token_for(options)
    try:
        backend = open_backend(options.backend, **options.backend_options)
    except TypeError as exc:
        raise InvalidRequest(f"the backend does not take these options: {exc}", field="--backend-option") from exc
    if options.host is not None:
        sock = bind_tcp(options.host, options.port)
        address = sock.getsockname()
        where = f"http://{options.host if ':' not in options.host else f'[{options.host}]'}:{address[1]}"
        unix_path: Path | None = None
    else:
        unix_path = options.unix or default_socket_path()
        sock = bind_unix(unix_path)
        where = f"unix://{unix_path}"
    ino = os.stat(unix_path).st_ino if unix_path is not None else None

    async def main() -> None:
        async with backend:
            state_dir = options.state_dir or default_service_dir()
            app = create_app(backend, token=token, limits=options.limits, state_dir=state_dir)
            config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)
            # Signals handled here, not by uvicorn: it re-raises SIGTERM after shutting down, which would kill
            # the process before the socket is removed and the backend closed.
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, setattr, server, "should_exit", True)
            # The socket already listens: requests that arrive before uvicorn accepts wait in its backlog.
            if announce is not None:
                auth = f"token in {token.path}" if token is not None and token.path else "socket permissions"
                announce(f"serving backend {backend.name} on {where} (auth: {auth})")
            await server.serve(sockets=[sock])

    try:
        asyncio.run(main())
    finally:
        sock.close()
        if unix_path is not None:
            # Only our own socket: a successor may already have bound the path again.
            with contextlib.suppress(OSError):
                if os.stat(unix_path).st_ino == ino:
                    os.unlink(unix_path)
        sys.stdout.flush()
