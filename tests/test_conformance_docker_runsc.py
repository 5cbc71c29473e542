"""The conformance suite on the docker backend with gVisor (runsc) against a private dockerd."""

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-runsc-"))
atexit.register(shutil.rmtree, _STATE, True)


def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    if not daemon.runsc:
        pytest.skip("runsc (Debian package 'runsc') is not installed")
    return DockerBackend(daemon.url, runtime="runsc", image=daemon.image(PY_IMAGE), state_dir=_STATE)


test_conformance = make_conformance_tests(_backend)
