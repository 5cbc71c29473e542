"""What some backends need before they can be measured, when the caller gave them no options of their own.

- ``remote`` talks to a ``stockade serve`` that the benchmark starts on a unix socket in its temporary
  directory, serving ``bwrap`` (the backend its target is compared with), and stops by pid afterwards.
- ``docker`` runs on the benchmark's private dockerd (``peers.dockerd``, the same engine as the docker peers),
  with its default base image built there by ``stockade image build`` (busybox, from local files); the
  ``docker-runsc`` row is the same backend with ``runtime="runsc"`` (gVisor) on the same engine.
- ``ray`` runs on a two-node Ray cluster the benchmark starts on this machine (root: each node in a network
  namespace of its own, as the ray tests do, ``stockade.backends.ray._localcluster``), with bwrap as the node
  backend and enough slots for the largest scaling level; every process is stopped by pid afterwards.
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

__all__ = ["REMOTE_INNER", "docker_backend_options", "ray_cluster", "remote_service"]

REMOTE_INNER = "bwrap"
_CLI = "import sys; from stockade.cli import main; sys.exit(main())"


def docker_backend_options(dockerd: PrivateDockerd, runtime: str = "runc") -> dict[str, Any]:
    """The ``DockerBackend`` options for the private engine, after building its default image there."""
    if runtime == "runsc" and not dockerd.runsc:
        raise RuntimeError("runsc (gVisor) is not installed: bench/install_docker.sh (Debian runsc)")
    base_url = dockerd.env["DOCKER_HOST"]
    proc = subprocess.run([sys.executable, "-c", _CLI, "image", "build", "--host", base_url], env=dockerd.env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"stockade image build failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return {"base_url": base_url} if runtime == "runc" else {"base_url": base_url, "runtime": runtime}


@contextlib.contextmanager
def ray_cluster(slots: int, start_timeout: float = 180.0) -> Iterator[dict[str, Any]]:
    """Yield the ``RayBackend`` options for a fresh two-node cluster with ``slots`` stockade slots in all, and
    facts about it (``info``); this process is its driver until the block ends."""
    if os.geteuid() != 0:
        raise RuntimeError("the benchmark's Ray cluster needs root (a network namespace per node)")
    try:
        import ray

        from stockade.backends.ray._localcluster import LocalCluster
    except ImportError as exc:
        raise RuntimeError(f"Ray is not installed (pip install 'stockade[ray]'): {exc}") from exc
    half = (slots + 1) // 2
    cluster = LocalCluster(slots=(half, slots - half), start_timeout=start_timeout)
    try:
        started = time.perf_counter()
        try:
            cluster.start()
            cluster.connect_driver()
            cluster.wait_nodes()
        except (OSError, RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"the two-node Ray cluster did not start: {exc}") from exc
        info = {"nodes": {node.ip: node.slots for node in cluster.nodes}, "ray": ray.__version__,
                "cluster_start_s": time.perf_counter() - started, "node_backend": "bwrap"}
        yield {"address": cluster.gcs_address, "placement_timeout": 60.0, "info": info}
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.stop()
        cluster.remove_files()


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
