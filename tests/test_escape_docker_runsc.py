"""The escape suite (docs/escape-suite.md) on the docker backend with gVisor (runsc) against a private dockerd,
with the busybox+python image: one pytest test per ``escape.*`` case.

What the suite finds and the backend has not fixed runs as strict xfails: measured on every run, and red the
day the fix lands (then the entry goes). docs/docker.md lists the same gaps.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from _docker_fixtures import PY_IMAGE, dockerd_or_skip
from stockade.backends.docker import DockerBackend
from stockade.conformance.pytest_plugin import make_escape_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-runsc-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

KNOWN_ESCAPES = {
    "escape.fs.mknod": "escape: execs run without the seccomp profile under this runsc, so mknod of null, mem, "
                       "kmsg and a disk succeeds in the Sentry",
    "escape.fs.dev": "escape: gVisor's /dev offers /dev/fuse and /dev/net/tun (Sentry devices), and both open",
    "escape.proc.ptrace_supervisor": "escape: gVisor's /proc lets a command open pid 1's environ and maps and "
                                     "resolve its fd links",
    "escape.proc.caps_seccomp_every_thread": "escape: execs run with Seccomp=0 under this runsc (every thread "
                                             "and a command two execs deep)",
    "escape.proc.blocked_syscalls": "escape: execs run without the seccomp profile under this runsc, so unshare "
                                    "and clone(CLONE_NEWNS) succeed and the rest reach the Sentry",
    "escape.proc.userns_nesting": "escape: execs run without the seccomp profile under this runsc, so a nested "
                                  "user namespace is created",
    "escape.res.memory_bomb": "probe_broken: the OOM kill takes the whole gVisor sandbox, so the session cannot "
                              "run the probe's next command",
}


def _backend() -> DockerBackend:
    daemon = dockerd_or_skip()
    if not daemon.runsc:
        pytest.skip("runsc (Debian package 'runsc') is not installed")
    return DockerBackend(daemon.url, runtime="runsc", image=daemon.image(PY_IMAGE), state_dir=_STATE)


test_escape = make_escape_tests(_backend, known_failures=KNOWN_ESCAPES)
