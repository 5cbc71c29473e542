"""``stockade image build``: make a base image for the container backends from local files (no registry).

``--base busybox`` (default) packs the host's static busybox, optionally with the host's python3
(``--python``); ``--base debian`` runs ``debootstrap --variant=minbase`` from the Debian archive apt already
uses (python3 included unless ``--no-python``). The result is imported into the engine under ``--tag``
(default ``stockade/base:latest``, the image the docker backend uses when a spec names none). Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register_image"]


def register_image(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``image build`` to the ``stockade`` parser."""
    from .cli import _add_command, _add_json_flag

    parser = _add_command(commands, "image", _cmd_image, "build base images for the container backends")
    sub = parser.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True,
                                parser_class=type(parser))
    build = sub.add_parser("build", help="build a base image from local files and import it into the engine",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.set_defaults(handler=_cmd_image)
    build.add_argument("--engine", choices=("docker", "podman"), default="docker", help="default: docker")
    build.add_argument("--host", metavar="URL",
                       help="the engine's API (default: $STOCKADE_DOCKER_HOST, $DOCKER_HOST, the usual socket)")
    build.add_argument("--base", choices=("busybox", "debian"), default="busybox", help="default: busybox")
    python = build.add_mutually_exclusive_group()
    python.add_argument("--python", action="store_true", default=None,
                        help="include python3 (busybox: the host's; debian: the archive's, the default there)")
    python.add_argument("--no-python", dest="python", action="store_false", help="leave python3 out")
    build.add_argument("--tag", default=None, metavar="NAME[:TAG]", help="default: stockade/base:latest")
    build.add_argument("--suite", default="bookworm", help="debian: the release (default: bookworm)")
    build.add_argument("--mirror", metavar="URL", help="debian: the archive (default: the one apt uses)")
    _add_json_flag(build, 'print {"image": TAG, "id": ID}')


def _cmd_image(args: argparse.Namespace) -> int:
    from .backends.docker import DEFAULT_IMAGE
    from .backends.docker._engine import Engine, default_base_url
    from .backends.docker._image import build_image
    from .cli import EXIT_OK, _print_json

    python = args.python if args.python is not None else args.base == "debian"
    tag = args.tag or DEFAULT_IMAGE
    engine = Engine(args.host or default_base_url(args.engine), args.engine, timeout=600)

    def progress(line: str) -> None:
        sys.stderr.write(f"stockade image: {line}\n")
        sys.stderr.flush()

    try:
        image_id = build_image(engine, tag, args.base, python=python, suite=args.suite, mirror=args.mirror,
                               progress=progress)
    finally:
        engine.close()
    if args.json:
        _print_json({"image": tag, "id": image_id})
    else:
        sys.stdout.write(f"{tag} {image_id}\n")
    return EXIT_OK
