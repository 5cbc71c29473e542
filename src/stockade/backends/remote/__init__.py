"""The ``remote`` backend (an HTTP client of ``stockade serve``); see ``_backend`` for where it differs."""

from ._backend import RemoteBackend, probe

__all__ = ["RemoteBackend", "probe"]
