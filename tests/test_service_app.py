"""The HTTP service in-process (httpx's ASGI transport) over a real bwrap backend: shapes, errors, limits,
streaming, files (with canaries), the snapshot journal and the committed OpenAPI document."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from stockade.backends.bwrap import BwrapBackend
from stockade.errors import (
    BackendUnavailable,
    ExecError,
    InvalidRequest,
    LifecycleError,
    NetworkPolicyError,
    SandboxError,
    SessionNotFound,
    Unsupported,
)
from stockade.service.app import OPERATIONS, create_app
from stockade.service.openapi import build_openapi
from stockade.service.wire import LimitExceeded, PayloadTooLarge, ServiceLimits, Unauthorized, status_for

ROOT = Path(__file__).resolve().parent.parent
Client = httpx.AsyncClient


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BwrapBackend]:
    b = BwrapBackend(tmp_path / "state")
    yield b
    for session_id in b.store.ids():  # a failed test must not leave sandboxes behind
        anyio.run(b.terminate, session_id)


def serve(backend: BwrapBackend, body: Callable[[Client], Awaitable[None]], **options: Any) -> None:
    """Run ``body`` with a client of a fresh in-process service over ``backend``."""

    async def main() -> None:
        app = create_app(backend, **options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            await body(client)

    anyio.run(main)


async def new_session(client: Client, **spec: Any) -> str:
    response = await client.post("/v1/sessions", json=spec)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


async def sh(client: Client, session_id: str, script: str) -> dict[str, Any]:
    response = await client.post(f"/v1/sessions/{session_id}/exec",
                                 json={"command": "/bin/sh", "args": ["-c", script]})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    detail: dict[str, Any] = body["error"]
    assert isinstance(detail["code"], str) and isinstance(detail["message"], str)
    return detail


# ------------------------------------------------------------------------------------------------ errors


def test_every_error_class_has_one_status() -> None:
    expected = {
        InvalidRequest("x"): 400,
        Unauthorized("x"): 401,
        SessionNotFound("s"): 404,
        LifecycleError("x"): 409,
        PayloadTooLarge("x"): 413,
        ExecError("x"): 422,
        LimitExceeded("x"): 429,
        Unsupported("b", "op"): 422,
        NetworkPolicyError("x"): 502,
        BackendUnavailable("b", "r"): 503,
        SandboxError("x"): 500,
    }
    assert {type(e): status_for(e) for e in expected} == {type(e): s for e, s in expected.items()}
    # Every error of the tree is covered (a new one must be given a status on purpose).
    tree = {cls for cls in SandboxError.__subclasses__() if cls.__module__ == "stockade.errors"}
    assert tree <= {type(e) for e in expected}


def test_lifecycle_shapes_and_errors(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        assert (await client.get("/v1/health")).json() == {"status": "ok"}
        info = (await client.get("/v1/info")).json()
        assert info["backend"] == "bwrap" and info["auth"] == "socket"
        caps = (await client.get("/v1/capabilities")).json()
        assert caps == backend.capabilities().to_json()

        session_id = await new_session(client)
        # Minted by the service: 128 random bits as 32 hex digits.
        assert len(session_id) == 32 and int(session_id, 16) >= 0
        got = (await client.get(f"/v1/sessions/{session_id}")).json()
        assert got["id"] == session_id and got["state"] == "running" and got["backend"] == "bwrap"
        listed = (await client.get("/v1/sessions")).json()["sessions"]
        assert session_id in [s["id"] for s in listed]

        result = await sh(client, session_id, "echo out; echo err >&2; exit 7")
        assert (result["stdout"], result["stderr"], result["exit_code"], result["timed_out"]) == (
            "out\n", "err\n", 7, False)

        missing = await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "no-such-command-x"})
        assert missing.status_code == 422 and error_of(missing)["code"] == "exec_error"

        policy = await client.put(f"/v1/sessions/{session_id}/network-policy",
                                  json={"mode": "limited", "allowed_hosts": []})
        assert policy.status_code == 200 and policy.json()["id"] == session_id
        image = await client.post("/v1/sessions", json={"image": "debian:bookworm"})
        assert image.status_code == 422 and error_of(image)["backend"] == "bwrap"

        assert (await client.delete(f"/v1/sessions/{session_id}")).status_code == 204
        again = await client.delete(f"/v1/sessions/{session_id}")
        assert again.status_code == 404
        assert error_of(again) == {"code": "session_not_found", "session_id": session_id,
                                   "message": f"no sandbox session with id {session_id!r}"}
        for method, suffix in (("POST", "/exec"), ("POST", "/snapshot"), ("POST", "/resume"), ("GET", "")):
            gone = await client.request(method, f"/v1/sessions/{session_id}{suffix}", json={"command": "true"})
            assert gone.status_code == 404, (method, suffix, gone.text)

    serve(backend, body)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", "body"),
        (b"", "body"),
        (b"[1, 2]", "body"),
        (b'"{\\"command\\": \\"true\\"}"', "body"),  # a JSON string holding JSON is not an object
        (b'{"command": 5}', "command"),
        (b'{"command": "true", "argz": []}', "argz"),
        (b'{"command": "true", "timeout": -1}', "timeout"),
        (b'{"command": "true", "timeout": 1e999}', "timeout"),
        (b'{"command": "true", "env": {"A=B": "x"}}', "env"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
    ],
)
def test_malformed_exec_bodies_are_400_naming_the_field(backend: BwrapBackend, content: bytes, field: str) -> None:
    async def body(client: Client) -> None:
        session_id = await new_session(client)
        response = await client.post(f"/v1/sessions/{session_id}/exec", content=content,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        detail = error_of(response)
        assert detail["code"] == "invalid_request" and field in str(detail["field"]), detail

    serve(backend, body)


@pytest.mark.parametrize(
    "spec",
    [
        {"network_policy": {"mode": "limited", "allowed_host": ["a.example"]}},  # misspelt: must not widen
        {"network_policy": {"mode": "limited", "allowed_hosts": ["*"]}},
        {"mounts": [{"source": "relative", "target": "/x"}]},
        {"mounts": [{"source": "", "target": "/a/../etc"}]},
        {"session_id": "../escape"},
        {"limits": {"memory_mb": "lots"}},
        {"memory_writable": 0},  # the models coerce this (lax); over HTTP a wrong type is refused
        {"memory_writable": "yes"},
    ],
)
def test_bad_specs_are_400_and_leave_no_session(backend: BwrapBackend, spec: dict[str, Any]) -> None:
    async def body(client: Client) -> None:
        response = await client.post("/v1/sessions", json=spec)
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == "invalid_request"
        assert (await client.get("/v1/sessions")).json() == {"sessions": []}

    serve(backend, body)


def test_bad_ids_routes_and_methods(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        bad = await client.get("/v1/sessions/.hidden")
        assert bad.status_code == 400 and error_of(bad)["field"] == "session_id"
        unknown = await client.get("/v1/nowhere")
        assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
        wrong = await client.patch("/v1/sessions")
        assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
        limit = await client.get(f"/v1/sessions/{'a' * 10}/network-log", params={"limit": "many"})
        assert limit.status_code == 400 and error_of(limit)["field"] == "limit"

    serve(backend, body)


# ------------------------------------------------------------------------------------------------ limits


def test_body_limit_by_length_and_by_stream(backend: BwrapBackend) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    async def body(client: Client) -> None:
        session_id = await new_session(client)
        big = await client.post(f"/v1/sessions/{session_id}/exec", content=b" " * 5000)
        assert big.status_code == 413 and error_of(big)["code"] == "payload_too_large"
        streamed = await client.post(f"/v1/sessions/{session_id}/exec", content=chunks())
        assert streamed.status_code == 413
        # Admitted sibling: a body under the limit goes through.
        small = await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "true"})
        assert small.status_code == 200 and small.json()["exit_code"] == 0

    serve(backend, body, limits=ServiceLimits(max_body_bytes=4096))


def test_max_sessions(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        first = await new_session(client)
        second = await new_session(client)
        refused = await client.post("/v1/sessions", json={})
        assert refused.status_code == 429 and error_of(refused)["code"] == "limit_exceeded"
        assert len((await client.get("/v1/sessions")).json()["sessions"]) == 2
        await client.delete(f"/v1/sessions/{first}")
        third = await new_session(client)  # a slot freed by terminate is usable again
        assert third not in (first, second)

    serve(backend, body, limits=ServiceLimits(max_sessions=2))


def test_exec_timeout_ceiling(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        too_long = await client.post("/v1/sessions", json={"limits": {"wall_time": 60}})
        assert too_long.status_code == 400 and error_of(too_long)["field"] == "limits.wall_time"
        session_id = await new_session(client)
        over = await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "true", "timeout": 5})
        assert over.status_code == 400 and error_of(over)["field"] == "timeout"
        within = await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "true", "timeout": 1})
        assert within.status_code == 200 and within.json()["exit_code"] == 0
        # No timeout of its own: the session's wall_time, set to the ceiling by the service, stops it.
        slow = await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "sleep", "args": ["30"]})
        assert slow.status_code == 200 and slow.json()["timed_out"] is True

    serve(backend, body, limits=ServiceLimits(exec_timeout_ceiling=1.5))


def test_mount_roots(backend: BwrapBackend, tmp_path: Path) -> None:
    inside, outside = tmp_path / "allowed" / "data", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    (inside / "f").write_text("inside")

    async def body(client: Client) -> None:
        refused = await client.post("/v1/sessions", json={"mounts": [{"source": str(outside), "target": "/d"}]})
        assert refused.status_code == 400 and error_of(refused)["field"] == "mounts.0.source"
        session_id = await new_session(client, mounts=[{"source": str(inside), "target": "/d"}])
        assert (await sh(client, session_id, "cat /d/f"))["stdout"] == "inside"

    serve(backend, body, limits=ServiceLimits(mount_roots=(str(tmp_path / "allowed"),)))


# --------------------------------------------------------------------------------------------- streaming


def test_exec_stream_frames(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        session_id = await new_session(client)
        request = {"command": "/bin/sh", "args": ["-c", "printf 'a\\377'; echo e >&2; printf b; exit 3"]}
        response = await client.post(f"/v1/sessions/{session_id}/exec/stream", json=request)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        frames = [json.loads(line) for line in response.text.splitlines()]
        out = b"".join(base64.b64decode(f["data"]) for f in frames if f.get("stream") == "stdout")
        err = b"".join(base64.b64decode(f["data"]) for f in frames if f.get("stream") == "stderr")
        assert (out, err) == (b"a\xffb", b"e\n")  # bytes arrive exact, not re-encoded
        assert set(frames[-1]) == {"result"} and frames[-1]["result"]["exit_code"] == 3
        # Errors before any output get their own status, not a 200 with an error frame.
        ghost = await client.post("/v1/sessions/never-made/exec/stream", json={"command": "true"})
        assert ghost.status_code == 404
        missing = await client.post(f"/v1/sessions/{session_id}/exec/stream", json={"command": "no-such-cmd"})
        assert missing.status_code == 422

    serve(backend, body)


# ------------------------------------------------------------------------------------------------- files


def test_files_round_trip_and_listing(backend: BwrapBackend) -> None:
    payload = bytes(range(256)) * 40

    async def body(client: Client) -> None:
        session_id = await new_session(client)
        base = f"/v1/sessions/{session_id}/files"
        put = await client.put(f"{base}/content", params={"path": "/mnt/session/outputs/new/dir/blob.bin"},
                               content=payload)
        assert put.status_code == 201 and put.json() == {"path": "/mnt/session/outputs/new/dir/blob.bin",
                                                         "size": len(payload)}
        check = await sh(client, session_id, "sha256sum /mnt/session/outputs/new/dir/blob.bin")
        import hashlib

        assert check["stdout"].split()[0] == hashlib.sha256(payload).hexdigest()
        got = await client.get(f"{base}/content", params={"path": "/mnt/session/outputs/new/dir/blob.bin"})
        assert got.status_code == 200 and got.content == payload
        await sh(client, session_id, "mkdir /tmp/d && echo x > '/tmp/d/a b' && ln -s nowhere /tmp/d/l")
        listing = (await client.get(f"{base}/list", params={"path": "/tmp/d"})).json()
        assert listing["path"] == "/tmp/d"
        assert [(e["name"], e["type"]) for e in listing["entries"]] == [("a b", "file"), ("l", "symlink")]
        assert listing["entries"][0]["size"] == 2
        # The guest's own permissions apply: the read-only memory mount cannot be written through the API.
        ro = await client.put(f"{base}/content", params={"path": "/mnt/memory/x"}, content=b"x")
        assert ro.status_code == 400 and "Read-only" in error_of(ro)["message"]
        for path, status in (("/tmp/nothing", 400), ("/tmp/d", 400), ("relative", 400), ("/", 400)):
            bad = await client.get(f"{base}/content", params={"path": path})
            assert bad.status_code == status, (path, bad.text)
        assert (await client.get(f"{base}/content")).status_code == 400  # path is required

    serve(backend, body)


def test_file_size_limit(backend: BwrapBackend) -> None:
    async def body(client: Client) -> None:
        session_id = await new_session(client)
        base = f"/v1/sessions/{session_id}/files/content"
        assert (await client.put(base, params={"path": "/tmp/big"}, content=b"x" * 2000)).status_code == 400
        assert (await client.put(base, params={"path": "/tmp/ok"}, content=b"x" * 1000)).status_code == 201
        await sh(client, session_id, "head -c 5000 /dev/zero > /tmp/big")
        too_big = await client.get(base, params={"path": "/tmp/big"})
        assert too_big.status_code == 400 and "5000" in error_of(too_big)["message"]
        assert (await client.get(base, params={"path": "/tmp/ok"})).content == b"x" * 1000

    serve(backend, body, limits=ServiceLimits(max_file_bytes=1024))


def test_files_cannot_reach_host_canaries(backend: BwrapBackend, tmp_path: Path) -> None:
    canary_dir = tmp_path / "host"
    canary_dir.mkdir()
    canary_value = "stockade-canary-" + secrets.token_hex(16)
    canary = canary_dir / "secret.txt"
    canary.write_text(canary_value)
    planted = canary_dir / "planted.txt"

    async def body(client: Client) -> None:
        session_id = await new_session(client)
        base = f"/v1/sessions/{session_id}/files"
        outputs = "/mnt/session/outputs"
        # Symlinks planted by the guest towards the host file and the host directory.
        await sh(client, session_id, f"ln -s {canary} {outputs}/link && ln -s {canary_dir} {outputs}/dirlink")
        traversal = f"{outputs}/../../..{canary}"
        attempts = [
            await client.get(f"{base}/content", params={"path": f"{outputs}/link"}),
            await client.get(f"{base}/content", params={"path": f"{outputs}/dirlink/secret.txt"}),
            await client.get(f"{base}/content", params={"path": traversal}),
            await client.get(f"{base}/content", params={"path": str(canary)}),
            await client.get(f"{base}/list", params={"path": f"{outputs}/dirlink"}),
            await client.get(f"{base}/list", params={"path": str(canary_dir)}),
            await client.get(f"{base}/content?path=%2Fmnt%2Fsession%2Foutputs%2F%2E%2E%2F%2E%2E{canary}"),
        ]
        for response in attempts:
            assert response.status_code == 400, response.text
            assert canary_value not in response.text
            assert "secret.txt" not in json.dumps(response.json().get("entries", []))
        writes = [
            await client.put(f"{base}/content", params={"path": f"{outputs}/dirlink/planted.txt"}, content=b"x"),
            await client.put(f"{base}/content", params={"path": f"{outputs}/../../..{planted}"}, content=b"x"),
        ]
        assert [w.status_code for w in writes] == [400, 400]
        assert not planted.exists()
        assert canary.read_text() == canary_value
        # Admitted sibling: a regular file at the same place is served.
        await sh(client, session_id, f"rm {outputs}/link && echo guest-data > {outputs}/link")
        ok = await client.get(f"{base}/content", params={"path": f"{outputs}/link"})
        assert ok.status_code == 200 and ok.content == b"guest-data\n"

    serve(backend, body)


# ----------------------------------------------------------------------------------------------- journal


def test_snapshots_are_listed_and_survive_the_service(backend: BwrapBackend, tmp_path: Path) -> None:
    if not backend.capabilities().snapshot:
        pytest.skip("bwrap snapshots need a writable cgroup freezer on this host")
    ids: list[str] = []

    async def take(client: Client) -> None:
        session_id = await new_session(client)
        ids.append(session_id)
        snap = await client.post(f"/v1/sessions/{session_id}/snapshot")
        assert snap.status_code == 201
        ids.append(snap.json()["snapshot_id"])
        await new_session(client)  # another session, without snapshots

    async def look(client: Client) -> None:
        everything = (await client.get("/v1/snapshots")).json()["snapshots"]
        assert [s["snapshot_id"] for s in everything] == [ids[1]]
        mine = (await client.get("/v1/snapshots", params={"session_id": ids[0]})).json()["snapshots"]
        assert [s["snapshot_id"] for s in mine] == [ids[1]]
        other = (await client.get("/v1/snapshots", params={"session_id": "someone-else"})).json()
        assert other == {"snapshots": []}

    serve(backend, take, state_dir=tmp_path / "service")
    serve(backend, look, state_dir=tmp_path / "service")  # a new service on the same state directory


# ----------------------------------------------------------------------------------------------- openapi


def test_committed_openapi_document_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == build_openapi(OPERATIONS), (
        "docs/openapi.json is stale: python -m stockade.service.openapi > docs/openapi.json")


def test_served_document_and_responses_match_it(backend: BwrapBackend) -> None:
    jsonschema = pytest.importorskip("jsonschema")

    async def body(client: Client) -> None:
        served = (await client.get("/openapi.json")).json()
        assert served == build_openapi(OPERATIONS)
        assert (await client.get("/v1/openapi.json")).json() == served
        schemas = served["components"]["schemas"]

        def check(response: httpx.Response, name: str) -> None:
            schema = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
            jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)

        session_id = await new_session(client, limits={"wall_time": "30s"})
        check(await client.get(f"/v1/sessions/{session_id}"), "SandboxSession")
        check(await client.get("/v1/sessions"), "SessionList")
        check(await client.post(f"/v1/sessions/{session_id}/exec", json={"command": "true"}), "ExecResult")
        check(await client.get("/v1/capabilities"), "SandboxCapabilities")
        check(await client.get("/v1/info"), "Info")
        check(await client.get("/v1/sessions/nope"), "ErrorBody")
        check(await client.get(f"/v1/sessions/{session_id}/files/list", params={"path": "/"}), "FileList")

    serve(backend, body)
