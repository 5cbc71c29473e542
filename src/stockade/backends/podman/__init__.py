"""The ``podman`` backend: the docker backend's code over Podman's Docker-compatible REST API
(``podman system service``); see ``_backend`` for where it differs."""

from ._backend import PodmanBackend, probe

__all__ = ["PodmanBackend", "probe"]
