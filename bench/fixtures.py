"""What some backends need before they can be measured, when the caller gave them no options of their own.

- ``remote`` talks to a ``stockade serve`` that the benchmark starts on a unix socket in its temporary
  directory, serving ``bwrap`` (the backend its target is compared with), and stops by pid afterwards.
- ``docker`` runs on the benchmark's private dockerd (``peers.dockerd``, the same engine as the docker peers),
  with its default base image built there by ``stockade image build`` (busybox, from local files).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .peers.dockerd import PrivateDockerd

__all__ = ["REMOTE_INNER", "docker_backend_options", "remote_service"]

REMOTE_INNER = "bwrap"
_CLI = "import sys; from stockade.cli import main; sys.exit(main())"


def docker_backend_options(dockerd: PrivateDockerd) -> dict[str, Any]:
    """The ``DockerBackend`` options for the private engine, after building its default image there."""
    base_url = dockerd.env["DOCKER_HOST"]
    proc = subprocess.run([sys.executable, "-c", _CLI, "image", "build", "--host", base_url], env=dockerd.env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"stockade image build failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return {"base_url": base_url}


@contextlib.contextmanager
def remote_service(workdir: Path, timeout: float = 30.0) -> Iterator[dict[str, Any]]:
    """Yield the ``RemoteBackend`` options for a fresh ``stockade serve --backend bwrap`` on a unix socket."""
    svc = workdir / "service"
    svc.mkdir(mode=0o700, exist_ok=True)
    sock = svc / "stockade.sock"
    state = workdir / "state-remote-inner"
    state.mkdir(exist_ok=True)
    argv = [sys.executable, "-c", _CLI, "serve",
            "--backend", REMOTE_INNER, "--unix", str(sock), "--state-dir", str(svc / "state"),
            "--backend-option", f"state_dir={json.dumps(str(state))}"]
    log = open(svc / "serve.log", "wb")  # noqa: SIM115 - handed to the service
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()
    try:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (svc / "serve.log").read_text(errors="replace")[-600:]
                raise RuntimeError(f"stockade serve did not start: {tail}")
            time.sleep(0.05)
        yield {"unix": str(sock)}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(sock)
