"""The ``docker`` backend (one container per session, runc or gVisor); see ``_backend`` for where it differs
from the contract."""

from ._backend import DEFAULT_IMAGE, DockerBackend, probe

__all__ = ["DEFAULT_IMAGE", "DockerBackend", "probe"]
