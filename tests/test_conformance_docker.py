"""The conformance suite on the docker backend (runc) against a private dockerd, with the busybox+python image."""

import atexit
import shutil
import tempfile
from pathlib import Path

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-docker-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store


def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    return DockerBackend(daemon.url, image=daemon.image(PY_IMAGE), state_dir=_STATE)


test_conformance = make_conformance_tests(_backend)
