"""The ``stockade`` command.

Every subcommand is added by one registrar function (see :func:`_command_registrars`); a handler takes the
parsed arguments and returns the exit status. Errors of stockade itself print one line ``stockade: <message>``
on stderr and exit :data:`EXIT_STOCKADE_ERROR`, so that callers can tell them from the command's own statuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

import anyio

from . import __version__
from .backend import ExecChunk, SandboxBackend, SpecGap
from .errors import ExecError, InvalidRequest, SandboxError
from .hostpatterns import normalise_name, parse_host_pattern
from .models import (
    MAX_CPU_COUNT,
    MAX_PIDS,
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    SandboxSpec,
    parse_duration,
)
from .policy import PermissionPolicy, parse_mount_arg, parse_size_mb
from .registry import available_backends, default_backend_name, default_candidate, open_backend

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_STOCKADE_ERROR",
    "EXIT_TERMINATED",
    "EXIT_TIMEOUT",
    "build_parser",
    "main",
]

# Exit statuses of stockade itself; everything else `run` returns is the command's own. 124 and 125 follow
# timeout(1) and `docker run`, so scripts that already handle those tools handle stockade.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 124
EXIT_STOCKADE_ERROR = 125
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

_EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK:<5} success
  {EXIT_FAILED:<5} doctor: a conformance case failed; check: the backend would not enforce part of the spec
  N     run: the command's own exit status (128+N when signal N killed it)
  {EXIT_TIMEOUT:<5} run: the command timed out
  {EXIT_STOCKADE_ERROR:<5} stockade's own error: bad flags, bad spec or policy, backend unknown or unavailable
  {EXIT_INTERRUPTED:<5} interrupted by Ctrl-C ({EXIT_TERMINATED} by SIGTERM); the session is terminated first

Set STOCKADE_DEBUG=1 to see the traceback of an unexpected internal error.
"""

_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Handler = Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 125, not argparse's 2, which would be mistaken for the command's own status."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_STOCKADE_ERROR, f"stockade: {message} (see '{self.prog} --help')\n")


Registrar = Callable[["argparse._SubParsersAction[_Parser]"], None]


def _command_registrars() -> list[Registrar]:
    """Every subcommand, in ``--help`` order.

    ``session create|list|show|exec|mount|net|snapshot|resume|terminate|log|cp``, ``serve`` and ``gc`` are
    added here as registrars of their own (in ``stockade._cli``) when they exist.
    """
    from ._cli_gc import register_gc  # imported here: it builds on this module's helpers
    from ._cli_image import register_image
    from ._cli_ray import register_ray
    from ._cli_serve import register_serve
    from ._cli_session import register_session

    return [
        _register_run,
        _register_check,
        register_session,
        _register_backends,
        _register_capabilities,
        _register_doctor,
        register_serve,
        register_gc,
        register_image,
        register_ray,
        _register_version,
    ]


def build_parser() -> argparse.ArgumentParser:
    """The full ``stockade`` argument parser."""
    parser = _Parser(
        prog="stockade",
        description="Run untrusted commands in sandboxes that enforce a declared permission policy.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for register in _command_registrars():
        register(commands)
    return parser


def _add_command(commands: argparse._SubParsersAction[_Parser], name: str, handler: Handler, help_text: str) -> _Parser:
    parser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_backend_flag(parser: _Parser, *, help_text: str = "backend to use (default: the first available)") -> None:
    parser.add_argument("--backend", metavar="B", help=help_text)


def _add_json_flag(parser: _Parser, help_text: str) -> None:
    parser.add_argument("--json", action="store_true", help=help_text)


# ----------------------------------------------------------------------------------- flag value parsing
# argparse reports an ArgumentTypeError as "argument --flag: <message>", so each message below names its flag.


def _strip_field(exc: InvalidRequest) -> str:
    prefix = f"{exc.field}: " if exc.field else ""
    return exc.message[len(prefix) :] if prefix and exc.message.startswith(prefix) else exc.message


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(_strip_field(exc)) from None

    return parse


def _mount_type(access: FilesystemAccess, flag: str) -> Callable[[str], Any]:
    return _flag_type(lambda text: parse_mount_arg(text, access, flag))


def _bounded_int_type(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} (got {value})")
        return value

    return parse


def _key_value(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return key, value


def _env_type(text: str) -> tuple[str, str]:
    key, value = _key_value(text, "KEY=VALUE")
    if not _ENV_KEY_RE.match(key):
        raise argparse.ArgumentTypeError(f"KEY must match [A-Za-z_][A-Za-z0-9_]* (got {key!r})")
    return key, value


def _resolve_type(text: str) -> tuple[str, str]:
    name, address = _key_value(text, "NAME=ADDRESS")
    try:
        canonical = normalise_name(name)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(f"NAME is not a host name: {_strip_field(exc)}") from None
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ADDRESS must be an IPv4 or IPv6 address (got {address!r})") from None
    return canonical, str(ip)


def _add_spec_flags(parser: _Parser) -> None:
    """The flags that describe a SandboxSpec, shared by ``run`` and ``check``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--spec", metavar="FILE.json", help="start from this SandboxSpec (JSON)")
    source.add_argument("--policy", metavar="FILE.toml", help="start from this permission policy (TOML)")
    group = parser.add_argument_group("sandbox (added to, or overriding, --spec / --policy)")
    group.add_argument(
        "--ro",
        metavar="SRC[:DST]",
        action="append",
        default=[],
        type=_mount_type(FilesystemAccess.READ_ONLY, "--ro"),
        help="mount host SRC read-only at guest DST (default: the same path); repeatable",
    )
    group.add_argument(
        "--rw",
        metavar="SRC[:DST]",
        action="append",
        default=[],
        type=_mount_type(FilesystemAccess.READ_WRITE, "--rw"),
        help="mount host SRC read-write at guest DST; repeatable",
    )
    group.add_argument(
        "--allow-host",
        metavar="H",
        action="append",
        default=[],
        type=_flag_type(lambda text: parse_host_pattern(text).text),
        help="allow egress to H (name, *.suffix, address, each with an optional :port); repeatable",
    )
    network = group.add_mutually_exclusive_group()
    network.add_argument("--no-network", action="store_true", help="deny all network access (the default)")
    network.add_argument("--network", choices=("unrestricted",), help="allow any destination")
    group.add_argument(
        "--memory",
        metavar="SIZE",
        type=_flag_type(lambda text: parse_size_mb(text, "--memory")),
        help="memory limit, e.g. 512M or 2G",
    )
    group.add_argument("--cpus", metavar="N", type=_bounded_int_type(1, MAX_CPU_COUNT), help="CPU limit")
    group.add_argument("--pids", metavar="N", type=_bounded_int_type(1, MAX_PIDS), help="process-count limit")
    group.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_flag_type(lambda text: parse_duration(text, "--timeout")),
        help="wall-time limit of each command, e.g. 30s or 5m",
    )


# ------------------------------------------------------------------------------------- spec building


def _read_text(path: str, flag: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {what} file {path!r}: {exc.strerror or exc}", field=flag) from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} file {path!r} is not UTF-8 text", field=flag) from None


def _base_spec(args: argparse.Namespace) -> tuple[SandboxSpec, str]:
    """The spec from --spec or --policy (or the default), and how to name it in messages."""
    if args.spec is not None:
        text = _read_text(args.spec, "--spec", "spec")
        try:
            return SandboxSpec.parse(text), f"--spec {args.spec}"
        except InvalidRequest as exc:
            raise InvalidRequest(f"{args.spec}: {exc.message}", field="--spec") from None
    if args.policy is not None:
        text = _read_text(args.policy, "--policy", "policy")
        try:
            return PermissionPolicy.from_toml(text).to_spec(), f"--policy {args.policy}"
        except InvalidRequest as exc:
            raise InvalidRequest(f"{args.policy}: {exc.message}", field="--policy") from None
    return SandboxSpec(), "the default"


def _network(base: NetworkPolicy, origin: str, args: argparse.Namespace) -> NetworkPolicy:
    hosts: list[str] = args.allow_host
    if args.no_network:
        if hosts:
            raise InvalidRequest("cannot be combined with --no-network", field="--allow-host")
        return NetworkPolicy.deny_all()
    if args.network == "unrestricted":
        if hosts:
            raise InvalidRequest("cannot be combined with --network unrestricted", field="--allow-host")
        return NetworkPolicy.unrestricted()
    if not hosts:
        return base
    if base.mode == "unrestricted":
        # Adding an allow list to "anything goes" has no meaning we could guess safely: say so instead.
        raise InvalidRequest(
            f"{origin} allows unrestricted network access; an allow list cannot be added to it",
            field="--allow-host",
        )
    return NetworkPolicy.limited(*base.allowed_hosts, *hosts)


def build_spec(args: argparse.Namespace) -> SandboxSpec:
    """The spec of --spec / --policy with the command-line flags layered on top: flags add mounts and hosts
    and override limits and the network mode."""
    base, origin = _base_spec(args)
    limits: dict[str, Any] = {}
    if args.memory is not None:
        limits["memory_mb"] = args.memory
    if args.cpus is not None:
        limits["cpu_count"] = args.cpus
    if args.pids is not None:
        limits["pids_max"] = args.pids
    if args.timeout is not None:
        limits["wall_time"] = args.timeout
    mounts: list[FilesystemMount] = [*base.mounts, *args.ro, *args.rw]
    # Re-validate the whole result: a flag may mount over a target the spec already uses.
    data = base.model_dump()
    data.update(
        mounts=mounts,
        network_policy=_network(base.network_policy, origin, args),
        limits={**base.limits.model_dump(), **limits},
    )
    return SandboxSpec.parse(data)


# ------------------------------------------------------------------------------------------- backends


def _open(name: str | None, resolve: dict[str, str] | None = None) -> SandboxBackend:
    if not resolve:
        return open_backend(name)
    name = name or default_backend_name()
    try:
        return open_backend(name, resolve=resolve)
    except TypeError as exc:
        # Only the constructor's options can be wrong here: the name and the host were checked above.
        raise InvalidRequest(f"backend {name} does not accept --resolve") from exc


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _write_bytes(stream: TextIO, data: bytes) -> None:
    # Through the binary buffer so that the command's bytes arrive unchanged (no re-encoding).
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(data.decode("utf-8", errors="replace"))
    else:
        stream.flush()
        buffer.write(data)
        buffer.flush()


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ run


def _register_run(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(commands, "run", _cmd_run, "run one command in a fresh sandbox session")
    parser.usage = "stockade run [options] -- CMD [ARGS...]"
    _add_backend_flag(parser)
    _add_spec_flags(parser)
    execution = parser.add_argument_group("command")
    execution.add_argument(
        "--env",
        metavar="K=V",
        action="append",
        default=[],
        type=_env_type,
        help="set an environment variable for the command; repeatable",
    )
    execution.add_argument("--cwd", metavar="DIR", help="working directory of the command (a guest path)")
    execution.add_argument(
        "--resolve",
        metavar="NAME=ADDRESS",
        action="append",
        default=[],
        type=_resolve_type,
        help="make the backend's egress resolver answer NAME with ADDRESS (tests); repeatable",
    )
    execution.add_argument(
        "--egress-log",
        metavar="FILE",
        help="after the command, write the gateway's decisions (one JSON object per line) to FILE ('-': stderr)",
    )
    _add_json_flag(parser, "print the ExecResult as one JSON object instead of passing the output through")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help=argparse.SUPPRESS)


def _read_stdin() -> str | None:
    """The data piped into stockade, for the command; None when stdin is a terminal or absent."""
    stream = sys.stdin
    if stream is None or stream.closed:
        return None
    try:
        if stream.isatty():
            return None
        buffer = getattr(stream, "buffer", None)
        data = buffer.read() if buffer is not None else stream.read().encode("utf-8")
    except (OSError, ValueError):
        # Detached or unreadable stdin (daemons, some CI runners): the command gets none.
        return None
    if not data:
        return None
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("is not UTF-8 text; stockade passes stdin to the command as text", field="stdin") from None


def _cmd_run(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidRequest("run needs a command: stockade run [options] -- CMD [ARGS...]")
    spec = build_spec(args)
    timeout: timedelta | None = args.timeout
    request = ExecRequest.parse(
        {
            "command": argv[0],
            "args": argv[1:],
            "cwd": args.cwd,
            "env": dict(args.env),
            "stdin": _read_stdin(),
            "timeout": timeout,
        }
    )
    resolve = dict(args.resolve) or None

    def body() -> Awaitable[int]:
        return _run_in_session(args.backend, resolve, spec, request, args.json, args.egress_log)

    return anyio.run(_until_signalled, body)


async def _run_in_session(
    name: str | None,
    resolve: dict[str, str] | None,
    spec: SandboxSpec,
    request: ExecRequest,
    as_json: bool,
    egress_log: str | None = None,
) -> int:
    async with _open(name, resolve) as backend:
        session = await backend.provision(spec)
        try:
            status = await _exec(backend, session.id, request, as_json)
            if egress_log is not None:
                await _write_egress_log(backend, session.id, egress_log)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _terminate_quietly(backend, session.id)
            raise
        # Outside the except: a failure to clean up after a good run is stockade's error (125), not hidden.
        with anyio.CancelScope(shield=True):
            await backend.terminate(session.id)
        return status


async def _write_egress_log(backend: SandboxBackend, session_id: str, target: str) -> None:
    entries = await backend.network_log(session_id)
    text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    if target == "-":
        sys.stderr.write(text)
        sys.stderr.flush()
    else:
        with open(target, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - a small file, once per run
            f.write(text)


async def _terminate_quietly(backend: SandboxBackend, session_id: str) -> None:
    # The error already propagating says more than a cleanup failure; still report the leak.
    try:
        await backend.terminate(session_id)
    except Exception as exc:
        _say(f"warning: could not terminate session {session_id}: {exc}")


async def _exec(backend: SandboxBackend, session_id: str, request: ExecRequest, as_json: bool) -> int:
    if as_json:
        result = await backend.exec(session_id, request)
        _print_json(result.to_json())
        return _status(result)
    final: ExecResult | None = None
    async for item in backend.exec_stream(session_id, request):
        if isinstance(item, ExecChunk):
            _write_bytes(sys.stdout if item.stream == "stdout" else sys.stderr, item.data)
        else:
            final = item
    if final is None:
        raise ExecError(f"backend {backend.name} ended the output stream without a result")
    # Limits that fired are reported, never silent; with --json they are fields of the result instead.
    if final.timed_out:
        _say("the command timed out")
    if final.oom_killed:
        _say("the command was killed for exceeding its memory limit")
    if final.truncated:
        _say("the command's output was truncated")
    return _status(final)


def _status(result: ExecResult) -> int:
    if result.timed_out:
        return EXIT_TIMEOUT
    # The OS keeps only the low 8 bits: 256 would read as success, so anything out of range becomes a plain 1.
    return result.exit_code if 0 <= result.exit_code <= 255 else EXIT_FAILED


class _Signalled(Exception):
    """SIGINT or SIGTERM arrived; raised once the session is cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _until_signalled(body: Callable[[], Awaitable[int]]) -> int:
    """Run ``body``, turning SIGINT and SIGTERM into a cancellation so that its cleanup (terminate) runs.

    asyncio's own Ctrl-C handling cancels the main task, but a task group that is being cancelled anyway
    swallows that cancellation and the interrupt is lost; handling both signals here keeps them visible.
    """
    if threading.current_thread() is not threading.main_thread():
        return await body()  # signal handlers can only be installed from the main thread
    received: int | None = None
    status = EXIT_STOCKADE_ERROR
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal received
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        received = signum
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            status = await body()
            group.cancel_scope.cancel()
    except BaseExceptionGroup as group_error:
        # The task group wraps the body's own error; callers expect that error itself (SandboxError -> 125).
        if len(group_error.exceptions) == 1:
            raise group_error.exceptions[0] from None
        raise
    if received is not None:
        raise _Signalled(received)
    return status


# ---------------------------------------------------------------------------------------------- check


def _register_check(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(
        commands,
        "check",
        _cmd_check,
        "show what a backend would not enforce of a spec (exit 1 if anything)",
    )
    _add_backend_flag(parser)
    _add_spec_flags(parser)
    _add_json_flag(parser, "print the gaps as a JSON list of {field, capability, message}")


def _cmd_check(args: argparse.Namespace) -> int:
    spec = build_spec(args)

    async def check() -> list[SpecGap]:
        async with _open(args.backend) as backend:
            return backend.check(spec)

    gaps = anyio.run(check)
    if args.json:
        _print_json([{"field": g.field, "capability": g.capability, "message": g.message} for g in gaps])
    elif gaps:
        for gap in gaps:
            sys.stdout.write(f"{gap.field}: {gap.message} (capability {gap.capability} is false)\n")
    else:
        sys.stdout.write("the backend enforces everything in this spec\n")
    return EXIT_FAILED if gaps else EXIT_OK


# ------------------------------------------------------------------------------------- backends, caps


def _register_backends(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(commands, "backends", _cmd_backends, "list the backends and whether they can run here")
    _add_json_flag(parser, "print a JSON list of {name, available, reason}")


def _cmd_backends(args: argparse.Namespace) -> int:
    infos = available_backends()
    if args.json:
        _print_json([info.to_json() for info in infos])
        return EXIT_OK
    if not infos:
        sys.stdout.write("no backend is registered\n")
        return EXIT_OK
    rows = [["NAME", "AVAILABLE", "REASON"]]
    rows += [[i.name, "yes" if i.available else "no", i.reason or "-"] for i in infos]
    sys.stdout.write(_table(rows))
    return EXIT_OK


def _register_capabilities(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(commands, "capabilities", _cmd_capabilities, "show what a backend enforces on this host")
    _add_backend_flag(parser)
    _add_json_flag(parser, "print the SandboxCapabilities JSON object")


def _cmd_capabilities(args: argparse.Namespace) -> int:
    async def capabilities() -> tuple[str, dict[str, Any]]:
        async with _open(args.backend) as backend:
            return backend.name, backend.capabilities().to_json()

    name, caps = anyio.run(capabilities)
    if args.json:
        _print_json(caps)
        return EXIT_OK
    sys.stdout.write(f"backend: {name}\n")
    sys.stdout.write(_table([[flag, "yes" if value else "no"] for flag, value in caps.items()]))
    return EXIT_OK


# --------------------------------------------------------------------------------------------- doctor


def _register_doctor(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = _add_command(
        commands,
        "doctor",
        _cmd_doctor,
        "run the conformance suite against a backend (every available one by default)",
    )
    _add_backend_flag(parser, help_text="backend to check (default: every available backend)")
    parser.add_argument(
        "--suite",
        metavar="S",
        action="append",
        default=[],
        help="run only suite S (or a dotted part of one, like escape.fs); repeatable. The escape suite "
        "('escapes') runs only when named",
    )
    parser.add_argument("--case", metavar="SUBSTR", help="run only the cases whose id contains SUBSTR")
    _add_json_flag(parser, "print a JSON list with one report per backend")


DOCTOR_UPSTREAM_NAME = "api.upstream.test"
DOCTOR_UPSTREAM_ADDRESS = "127.0.0.2"


def _cmd_doctor(args: argparse.Namespace) -> int:
    # Imported here so that a broken conformance package cannot break `stockade --help` or `stockade run`.
    from .conformance import ConformanceOptions, Report, run_conformance

    if args.backend is not None:
        names = [args.backend]
    else:
        infos = available_backends()
        names = [info.name for info in infos if info.available and default_candidate(info.name)]
        if not names:
            reasons = "; ".join(f"{i.name}: {i.reason}" for i in infos) or "no backend is registered"
            raise SandboxError(f"no backend can run on this host ({reasons})")
    options = ConformanceOptions(suites=tuple(args.suite) or None, case_filter=args.case)

    async def one(name: str) -> Report:
        # The egress cases need an upstream: a name that the backend's injectable resolver maps to a listener
        # the cases open on 127.0.0.2 (treated as public for name rules only). Backends without those options
        # run without it, and their egress cases report not_measured.
        try:
            upstream = {DOCTOR_UPSTREAM_NAME: DOCTOR_UPSTREAM_ADDRESS}
            backend = open_backend(name, resolve=upstream, public_overrides=[DOCTOR_UPSTREAM_ADDRESS])
            run_options = dataclasses.replace(
                options, upstream_name=DOCTOR_UPSTREAM_NAME, upstream_address=DOCTOR_UPSTREAM_ADDRESS
            )
        except TypeError:
            backend, run_options = open_backend(name), options
        async with backend:
            return await run_conformance(backend, run_options)

    reports = [anyio.run(one, name) for name in names]
    if args.json:
        _print_json([report.to_json() for report in reports])
    else:
        sys.stdout.write("\n".join(report.render_text().rstrip("\n") for report in reports) + "\n")
    return EXIT_FAILED if any(report.failed for report in reports) else EXIT_OK


# -------------------------------------------------------------------------------------------- version


def _register_version(commands: argparse._SubParsersAction[_Parser]) -> None:
    _add_command(commands, "version", _cmd_version, "print the version of stockade")


def _cmd_version(args: argparse.Namespace) -> int:
    sys.stdout.write(f"stockade {__version__}\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- main


def _say(message: str) -> None:
    # One line per message, whatever the text holds (backend errors may carry a tool's multi-line stderr).
    line = " | ".join(part.strip() for part in message.splitlines() if part.strip())
    sys.stderr.write(f"stockade: {line}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stockade`` command with ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_STOCKADE_ERROR)
    handler: Handler = args.handler
    try:
        return handler(args)
    except SandboxError as exc:
        _say(exc.message)
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except _Signalled as exc:
        _say("interrupted" if exc.signum == signal.SIGINT else "terminated")
        return 128 + exc.signum
    except Exception as exc:
        if os.environ.get("STOCKADE_DEBUG"):
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (set STOCKADE_DEBUG=1 for the traceback)")
    return EXIT_STOCKADE_ERROR


if __name__ == "__main__":
    sys.exit(main())
