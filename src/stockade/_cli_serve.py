"""``stockade serve``: the HTTP service (see ``docs/service.md``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli import EXIT_OK, _add_backend_flag, _add_command, _bounded_int_type, _flag_type, _Parser
from .errors import InvalidRequest
from .models import parse_duration
from .policy import parse_size_mb

__all__ = ["register_serve"]


def register_serve(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(
        commands,
        "serve",
        _cmd_serve,
        "serve the sandbox API over HTTP: a 0600 unix socket by default, TCP with a bearer token",
    )
    _add_backend_flag(parser)
    parser.add_argument("--backend-option", metavar="KEY=JSON", action="append", default=[],
                        type=_backend_option,
                        help="pass KEY=value (JSON) to the backend's constructor, e.g. "
                             "state_dir='\"/srv/stockade\"'; repeatable")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--unix", metavar="PATH",
                       help="listen on this unix socket (default: $STOCKADE_SOCKET, /run/stockade/stockade.sock "
                            "for root, else $XDG_RUNTIME_DIR/stockade/stockade.sock)")
    where.add_argument("--host", metavar="H", help="listen on TCP at this address instead (a token is mandatory)")
    parser.add_argument("--port", metavar="P", type=_bounded_int_type(0, 65535), default=8765,
                        help="TCP port with --host (default 8765; 0 picks a free one)")
    parser.add_argument("--token-file", metavar="F",
                        help="the bearer token file, created 0600 on first start (default: <state dir>/service/"
                             "token); with --unix it makes the token required on the socket too")
    parser.add_argument("--rotate-token", action="store_true",
                        help="replace the token in the token file with a fresh one and exit; running services "
                             "take the new one at once")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the service keeps its snapshot journal (default: <state dir>/service)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body", metavar="SIZE", type=_flag_type(lambda t: parse_size_mb(t, "--max-body")),
                        default=32, help="largest request body (default 32M)")
    limits.add_argument("--max-file", metavar="SIZE", type=_flag_type(lambda t: parse_size_mb(t, "--max-file")),
                        default=8, help="largest file moved by the files API (default 8M)")
    limits.add_argument("--exec-timeout-ceiling", metavar="DURATION",
                        type=_flag_type(lambda t: parse_duration(t, "--exec-timeout-ceiling")),
                        help="no exec runs longer: longer timeouts are refused, sessions get it as wall_time")
    limits.add_argument("--max-sessions", metavar="N", type=_bounded_int_type(1, 1_000_000),
                        help="refuse to provision beyond N live sessions (429)")
    limits.add_argument("--mount-root", metavar="DIR", action="append", default=None,
                        help="mount sources must lie below DIR; repeatable (default: anywhere the backend allows)")


def _backend_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=JSON with KEY a Python identifier, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {key} is not JSON: {value!r}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from .service.auth import rotate_token
    from .service.paths import default_token_path
    from .service.server import ServeOptions, serve
    from .service.wire import ServiceLimits

    token_file = Path(args.token_file).absolute() if args.token_file else None
    if args.rotate_token:
        path = token_file or default_token_path()
        rotate_token(path)
        sys.stdout.write(f"new token written to {path}\n")
        return EXIT_OK
    if args.host is None and args.port != 8765:
        raise InvalidRequest("needs --host: without it the service listens on a unix socket", field="--port")
    mount_roots = None
    if args.mount_root is not None:
        mount_roots = tuple(str(Path(root).absolute()) for root in args.mount_root)
    ceiling = args.exec_timeout_ceiling.total_seconds() if args.exec_timeout_ceiling is not None else None
    options = ServeOptions(
        backend=args.backend,
        backend_options=dict(args.backend_option),
        unix=Path(args.unix).absolute() if args.unix else None,
        host=args.host,
        port=args.port,
        token_file=token_file,
        state_dir=Path(args.state_dir).absolute() if args.state_dir else None,
        limits=ServiceLimits(
            max_body_bytes=args.max_body << 20,
            max_file_bytes=args.max_file << 20,
            exec_timeout_ceiling=ceiling,
            max_sessions=args.max_sessions,
            mount_roots=mount_roots,
        ),
    )

    def announce(line: str) -> None:
        sys.stderr.write(f"stockade: {line}\n")
        sys.stderr.flush()

    serve(options, announce)
    return EXIT_OK
