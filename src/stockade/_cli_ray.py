"""``stockade ray up|status``: start a Ray node that hosts stockade sessions, and look at the cluster.

``up`` runs ``ray start --block`` in the foreground (it replaces this process), so the process to stop is the
one you started: Ctrl-C or SIGTERM stops the node and everything Ray started for it. Nothing here stops Ray by
name (``ray stop`` would stop every Ray on the machine). ``--print`` shows the command instead of running it,
for a unit file or a container entry point.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from .errors import BackendUnavailable, InvalidRequest

__all__ = ["register_ray"]


def register_ray(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``ray`` subcommand (``up``, ``status``) to the ``stockade`` parser."""
    from .cli import _add_command, _add_json_flag, _Parser

    parser = _add_command(commands, "ray", _cmd_help, "run Ray nodes that host sessions (the ray backend)")
    sub = parser.add_subparsers(dest="ray_command", metavar="SUBCOMMAND", required=True, parser_class=_Parser)

    up = sub.add_parser("up", help="start a head or worker node with its stockade slots (foreground)",
                        description="Start a Ray node that declares how many sessions it hosts.")
    up.set_defaults(handler=_cmd_up)
    role = up.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node")
    role.add_argument("--address", metavar="HOST:PORT", help="join the cluster whose head is at HOST:PORT")
    up.add_argument("--slots", type=_count, required=True, metavar="N",
                    help="how many sessions this node may hold (the stockade_slots resource)")
    up.add_argument("--port", type=_port, default=6379, help="the head's GCS port (default 6379)")
    up.add_argument("--node-ip", metavar="IP", help="the address other nodes reach this one at")
    up.add_argument("--num-cpus", type=_count, metavar="N", help="CPUs Ray may schedule tasks on here")
    up.add_argument("--object-store-bytes", type=_count, metavar="B", default=None,
                    help="the object store's size (default: Ray's minimum, 75 MiB; sessions move little data)")
    up.add_argument("--temp-dir", metavar="DIR", help="Ray's temporary directory for this node")
    up.add_argument("--state-dir", metavar="DIR", help="the node backend's state directory (STOCKADE_STATE_DIR)")
    up.add_argument("--label", action="append", default=[], metavar="K=V",
                    help="a Ray node label, for stockade.ray/select.K placement (repeatable)")
    up.add_argument("--fixed-agent-ports", action="store_true",
                    help="fixed ports 52365-52368 for Ray's per-node agents (firewalls, slow machines)")
    up.add_argument("--print", dest="print_only", action="store_true",
                    help="print the command instead of running it")

    status = sub.add_parser("status", help="nodes, free slots and the cluster's capabilities",
                            description="Connect to the cluster as a driver and show what hosts sessions.")
    status.set_defaults(handler=_cmd_status)
    status.add_argument("--address", metavar="ADDR",
                        help="the cluster (default: $STOCKADE_RAY_ADDRESS, $RAY_ADDRESS, then auto)")
    status.add_argument("--node-backend", default="bwrap", metavar="B", help="the nodes' backend (default bwrap)")
    _add_json_flag(status, "print {nodes: [...], capabilities: {...}}")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535 (got {value})")
    return value


def _cmd_help(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires a subcommand
    return 0


def _labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"must be KEY=VALUE (got {item!r})", field="--label")
        labels[key] = value
    return labels


def up_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``ray start`` argv and environment ``stockade ray up`` runs (without running it)."""
    from .backends.ray._nodes import MIN_OBJECT_STORE_BYTES, NodeOptions, node_argv, node_env

    options = NodeOptions(
        slots=args.slots,
        address=None if args.head else args.address,
        node_ip=args.node_ip,
        port=args.port,
        num_cpus=args.num_cpus,
        object_store_bytes=args.object_store_bytes or MIN_OBJECT_STORE_BYTES,
        temp_dir=args.temp_dir,
        state_dir=args.state_dir,
        labels=_labels(args.label),
        block=True,
        fixed_agent_ports=args.fixed_agent_ports,
    )
    return node_argv(options), node_env(options)


def _cmd_up(args: argparse.Namespace) -> int:
    from .cli import EXIT_OK

    argv, env = up_command(args)
    if args.print_only:
        added = [f"{key}={shlex.quote(value)}" for key, value in env.items() if os.environ.get(key) != value]
        sys.stdout.write(" ".join([*added, shlex.join(argv)]) + "\n")
        return EXIT_OK
    try:
        import ray  # noqa: F401 - only to say what is missing before exec
    except ImportError as exc:
        raise BackendUnavailable("ray", "ray is not installed: pip install 'stockade[ray]'") from exc
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)  # noqa: S606 - replaces this process: stop it by its PID, like any foreground service


def _cmd_status(args: argparse.Namespace) -> int:
    from .cli import EXIT_OK, _print_json, _table

    try:
        from .backends.ray import RayBackend
    except ImportError as exc:
        raise BackendUnavailable("ray", "ray is not installed: pip install 'stockade[ray]'") from exc
    backend = RayBackend(args.address, node_backend=args.node_backend)
    nodes = backend.nodes()
    caps = backend.capabilities().to_json()
    if args.json:
        _print_json({
            "nodes": [
                {"node_id": n.node_id, "ip": n.ip, "slots": n.slots, "usable": n.usable, "problem": n.problem,
                 "labels": dict(n.labels)}
                for n in nodes
            ],
            "capabilities": caps,
        })
        return EXIT_OK
    rows = [["NODE", "IP", "SLOTS", "USABLE", "PROBLEM"]]
    rows += [[n.node_id[:12], n.ip, f"{n.slots:g}", "yes" if n.usable else "no", n.problem or "-"] for n in nodes]
    sys.stdout.write(_table(rows))
    missing = [flag for flag, value in caps.items() if not value]
    sys.stdout.write(f"capabilities missing on some node: {', '.join(missing) or 'none'}\n")
    return EXIT_OK
