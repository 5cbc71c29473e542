"""The ``ray`` backend: sessions placed over a Ray cluster, each node enforcing with its local backend.

``open_backend("ray", address="head:6379", node_backend="bwrap", snapshot_store="/shared/snapshots")``; see
``_backend`` for where it differs from the contract and docs/ray.md for operations.
"""

from ._backend import RayBackend, probe

__all__ = ["RayBackend", "probe"]
