"""``stockade gc``: reap sessions whose sandbox (supervisor) is gone.

A session whose sandbox died (killed, host restart) keeps its state directory, cgroup and gateway until
something terminates it; ``list`` shows it as ``health: dead``. ``gc`` terminates exactly those and leaves live
sessions alone. Backends offer it through a ``gc() -> list[str]`` method (the bwrap backend does); for others the
command reports that there is nothing it can reap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .errors import InvalidRequest, Unsupported
from .registry import default_backend_name, open_backend

if TYPE_CHECKING:
    from .backend import SandboxBackend

__all__ = ["register_gc"]


def register_gc(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``gc`` subcommand to the ``stockade`` parser."""
    from .cli import _add_backend_flag, _add_command, _add_json_flag

    parser = _add_command(commands, "gc", _cmd_gc, "terminate the sessions whose sandbox is gone (dead sessions)")
    _add_backend_flag(parser)
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the backend's state directory (default: the backend's own, e.g. $STOCKADE_STATE_DIR)",
    )
    _add_json_flag(parser, 'print {"backend": NAME, "reaped": [ID, ...]}')


def _open(name: str | None, state_dir: str | None) -> SandboxBackend:
    name = name or default_backend_name()
    if state_dir is None:
        return open_backend(name)
    try:
        return open_backend(name, state_dir=state_dir)
    except TypeError as exc:
        raise InvalidRequest(f"backend {name} has no state directory to point --state-dir at") from exc


def _cmd_gc(args: argparse.Namespace) -> int:
    from .cli import EXIT_OK, _print_json

    async def reap() -> tuple[str, list[str]]:
        async with _open(args.backend, args.state_dir) as backend:
            gc: Callable[[], list[str]] | None = getattr(backend, "gc", None)
            if gc is None:
                raise Unsupported(backend.name, "gc", "its sessions are not kept in a state directory to reap")
            return backend.name, await anyio.to_thread.run_sync(gc)

    name, reaped = anyio.run(reap)
    if args.json:
        _print_json({"backend": name, "reaped": reaped})
    elif reaped:
        sys.stdout.write(f"reaped {len(reaped)} dead session(s) of {name}:\n")
        sys.stdout.write("".join(f"{session_id}\n" for session_id in reaped))
    else:
        sys.stdout.write(f"no dead sessions of {name}\n")
    return EXIT_OK
