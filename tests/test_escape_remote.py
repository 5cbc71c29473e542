"""The escape suite through the ``remote`` backend and an in-process service (httpx's ASGI transport) over bwrap:
every attack travels the whole HTTP path (JSON shapes, error mapping, the service's own checks), so what the
service adds or loses on the way is judged by the same canaries as bwrap itself.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import httpx

from stockade.backends.bwrap import BwrapBackend
from stockade.backends.remote import RemoteBackend
from stockade.conformance.pytest_plugin import make_escape_tests
from stockade.service.app import create_app

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-remote-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store


def _remote() -> RemoteBackend:
    return RemoteBackend(transport=httpx.ASGITransport(app=create_app(BwrapBackend(_STATE))))


test_escape = make_escape_tests(_remote)
