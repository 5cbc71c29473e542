"""The escape suite (docs/escape-suite.md) on the podman backend (Podman's Docker-compatible API) against a
private service, with the busybox+python image: one pytest test per ``escape.*`` case.

What the suite finds and the backend has not fixed runs as strict xfails: measured on every run, and red the
day the fix lands (then the entry goes).
"""

import atexit
import shutil
import tempfile
from pathlib import Path

from _docker_fixtures import PY_IMAGE, podman_or_skip
from stockade.backends.podman import PodmanBackend
from stockade.conformance.pytest_plugin import make_escape_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-podman-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

KNOWN_ESCAPES: dict[str, str] = {}


def _backend() -> PodmanBackend:
    service = podman_or_skip()
    return PodmanBackend(service.url, image=service.image(PY_IMAGE), state_dir=_STATE)


test_escape = make_escape_tests(_backend, known_failures=KNOWN_ESCAPES)
