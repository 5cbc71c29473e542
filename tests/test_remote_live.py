"""The conformance suite through the ``remote`` backend and a real ``stockade serve`` (uvicorn) over bwrap on a
unix socket, started once for the module; plus what only a real socket shows (its 0600 mode, streaming).

The egress cases get the fake upstream of ``test_conformance_bwrap`` through ``--backend-option``: the service's
bwrap backend resolves ``api.upstream.test`` to a listener the case (in this process) opens on 127.0.0.2.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stockade import ExecChunk, ExecRequest, ExecResult, SandboxSpec, open_backend
from stockade.backends.bwrap import BwrapBackend
from stockade.backends.remote import RemoteBackend
from stockade.conformance import ConformanceOptions
from stockade.conformance.engine import run_case
from stockade.conformance.pytest_plugin import ESCAPE_OPTIONS, check_result, make_conformance_tests

_DIR = Path(tempfile.mkdtemp(prefix="stockade-remote-live-"))
atexit.register(shutil.rmtree, _DIR, True)  # also when every test here is deselected (the fixture never runs)
SOCKET = _DIR / "run" / "stockade.sock"
STATE = _DIR / "state"
UPSTREAM_NAME, UPSTREAM_ADDRESS = "api.upstream.test", "127.0.0.2"  # *.upstream.test is a wildcard


@pytest.fixture(scope="module", autouse=True)
def server() -> Iterator[subprocess.Popen[bytes]]:
    log = _DIR / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.cli", "serve", "--unix", str(SOCKET), "--backend", "bwrap",
             "--state-dir", str(_DIR / "service"),
             "--backend-option", f"resolve={json.dumps({UPSTREAM_NAME: UPSTREAM_ADDRESS})}",
             "--backend-option", f"public_overrides={json.dumps([UPSTREAM_ADDRESS])}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
            env={**os.environ, "STOCKADE_STATE_DIR": str(STATE)},
        )
    try:
        deadline = time.monotonic() + 60
        while "serving backend" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the service did not start: {log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if STATE.exists():
            leftover = BwrapBackend(STATE)
            for session_id in leftover.store.ids():
                anyio.run(leftover.terminate, session_id)
        shutil.rmtree(_DIR, ignore_errors=True)


test_conformance = make_conformance_tests(
    lambda: open_backend("remote", unix=str(SOCKET)),
    ConformanceOptions(upstream_name=UPSTREAM_NAME, upstream_address=UPSTREAM_ADDRESS),
)


def test_socket_is_private() -> None:
    assert stat.S_ISSOCK(SOCKET.stat().st_mode)
    assert stat.S_IMODE(SOCKET.stat().st_mode) == 0o600
    assert stat.S_IMODE(SOCKET.parent.stat().st_mode) == 0o700


def test_stream_files_and_url_forms() -> None:
    async def main() -> None:
        async with RemoteBackend(url=f"unix://{SOCKET}") as backend:
            assert backend.capabilities().exec_streaming
            info = await backend.info()
            assert info["backend"] == "bwrap" and info["auth"] == "socket"
            session = await backend.provision(SandboxSpec())
            try:
                assert session.backend == "remote" and session.metadata["remote_backend"] == "bwrap"
                request = ExecRequest(command="/bin/sh", args=("-c", "printf one; printf two >&2; exit 4"))
                items = [item async for item in backend.exec_stream(session.id, request)]
                chunks = [i for i in items if isinstance(i, ExecChunk)]
                result = items[-1]
                assert isinstance(result, ExecResult) and result.exit_code == 4
                assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"one"
                assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"two"
                assert await backend.write_file(session.id, "/tmp/x/y", b"\x00data") == 5
                assert await backend.read_file(session.id, "/tmp/x/y") == b"\x00data"
                assert [e.name for e in await backend.list_files(session.id, "/tmp/x")] == ["y"]
                assert (await backend.get_session(session.id)).id == session.id
            finally:
                await backend.terminate(session.id)

    anyio.run(main)


def test_a_cancelled_provision_leaves_nothing_on_the_service() -> None:
    """The escape suite's provision-cancelling case over a real socket: here the service goes on with a
    provision whose caller gave up (a disconnect is all it sees), unlike through the in-process transport."""

    async def one() -> Any:
        async with open_backend("remote", unix=str(SOCKET)) as backend:
            return await run_case(backend, "escape.life.terminate_during_provision", ESCAPE_OPTIONS)

    check_result(anyio.run(one))
