"""The conformance suite on the landlock backend: one pytest test per case.

Every case gets a real verdict. What Landlock cannot give a guest it declares: without a network namespace the
guest's loopback would be the host's, so deny-all refuses IP sockets altogether and ``capabilities()`` says
``private_loopback`` is false; ``network.guest_loopback_admitted`` then ends ``not_applicable`` with what it
measured (see ``docs/landlock.md``).

The backend has no private filesystem view (``capabilities().private_filesystem_view`` is false); the cases
read that flag and look for each mount at its ``host_path`` and use ``$TMPDIR`` as the guest's temp dir.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

from stockade.backends.landlock import LandlockBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-landlock-", dir="/var/tmp"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

# Case id -> why it fails on this backend (shared with ``test_landlock_unprivileged.py``).
KNOWN_FAILURES: dict[str, str] = {}

# An upstream is named so that the egress cases measure something: this backend must refuse every allowlist
# with Unsupported (the cases check that), since the gateway is not wired in yet.
OPTIONS = ConformanceOptions(upstream_name="api.upstream.test", upstream_address="127.0.0.2")

test_conformance = make_conformance_tests(
    lambda: LandlockBackend(_STATE), OPTIONS, known_failures=KNOWN_FAILURES
)
