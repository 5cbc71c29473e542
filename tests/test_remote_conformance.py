"""The conformance suite through the ``remote`` backend and an in-process service (httpx's ASGI transport) over
bwrap: every case travels the whole HTTP path (JSON shapes, error mapping, streaming) without a real socket.

The egress cases get the same fake upstream as ``test_conformance_bwrap``: the service's bwrap backend resolves
``upstream.test`` to a listener the case opens on 127.0.0.2.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import httpx

from stockade.backends.bwrap import BwrapBackend
from stockade.backends.remote import RemoteBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_conformance_tests
from stockade.service.app import create_app

_STATE = Path(tempfile.mkdtemp(prefix="stockade-remote-conformance-"))
atexit.register(shutil.rmtree, _STATE, True)


def _remote() -> RemoteBackend:
    return RemoteBackend(transport=httpx.ASGITransport(app=create_app(BwrapBackend(_STATE))))


test_conformance = make_conformance_tests(
    _remote, ConformanceOptions(suites=("lifecycle", "exec", "filesystem", "env", "limits"))
)
