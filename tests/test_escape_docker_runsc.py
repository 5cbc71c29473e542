"""The escape suite (docs/escape-suite.md) on the docker backend with gVisor (runsc) against a private dockerd,
with the busybox+python image: one pytest test per ``escape.*`` case.

What the suite finds and the backend has not fixed runs as strict xfails: measured on every run, and red the
day the fix lands (then the entry goes). docs/docker.md lists the same gaps.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance.pytest_plugin import make_escape_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-runsc-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

KNOWN_ESCAPES: dict[str, str] = {}


def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    if not daemon.runsc:
        pytest.skip("runsc (Debian package 'runsc') is not installed")
    return DockerBackend(daemon.url, runtime="runsc", image=daemon.image(PY_IMAGE), state_dir=_STATE)


test_escape = make_escape_tests(_backend, known_failures=KNOWN_ESCAPES)
