"""``stockade session ...``: long-lived sessions, on a local backend or through a service.

Without ``--url`` (or ``$STOCKADE_URL``) the commands open the local backend directly (``--backend``); the
backend keeps its sessions on disk, so each command is a separate process. With ``--url unix:///path`` or
``--url http://host:port`` they go through ``stockade serve`` (token from ``--token``, ``--token-file`` or
``$STOCKADE_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .backend import SandboxBackend
from .cli import (
    EXIT_OK,
    _add_backend_flag,
    _add_command,
    _add_json_flag,
    _add_spec_flags,
    _bounded_int_type,
    _env_type,
    _exec,
    _flag_type,
    _Parser,
    _print_json,
    _read_stdin,
    _table,
    build_spec,
)
from .errors import InvalidRequest
from .hostpatterns import parse_host_pattern
from .models import ExecRequest, FilesystemAccess, NetworkPolicy, SandboxSession, SandboxSpec, parse_duration
from .policy import parse_mount_arg
from .registry import open_backend

__all__ = ["register_session"]

T = TypeVar("T")

# "ID:/path" names a path in a session; anything else is a local path (write ./a:/b for a local one).
_SESSION_PATH_RE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9._-]{0,63}):(/.*)\Z", re.S)


def register_session(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(commands, "session", _missing, "create and use long-lived sessions (locally or "
                                                         "through a service with --url)")
    sub = parser.add_subparsers(dest="session_command", metavar="SUBCOMMAND", required=True, parser_class=_Parser)

    create = _sub(sub, "create", _cmd_create, "provision a session and print its id")
    _add_spec_flags(create)
    create.add_argument("--session-id", metavar="ID", help="the id to use (default: a fresh random one)")
    create.add_argument("--env", metavar="K=V", action="append", default=[], type=_env_type,
                        help="set an environment variable for every command of the session; repeatable")
    _add_json_flag(create, "print the SandboxSession JSON instead of the id")

    listing = _sub(sub, "list", _cmd_list, "list the live sessions")
    _add_json_flag(listing, "print a JSON list of SandboxSession objects")

    show = _sub(sub, "show", _cmd_show, "show one session")
    show.add_argument("session_id", metavar="ID")
    _add_json_flag(show, "print the SandboxSession JSON")

    run = _sub(sub, "exec", _cmd_exec, "run a command in a session (exit status mirrors the command's)")
    run.usage = "stockade session exec [options] ID -- CMD [ARGS...]"
    run.add_argument("session_id", metavar="ID")
    run.add_argument("--env", metavar="K=V", action="append", default=[], type=_env_type,
                     help="set an environment variable for the command; repeatable")
    run.add_argument("--cwd", metavar="DIR", help="working directory of the command (a guest path)")
    run.add_argument("--timeout", metavar="DURATION", type=_flag_type(lambda t: parse_duration(t, "--timeout")),
                     help="wall-time limit of the command, e.g. 30s")
    _add_json_flag(run, "print the ExecResult as one JSON object instead of passing the output through")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help=argparse.SUPPRESS)

    mount = _sub(sub, "mount", _cmd_mount, "make a host directory visible in a running session")
    mount.add_argument("session_id", metavar="ID")
    mount.add_argument("mount", metavar="SRC:DST", help="host SRC at guest DST")
    mount.add_argument("--ro", action="store_true", help="read-only (default: read-write)")
    _add_json_flag(mount, "print the SandboxSession JSON")

    net = _sub(sub, "net", _cmd_net, "replace a session's network policy")
    net.add_argument("session_id", metavar="ID")
    mode = net.add_mutually_exclusive_group(required=True)
    mode.add_argument("--allow-host", metavar="H", nargs="+",
                      type=_flag_type(lambda text: parse_host_pattern(text).text),
                      help="allow egress to these hosts only")
    mode.add_argument("--deny-all", action="store_true", help="no network access at all")
    mode.add_argument("--unrestricted", action="store_true", help="any destination")
    _add_json_flag(net, "print the SandboxSession JSON")

    snap = _sub(sub, "snapshot", _cmd_snapshot, "capture a session's writable state; print the snapshot id")
    snap.add_argument("session_id", metavar="ID")
    _add_json_flag(snap, "print the SandboxSnapshot JSON")

    resume = _sub(sub, "resume", _cmd_resume, "bring a suspended session back to running")
    resume.add_argument("session_id", metavar="ID")
    _add_json_flag(resume, "print the SandboxSession JSON")

    terminate = _sub(sub, "terminate", _cmd_terminate, "terminate a session (its snapshots stay)")
    terminate.add_argument("session_id", metavar="ID")

    netlog = _sub(sub, "log", _cmd_log, "print a session's network log, one JSON object a line")
    netlog.add_argument("session_id", metavar="ID")
    netlog.add_argument("--limit", metavar="N", type=_bounded_int_type(1, 100_000), help="only the last N")

    cp = _sub(sub, "cp", _cmd_cp, "copy a file into or out of a session (ID:/path on one side)")
    cp.usage = "stockade session cp [options] (ID:/guest/path LOCAL | LOCAL ID:/guest/path)"
    cp.add_argument("source", metavar="SRC", help="ID:/guest/path, a local file, or - for stdin")
    cp.add_argument("dest", metavar="DST", help="ID:/guest/path, a local file, or - for stdout")


def _sub(sub: argparse._SubParsersAction[_Parser], name: str, handler: Callable[[argparse.Namespace], int],
         help_text: str) -> _Parser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    target = parser.add_argument_group("where the sessions live")
    target.add_argument("--url", metavar="URL",
                        help="a stockade service: unix:///path/to.sock or http://host:port (default: "
                             "$STOCKADE_URL; without either, the local backend)")
    target.add_argument("--token", metavar="T", help="the service's bearer token (default: $STOCKADE_TOKEN)")
    target.add_argument("--token-file", metavar="F", help="read the bearer token from this file")
    _add_backend_flag(parser, help_text="local backend to use when no service is given (default: the first "
                                        "available)")
    return parser


def _missing(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires a subcommand
    raise InvalidRequest("session needs a subcommand (see 'stockade session --help')")


# ------------------------------------------------------------------------------------------------ backend


def _backend(args: argparse.Namespace) -> SandboxBackend:
    url = args.url
    if url is None and args.backend is None:
        url = os.environ.get("STOCKADE_URL") or None
    if url is None:
        if args.token or args.token_file:
            raise InvalidRequest("a token needs a service: give --url too", field="--token")
        return open_backend(args.backend)
    if args.backend is not None:
        raise InvalidRequest("choose either a local --backend or a service --url", field="--backend")
    token = args.token
    if token is None and args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise InvalidRequest(f"cannot read {args.token_file}: {exc.strerror}", field="--token-file") from None
    if token is None:
        token = os.environ.get("STOCKADE_TOKEN") or None
    return open_backend("remote", url=url, token=token)


def _with_backend(args: argparse.Namespace, body: Callable[[SandboxBackend], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _backend(args) as backend:
            return await body(backend)

    return anyio.run(main)


def _print_session(session: SandboxSession, as_json: bool) -> None:
    if as_json:
        _print_json(session.to_json())
        return
    rows = [["id", session.id], ["backend", session.backend], ["state", session.state.value]]
    rows += [[f"mount {m.target}", f"{m.access.value} {m.host_path or ''}".rstrip()] for m in session.mounts]
    rows += [[f"metadata {k}", v] for k, v in sorted(session.metadata.items())]
    sys.stdout.write(_table(rows))


# ----------------------------------------------------------------------------------------------- commands


def _cmd_create(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    extra: dict[str, Any] = {}
    if args.session_id is not None:
        extra["session_id"] = args.session_id
    if args.env:
        extra["env"] = {**spec.env, **dict(args.env)}
    if extra:
        spec = SandboxSpec.parse({**spec.to_json(), **extra})
    session = _with_backend(args, lambda b: b.provision(spec))
    if args.json:
        _print_json(session.to_json())
    else:
        sys.stdout.write(session.id + "\n")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    sessions = _with_backend(args, lambda b: b.list_sessions())
    if args.json:
        _print_json([s.to_json() for s in sessions])
    elif sessions:
        rows = [["ID", "STATE", "BACKEND"]] + [[s.id, s.state.value, s.backend] for s in sessions]
        sys.stdout.write(_table(rows))
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    _print_session(_with_backend(args, lambda b: b.get_session(args.session_id)), args.json)
    return EXIT_OK


def _cmd_exec(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidRequest("exec needs a command: stockade session exec ID -- CMD [ARGS...]")
    request = ExecRequest.parse({"command": argv[0], "args": argv[1:], "cwd": args.cwd, "env": dict(args.env),
                                 "stdin": _read_stdin(), "timeout": args.timeout})
    return _with_backend(args, lambda b: _exec(b, args.session_id, request, args.json))


def _cmd_mount(args: argparse.Namespace) -> int:
    if ":" not in args.mount:
        raise InvalidRequest("must be SRC:DST", field="SRC:DST")
    access = FilesystemAccess.READ_ONLY if args.ro else FilesystemAccess.READ_WRITE
    mount = parse_mount_arg(args.mount, access, "SRC:DST")
    _print_session(_with_backend(args, lambda b: b.attach_filesystem(args.session_id, mount)), args.json)
    return EXIT_OK


def _cmd_net(args: argparse.Namespace) -> int:
    if args.unrestricted:
        policy = NetworkPolicy.unrestricted()
    elif args.deny_all:
        policy = NetworkPolicy.deny_all()
    else:
        policy = NetworkPolicy.limited(*args.allow_host)
    _print_session(_with_backend(args, lambda b: b.apply_network_policy(args.session_id, policy)), args.json)
    return EXIT_OK


def _cmd_snapshot(args: argparse.Namespace) -> int:
    snap = _with_backend(args, lambda b: b.snapshot(args.session_id))
    if args.json:
        _print_json(snap.to_json())
    else:
        sys.stdout.write(snap.snapshot_id + "\n")
    return EXIT_OK


def _cmd_resume(args: argparse.Namespace) -> int:
    _print_session(_with_backend(args, lambda b: b.resume(args.session_id)), args.json)
    return EXIT_OK


def _cmd_terminate(args: argparse.Namespace) -> int:
    _with_backend(args, lambda b: b.terminate(args.session_id))
    return EXIT_OK


def _cmd_log(args: argparse.Namespace) -> int:
    for entry in _with_backend(args, lambda b: b.network_log(args.session_id, args.limit)):
        sys.stdout.write(json.dumps(entry) + "\n")
    return EXIT_OK


def _cmd_cp(args: argparse.Namespace) -> int:
    from .service import files

    source, dest = _SESSION_PATH_RE.match(args.source), _SESSION_PATH_RE.match(args.dest)
    if (source is None) == (dest is None):
        raise InvalidRequest("exactly one side must be ID:/path in a session (write ./NAME for a local file "
                             "whose name has a colon)", field="cp")
    if source is not None:
        session_id, guest = source.group(1), source.group(2)
        data = _with_backend(args, lambda b: files.read_file(b, session_id, guest))
        if args.dest == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            _write_local(Path(args.dest), data, guest)
        return EXIT_OK
    assert dest is not None
    session_id, guest = dest.group(1), dest.group(2)
    if args.source == "-":
        payload = sys.stdin.buffer.read()
    else:
        try:
            payload = Path(args.source).read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"cannot read {args.source}: {exc.strerror}", field="SRC") from None
    _with_backend(args, lambda b: files.write_file(b, session_id, guest, payload))
    return EXIT_OK


def _write_local(path: Path, data: bytes, guest: str) -> None:
    if path.is_dir():
        path = path / Path(guest).name
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise InvalidRequest(f"cannot write {path}: {exc.strerror}", field="DST") from None
