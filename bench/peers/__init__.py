"""Peers: the tools users would pick instead, measured on the same work in the same run.

Each is installed by a script in bench/ (``install_docker.sh``, ``install_srt.sh``, ``install_llm_sandbox.sh``),
never vendored, and skipped with the reason when it is not there. Peers that install into a directory use
``$STOCKADE_BENCH_PEERS`` (default ``/var/tmp/stockade-bench-peers``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["peers_dir"]


def peers_dir() -> Path:
    """Where bench/install_*.sh put the peers that are not system packages."""
    return Path(os.environ.get("STOCKADE_BENCH_PEERS") or "/var/tmp/stockade-bench-peers")
