"""The escape suite (docs/escape-suite.md) on the landlock backend: one pytest test per ``escape.*`` case.

What the suite finds that Landlock cannot prevent runs as strict xfails: measured on every run, red the day it
starts to pass. All of it is stated in ``docs/landlock.md``. The expectations hold for a per-session uid, i.e.
when run as root (as CI does); as another user the guest has that user's uid and the list would differ.
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
from stockade.linux import landlock

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the escape expectations are pinned for a per-session uid, which needs root"
)

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-landlock-", dir="/var/tmp"))
atexit.register(shutil.rmtree, _STATE, True)

# What landlock cannot give a guest (its own pid/uts namespaces, its own loopback) it declares in its capabilities
# (process_isolation, private_loopback are false); the cases about exactly that end not_applicable, and pass.
KNOWN: dict[str, str] = {}
if landlock.abi_version() < 9:
    KNOWN |= {
        "escape.net.unix_pathname": "Landlock below ABI 9 does not control connect() to pathname unix sockets: "
                                    "a host socket whose mode lets any uid write reaches the guest",
        "escape.net.unix_in_ro_mount": "Landlock below ABI 9 does not control connect() to pathname unix sockets, "
                                       "not even in a read-only mount",
    }

OPTIONS = ConformanceOptions(suites=("escape",), upstream_name="api.upstream.test", upstream_address="127.0.0.2")

test_escape = make_escape_tests(lambda: LandlockBackend(_STATE), OPTIONS, known_failures=KNOWN)
