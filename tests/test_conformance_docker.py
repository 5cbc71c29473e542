"""The conformance suite on the docker backend (runc) against a private dockerd, with the busybox+python image.

The egress cases get the fake upstream of tests/test_conformance_bwrap.py: ``api.upstream.test`` resolves (in
the gateway's injected resolver) to a listener on 127.0.0.2, which ``public_overrides`` lets a name rule reach.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-docker-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store


def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    return DockerBackend(daemon.url, image=daemon.image(PY_IMAGE), state_dir=_STATE,
                         resolve={UPSTREAM_NAME: UPSTREAM_ADDRESS}, public_overrides=[UPSTREAM_ADDRESS])


UPSTREAM_NAME, UPSTREAM_ADDRESS = "api.upstream.test", "127.0.0.2"
test_conformance = make_conformance_tests(
    _backend, ConformanceOptions(upstream_name=UPSTREAM_NAME, upstream_address=UPSTREAM_ADDRESS)
)
