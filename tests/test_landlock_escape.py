"""The escape suite (docs/escape-suite.md) on the landlock backend: one pytest test per ``escape.*`` case.

No case is a known failure. What Landlock cannot give a guest (its own pid/uts namespaces, local networking of
its own) the backend declares in its capabilities, and the cases about exactly that end ``not_applicable``
(docs/landlock.md). The expectations hold for a per-session uid, i.e. when run as root (as CI does).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from stockade.backends.landlock import LandlockBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_escape_tests

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the escape expectations are pinned for a per-session uid, which needs root"
)

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-landlock-", dir="/var/tmp"))
atexit.register(shutil.rmtree, _STATE, True)

KNOWN: dict[str, str] = {}
OPTIONS = ConformanceOptions(suites=("escape",), upstream_name="api.upstream.test", upstream_address="127.0.0.2")

test_escape = make_escape_tests(lambda: LandlockBackend(_STATE), OPTIONS, known_failures=KNOWN)
