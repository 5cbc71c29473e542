"""Bearer-token auth: the token file, rotation, and what a request without the right token gets (401 and nothing
else), in-process and against a real ``stockade serve`` on loopback TCP."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from stockade.backends.bwrap import BwrapBackend
from stockade.cli import EXIT_STOCKADE_ERROR, main
from stockade.errors import InvalidRequest
from stockade.service.app import create_app
from stockade.service.auth import TokenSource, ensure_token, load_token, rotate_token, token_matches


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BwrapBackend]:
    b = BwrapBackend(tmp_path / "state")
    yield b
    for session_id in b.store.ids():
        anyio.run(b.terminate, session_id)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------------------------- token file


def test_token_file_is_private_stable_and_rotatable(tmp_path: Path) -> None:
    path = tmp_path / "svc" / "token"
    token = ensure_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_token(path) == token  # a second start keeps it
    rotated = rotate_token(path)
    assert rotated != token and load_token(path) == rotated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(tmp_path / "other") != rotated  # every service its own


def test_unsafe_token_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    ensure_token(path)
    path.chmod(0o644)
    with pytest.raises(InvalidRequest, match="readable by others"):
        load_token(path)
    link = tmp_path / "link"
    path.chmod(0o600)
    link.symlink_to(path)
    with pytest.raises(InvalidRequest):
        load_token(link)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(InvalidRequest, match="too short"):
        load_token(short)


def test_token_matching() -> None:
    token = "t" * 43
    assert token_matches(token, f"Bearer {token}")
    assert token_matches(token, f"bearer  {token}")
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}x", f"Bearer {token[:-1]}", "Bearer "):
        assert not token_matches(token, header), header


# ---------------------------------------------------------------------------------------------- in-process


def test_requests_without_the_token_get_401_and_nothing_else(backend: BwrapBackend, tmp_path: Path) -> None:
    path, foreign_path = tmp_path / "token", tmp_path / "foreign-token"
    token, foreign = ensure_token(path), ensure_token(foreign_path)

    async def main_() -> None:
        app = create_app(backend, token=TokenSource(path=path))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            # Admitted: the right token provisions (the canary is this session's id and its output).
            made = await client.post("/v1/sessions", json={}, headers=bearer(token))
            assert made.status_code == 201
            session_id = made.json()["id"]
            attempts = {
                "none": {},
                "wrong": bearer("x" * 43),
                "foreign": bearer(foreign),
                "basic": {"Authorization": f"Basic {token}"},
                "empty": {"Authorization": "Bearer"},
            }
            for name, headers in attempts.items():
                for method, url in (("GET", "/v1/sessions"), ("GET", f"/v1/sessions/{session_id}"),
                                    ("POST", f"/v1/sessions/{session_id}/exec"), ("DELETE",
                                                                                    f"/v1/sessions/{session_id}"),
                                    ("GET", "/v1/info"), ("GET", "/v1/nowhere")):
                    response = await client.request(method, url, headers=headers,
                                                    json={"command": "echo", "args": ["ran"]})
                    assert response.status_code == 401, (name, method, url)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert response.json() == {"error": {"code": "unauthorized",
                                                          "message": "missing or invalid bearer token"}}
                    assert session_id not in response.text
            # Public: health and the OpenAPI document, neither naming a session.
            health = await client.get("/v1/health")
            assert health.status_code == 200 and session_id not in health.text
            assert (await client.get("/openapi.json")).status_code == 200
            # Nothing ran and nothing was terminated by the refused requests.
            alive = await client.get(f"/v1/sessions/{session_id}", headers=bearer(token))
            assert alive.status_code == 200 and alive.json()["state"] == "running"

            # Rotation: the running service takes the new token at once and drops the old one.
            new = rotate_token(path)
            assert (await client.get("/v1/sessions", headers=bearer(token))).status_code == 401
            assert (await client.get("/v1/sessions", headers=bearer(new))).status_code == 200
            # A token file that turns unsafe fails closed.
            path.chmod(0o644)
            assert (await client.get("/v1/sessions", headers=bearer(new))).status_code == 401
            path.chmod(0o600)
            assert (await client.get("/v1/sessions", headers=bearer(new))).status_code == 200

    anyio.run(main_)


# ------------------------------------------------------------------------------------------ real TCP server


def test_tcp_service_requires_its_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file, log = tmp_path / "token", tmp_path / "server.log"
    env = {**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--backend", "bwrap", "--token-file", str(token_file), "--state-dir", str(tmp_path / "svc")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, env=env,
        )
    try:
        url = _wait_for_url(proc, log)
        assert url.startswith("http://127.0.0.1:")
        token = load_token(token_file)  # generated on first start, 0600
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with httpx.Client(base_url=url, timeout=60) as client:
            made = client.post("/v1/sessions", json={}, headers=bearer(token))
            assert made.status_code == 201
            session_id = made.json()["id"]
            for headers in ({}, bearer("y" * 43), bearer(ensure_token(tmp_path / "other-service"))):
                refused = client.get("/v1/sessions", headers=headers)
                assert refused.status_code == 401 and session_id not in refused.text
            listed = client.get("/v1/sessions", headers=bearer(token)).json()["sessions"]
            assert [s["id"] for s in listed] == [session_id]

        # The CLI through the same service: the token from --token or $STOCKADE_TOKEN, refused without.
        monkeypatch.delenv("STOCKADE_TOKEN", raising=False)
        assert main(["session", "list", "--url", url]) == EXIT_STOCKADE_ERROR
        assert main(["session", "exec", "--url", url, "--token", token, session_id, "--", "true"]) == 0
        monkeypatch.setenv("STOCKADE_TOKEN", token)
        assert main(["session", "terminate", "--url", url, session_id]) == 0
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/sessions", headers=bearer(token)).json() == {"sessions": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        leftover = BwrapBackend(tmp_path / "state")
        for session_id in leftover.store.ids():
            anyio.run(leftover.terminate, session_id)
    assert proc.returncode == 0, log.read_text()


def _wait_for_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        for line in text.splitlines():
            if "serving backend" in line:
                return line.split(" on ", 1)[1].split(" ", 1)[0]
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}: {text}")
        time.sleep(0.05)
    raise AssertionError(f"the service did not start: {log.read_text()}")


def test_tcp_without_a_usable_token_file_does_not_start(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    ensure_token(token_file)
    token_file.chmod(0o640)
    done = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--backend",
         "bwrap", "--token-file", str(token_file)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={**os.environ, "STOCKADE_STATE_DIR": str(tmp_path / "state")},
    )
    assert done.returncode == EXIT_STOCKADE_ERROR and "readable by others" in done.stderr
    assert "serving" not in done.stderr
