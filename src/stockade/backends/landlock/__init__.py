"""The ``landlock`` backend (Landlock, seccomp and rlimits, no namespaces); see ``_backend`` for where it
differs from the contract."""

from ._backend import LandlockBackend, probe

__all__ = ["LandlockBackend", "probe"]
