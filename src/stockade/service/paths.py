"""Where the service keeps its socket, token and journal when nothing else is said."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_service_dir", "default_socket_path", "default_token_path"]


def _state_root() -> Path:
    # The same root the bwrap backend uses, so one STOCKADE_STATE_DIR moves everything of one installation.
    env = os.environ.get("STOCKADE_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/stockade")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "stockade"


def default_service_dir() -> Path:
    """``<state root>/service``: the token and the snapshot journal (``$STOCKADE_STATE_DIR`` moves it)."""
    return _state_root() / "service"


def default_socket_path() -> Path:
    """``$STOCKADE_SOCKET``, else ``/run/stockade/stockade.sock`` for root, else
    ``$XDG_RUNTIME_DIR/stockade/stockade.sock``, else ``<service dir>/stockade.sock``."""
    env = os.environ.get("STOCKADE_SOCKET")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/stockade/stockade.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "stockade" / "stockade.sock"
    return default_service_dir() / "stockade.sock"


def default_token_path() -> Path:
    """``<service dir>/token``."""
    return default_service_dir() / "token"
