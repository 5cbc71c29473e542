"""``stockade session ...`` end to end on bwrap: on the local backend directly, and through a live
``stockade serve`` with ``--url unix://...`` (each command is its own ``main()`` call, as it would be its own
process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stockade.backends.bwrap import BwrapBackend
from stockade.cli import EXIT_STOCKADE_ERROR, EXIT_TIMEOUT, main


@pytest.fixture(params=["local", "service"])
def target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The flags that point the session commands at the sessions (and a clean state directory)."""
    state = tmp_path / "state"
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(state))
    monkeypatch.delenv("STOCKADE_URL", raising=False)
    monkeypatch.delenv("STOCKADE_TOKEN", raising=False)
    proc = None
    try:
        if request.param == "local":
            yield ["--backend", "bwrap"]
        else:
            socket, log = tmp_path / "s.sock", tmp_path / "server.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "stockade.cli", "serve", "--unix", str(socket), "--backend", "bwrap",
                     "--state-dir", str(tmp_path / "service")],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, env=dict(os.environ),
                )
            deadline = time.monotonic() + 60
            while "serving backend" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield ["--url", f"unix://{socket}"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        leftover = BwrapBackend(state)
        for session_id in leftover.store.ids():
            anyio.run(leftover.terminate, session_id)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_session_commands_end_to_end(target: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "session", "create", *target, "--env", "GREETING=hello")
    assert status == 0, err
    session_id = out.strip()
    assert len(session_id) == 32

    status, out, _ = run(capsys, "session", "list", *target)
    assert status == 0 and session_id in out and "running" in out
    status, out, _ = run(capsys, "session", "list", *target, "--json")
    assert [s["id"] for s in json.loads(out)] == [session_id]
    status, out, _ = run(capsys, "session", "show", *target, session_id, "--json")
    assert status == 0 and json.loads(out)["state"] == "running"

    # exec: output passes through, the exit status mirrors the command's, the session env applies.
    status, out, err = run(capsys, "session", "exec", *target, session_id, "--",
                           "sh", "-c", "echo $GREETING; echo oops >&2; exit 5")
    assert (status, out, err) == (5, "hello\n", "oops\n")
    status, out, _ = run(capsys, "session", "exec", *target, "--json", session_id, "--", "echo", "json")
    assert status == 0 and json.loads(out)["stdout"] == "json\n"
    status, _, err = run(capsys, "session", "exec", *target, "--timeout", "1s", session_id, "--", "sleep", "30")
    assert status == EXIT_TIMEOUT and "timed out" in err

    # cp in both directions.
    local = tmp_path / "in.bin"
    local.write_bytes(b"\x00\x01payload")
    assert run(capsys, "session", "cp", *target, str(local), f"{session_id}:/mnt/session/outputs/in.bin")[0] == 0
    back = tmp_path / "back.bin"
    assert run(capsys, "session", "cp", *target, f"{session_id}:/mnt/session/outputs/in.bin", str(back))[0] == 0
    assert back.read_bytes() == b"\x00\x01payload"
    status, _, err = run(capsys, "session", "cp", *target, f"{session_id}:/nowhere/x", str(back))
    assert status == EXIT_STOCKADE_ERROR and "no such file" in err

    # net, snapshot, resume, log: each either works or says plainly that the backend cannot.
    status, out, err = run(capsys, "session", "net", *target, session_id, "--deny-all", "--json")
    assert status == 0 and json.loads(out)["id"] == session_id, err
    status, out, err = run(capsys, "session", "snapshot", *target, session_id)
    assert (status == 0 and out.startswith(session_id[:20])) or "does not support" in err
    status, out, err = run(capsys, "session", "resume", *target, session_id)
    assert status == 0 and session_id in out, err
    status, out, err = run(capsys, "session", "log", *target, session_id)
    assert status == 0 or "does not support" in err
    assert all(json.loads(line) for line in out.splitlines())

    # mount, where live mounts are offered.
    host_dir = tmp_path / "shared"
    host_dir.mkdir()
    (host_dir / "f").write_text("from the host")
    status, out, err = run(capsys, "session", "mount", *target, session_id, f"{host_dir}:/data", "--ro")
    if status == 0:
        status, out, _ = run(capsys, "session", "exec", *target, session_id, "--", "cat", "/data/f")
        assert (status, out) == (0, "from the host")
        status, _, _ = run(capsys, "session", "exec", *target, session_id, "--", "touch", "/data/g")
        assert status != 0 and not (host_dir / "g").exists()
    else:
        assert status == EXIT_STOCKADE_ERROR and "does not support" in err

    assert run(capsys, "session", "terminate", *target, session_id)[0] == 0
    status, _, err = run(capsys, "session", "terminate", *target, session_id)
    assert status == EXIT_STOCKADE_ERROR and "no sandbox session" in err
    assert run(capsys, "session", "list", *target, "--json")[1].strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["session", "exec", "--backend", "bwrap", "some-id"], "needs a command"),
        (["session", "cp", "--backend", "bwrap", "a", "b"], "exactly one side"),
        (["session", "cp", "--backend", "bwrap", "x:/a", "y:/b"], "exactly one side"),
        (["session", "list", "--backend", "bwrap", "--url", "unix:///x.sock"], "either a local --backend"),
        (["session", "list", "--backend", "bwrap", "--token", "t"], "needs a service"),
        (["session", "list", "--url", "ftp://x"], "must be http"),
        (["session", "show", "--backend", "bwrap", "../etc"], "session_id"),
        (["session", "net", "--backend", "bwrap", "id", "--allow-host", "*"], "--allow-host"),
    ],
)
def test_session_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(tmp_path / "state"))
    status, _, err = run(capsys, *argv)
    assert status == EXIT_STOCKADE_ERROR
    assert message in err, err


def test_serve_rotate_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "token"
    status, out, _ = run(capsys, "serve", "--rotate-token", "--token-file", str(path))
    assert status == 0 and str(path) in out
    first = path.read_text()
    assert run(capsys, "serve", "--rotate-token", "--token-file", str(path))[0] == 0
    assert path.read_text() != first and (path.stat().st_mode & 0o777) == 0o600
