"""The conformance suite on the bwrap backend: one pytest test per case, failing on any failing verdict.

The egress cases get a fake upstream: ``api.upstream.test`` resolves (in the gateway's injected resolver) to a
listener the case opens on 127.0.0.2, and that address is treated as public for name rules only, so the bare
address still needs a rule of its own (and the case checks that it is refused).
"""

import atexit
import shutil
import tempfile
from pathlib import Path

from stockade.backends.bwrap import BwrapBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.pytest_plugin import make_conformance_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-conformance-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

UPSTREAM_NAME, UPSTREAM_ADDRESS = "api.upstream.test", "127.0.0.2"  # three labels: *.upstream.test is a wildcard

test_conformance = make_conformance_tests(
    lambda: BwrapBackend(
        _STATE, resolve={UPSTREAM_NAME: UPSTREAM_ADDRESS}, public_overrides=[UPSTREAM_ADDRESS]
    ),
    ConformanceOptions(upstream_name=UPSTREAM_NAME, upstream_address=UPSTREAM_ADDRESS),
)
