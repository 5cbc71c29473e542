"""The conformance suite on the podman backend (Podman's Docker-compatible API) against a private service, with
the fake upstream of tests/test_conformance_docker.py for the egress cases."""

import atexit
import shutil
import tempfile
from pathlib import Path

from _docker_fixtures import PY_IMAGE, podman_or_skip
from stockade.backends.podman import PodmanBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-podman-"))
atexit.register(shutil.rmtree, _STATE, True)


def _backend() -> PodmanBackend:
    service = podman_or_skip()
    return PodmanBackend(service.url, image=service.image(PY_IMAGE), state_dir=_STATE,
                         resolve={UPSTREAM_NAME: UPSTREAM_ADDRESS}, public_overrides=[UPSTREAM_ADDRESS])


UPSTREAM_NAME, UPSTREAM_ADDRESS = "api.upstream.test", "127.0.0.2"
test_conformance = make_conformance_tests(
    _backend, ConformanceOptions(upstream_name=UPSTREAM_NAME, upstream_address=UPSTREAM_ADDRESS)
)
