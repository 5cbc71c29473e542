"""Persistence: ``kill -9`` a live ``stockade serve`` in the middle of traffic, start it again on the same socket,
and the session is still there, usable, with its files; the snapshot journal survives too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from stockade import BackendUnavailable, ExecRequest, SandboxError, SandboxSpec
from stockade.backends.bwrap import BwrapBackend
from stockade.backends.remote import RemoteBackend


def start(tmp_path: Path, socket: Path, name: str) -> subprocess.Popen[bytes]:
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.cli", "serve", "--unix", str(socket), "--backend", "bwrap",
             "--state-dir", str(tmp_path / "service")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
            env={**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")},
        )
    deadline = time.monotonic() + 60
    while "serving backend" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the service did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_kill_9_mid_traffic_then_restart(tmp_path: Path) -> None:
    socket = tmp_path / "run" / "s.sock"
    first = start(tmp_path, socket, "first")
    procs = [first]
    state: dict[str, str] = {}

    async def before_and_during() -> None:
        async with RemoteBackend(unix=str(socket)) as backend:
            session = await backend.provision(SandboxSpec())
            state["id"] = session.id
            await backend.write_file(session.id, "/mnt/session/outputs/kept.txt", b"kept across restarts")
            await backend.exec(session.id, ExecRequest(command="/bin/sh", args=("-c", "echo tmp-too > /tmp/t")))
            if backend.capabilities().snapshot:
                state["snapshot"] = (await backend.snapshot(session.id)).snapshot_id
            done, failures = 0, []
            enough = anyio.Event()

            async def traffic(client: int) -> None:
                nonlocal done
                for n in range(10_000):
                    marker = f"client{client}-{n}"
                    try:
                        result = await backend.exec(session.id, ExecRequest(command="echo", args=(marker,)))
                    except SandboxError as exc:
                        failures.append(exc)
                        return
                    assert result.stdout == f"{marker}\n"  # each answer is its own request's, never mixed
                    done += 1
                    if done == 20:
                        enough.set()

            async with anyio.create_task_group() as group:
                for client in range(3):
                    group.start_soon(traffic, client)
                await enough.wait()
                os.kill(first.pid, signal.SIGKILL)  # mid-traffic: three clients have requests in flight
                first.wait()
            assert len(failures) == 3 and all(isinstance(f, BackendUnavailable) for f in failures), failures

    async def after() -> None:
        async with RemoteBackend(unix=str(socket)) as backend:
            session_id = state["id"]
            assert session_id in [s.id for s in await backend.list_sessions()]
            assert (await backend.get_session(session_id)).state.value == "running"
            assert await backend.read_file(session_id, "/mnt/session/outputs/kept.txt") == b"kept across restarts"
            result = await backend.exec(session_id, ExecRequest(command="cat", args=("/tmp/t",)))
            assert (result.exit_code, result.stdout) == (0, "tmp-too\n")
            if "snapshot" in state:
                assert [s.snapshot_id for s in await backend.list_snapshots(session_id)] == [state["snapshot"]]
            await backend.terminate(session_id)
            assert await backend.list_sessions() == []

    try:
        anyio.run(before_and_during)
        # The dead service left its socket behind; the new one replaces the stale socket.
        assert socket.exists()
        procs.append(start(tmp_path, socket, "second"))
        anyio.run(after)
    finally:
        for proc in procs:
            stop(proc)
        leftover = BwrapBackend(tmp_path / "state")
        for session_id in leftover.store.ids():
            anyio.run(leftover.terminate, session_id)
    assert procs[1].returncode == 0
    assert not socket.exists()  # a clean stop removes its socket


def test_a_second_service_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    socket = tmp_path / "s.sock"
    proc = start(tmp_path, socket, "only")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stockade.cli", "serve", "--unix", str(socket), "--backend", "bwrap"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            env={**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")},
        )
        assert done.returncode == 125 and "already listening" in done.stderr
        assert proc.poll() is None
    finally:
        stop(proc)


@pytest.mark.parametrize("url", ["unix://relative.sock", "ftp://host", "http://", "host:80"])
def test_bad_urls_are_refused(url: str) -> None:
    from stockade import InvalidRequest

    with pytest.raises(InvalidRequest):
        RemoteBackend(url=url)


def test_unreachable_service_is_backend_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        async with RemoteBackend(unix=str(tmp_path / "nobody.sock")):
            pass

    with pytest.raises(BackendUnavailable, match="cannot reach"):
        anyio.run(main)
