"""The escape suite (docs/escape-suite.md) on the docker backend (runc) against a private dockerd, with the
busybox+python image: one pytest test per ``escape.*`` case (gVisor: tests/test_escape_docker_runsc.py).

What the suite finds and the backend has not fixed runs as strict xfails: measured on every run, and red the
day the fix lands (then the entry goes). docs/docker.md lists the same gaps, and those of gVisor (runsc).
"""

import atexit
import shutil
import tempfile
from pathlib import Path

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance.pytest_plugin import make_escape_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-docker-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    return DockerBackend(daemon.url, image=daemon.image(PY_IMAGE), state_dir=_STATE)


test_escape = make_escape_tests(_backend)
