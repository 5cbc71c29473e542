"""The ``bwrap`` backend (bubblewrap namespaces); see ``_backend`` for where it differs from the contract."""

from ._backend import BwrapBackend, probe

__all__ = ["BwrapBackend", "probe"]
