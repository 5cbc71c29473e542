"""The conformance suite on the bwrap backend: one pytest test per case, failing on any failing verdict."""

import atexit
import shutil
import tempfile
from pathlib import Path

from stockade.backends.bwrap import BwrapBackend
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

test_conformance = make_conformance_tests(lambda: BwrapBackend(_STATE))
