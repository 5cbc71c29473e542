"""The JSON wire format, pinned literally: harn-hostlib's ``sandbox`` shapes plus our extensions.

Key order is part of the pin (harn's serde emits fields in declaration order), so the keys of each dump are
compared as a list too, not only as a dict.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from stockade.errors import InvalidRequest
from stockade.models import (
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    ResolvedMount,
    ResourceLimits,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
)


def assert_pinned(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual == expected
    assert list(actual) == list(expected), "key order differs from the wire format"
    # The text form is the same document.
    assert json.loads(json.dumps(actual)) == expected


# --- network policy ---------------------------------------------------------------------------------------


def test_network_policy_unrestricted_shape() -> None:
    assert_pinned(NetworkPolicy.unrestricted().to_json(), {"mode": "unrestricted"})


def test_network_policy_limited_shape() -> None:
    # harn's own golden test: network_policy_uses_anthropic_compatible_shape.
    assert_pinned(
        NetworkPolicy.limited("api.github.com").to_json(),
        {"mode": "limited", "allowed_hosts": ["api.github.com"]},
    )


def test_network_policy_deny_all_shape() -> None:
    assert_pinned(NetworkPolicy.deny_all().to_json(), {"mode": "limited", "allowed_hosts": []})


def test_network_policy_nested_in_spec_keeps_harn_shape() -> None:
    spec = SandboxSpec(network_policy=NetworkPolicy.unrestricted())
    assert spec.to_json()["network_policy"] == {"mode": "unrestricted"}
    assert json.loads(spec.model_dump_json())["network_policy"] == {"mode": "unrestricted"}


def test_network_policy_text_dump() -> None:
    assert NetworkPolicy.limited("api.github.com").model_dump_json() == (
        '{"mode":"limited","allowed_hosts":["api.github.com"]}'
    )
    assert NetworkPolicy.unrestricted().model_dump_json() == '{"mode":"unrestricted"}'


# --- small values -----------------------------------------------------------------------------------------


def test_filesystem_access_values() -> None:
    assert FilesystemAccess.READ_ONLY.value == "read_only"
    assert FilesystemAccess.READ_WRITE.value == "read_write"
    assert json.loads(FilesystemMount(target="/a", access=FilesystemAccess.READ_WRITE).model_dump_json()) == {
        "source": "",
        "target": "/a",
        "access": "read_write",
    }


def test_filesystem_mount_shape() -> None:
    mount = FilesystemMount(source="/srv/data", target="/mnt/data", access=FilesystemAccess.READ_ONLY)
    assert_pinned(mount.to_json(), {"source": "/srv/data", "target": "/mnt/data", "access": "read_only"})


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (SandboxState.PROVISIONED, "provisioned"),
        (SandboxState.RUNNING, "running"),
        (SandboxState.SUSPENDED, "suspended"),
        (SandboxState.TERMINATED, "terminated"),
    ],
)
def test_states_are_snake_case(state: SandboxState, text: str) -> None:
    session = SandboxSession(id="s1", backend="test", state=state)
    assert session.to_json()["state"] == text
    assert SandboxState(text) is state


def test_duration_shape() -> None:
    limits = ResourceLimits(
        wall_time=timedelta(seconds=30), idle_timeout=timedelta(seconds=1, milliseconds=500)
    )
    out = limits.to_json()
    assert out["wall_time"] == {"secs": 30, "nanos": 0}
    assert out["idle_timeout"] == {"secs": 1, "nanos": 500_000_000}


def test_resource_limits_shape() -> None:
    limits = ResourceLimits(wall_time=timedelta(seconds=30), cpu_count=2, memory_mb=512)
    assert_pinned(
        limits.to_json(),
        {
            # harn's four, in harn's order:
            "wall_time": {"secs": 30, "nanos": 0},
            "cpu_count": 2,
            "memory_mb": 512,
            "idle_timeout": None,
            # extensions:
            "pids_max": None,
            "tmp_mb": None,
            "output_limit_bytes": None,
        },
    )


# --- whole models -----------------------------------------------------------------------------------------


def test_spec_shape() -> None:
    spec = SandboxSpec(
        session_id="sess-1",
        labels={"tenant": "acme"},
        network_policy=NetworkPolicy.limited("api.github.com"),
        mounts=(FilesystemMount(source="/srv/data", target="/mnt/data"),),
        limits=ResourceLimits(memory_mb=512),
        env={"LANG": "C.UTF-8"},
    )
    assert_pinned(
        spec.to_json(),
        {
            "session_id": "sess-1",
            "labels": {"tenant": "acme"},
            "network_policy": {"mode": "limited", "allowed_hosts": ["api.github.com"]},
            "mounts": [{"source": "/srv/data", "target": "/mnt/data", "access": "read_only"}],
            "limits": {
                "wall_time": None,
                "cpu_count": None,
                "memory_mb": 512,
                "idle_timeout": None,
                "pids_max": None,
                "tmp_mb": None,
                "output_limit_bytes": None,
            },
            "env": {"LANG": "C.UTF-8"},
            "memory_writable": False,
            "image": None,
            "from_snapshot": None,
        },
    )


def test_default_spec_denies_network() -> None:
    assert SandboxSpec().to_json()["network_policy"] == {"mode": "limited", "allowed_hosts": []}


def test_session_shape_and_id_is_a_plain_string() -> None:
    session = SandboxSession(
        id="sess-1",
        backend="bwrap",
        state=SandboxState.RUNNING,
        mounts=(ResolvedMount(target="/mnt/memory", access=FilesystemAccess.READ_ONLY, host_path="/h/m"),),
        metadata={"root": "/var/lib/x"},
    )
    assert_pinned(
        session.to_json(),
        {
            "id": "sess-1",
            "backend": "bwrap",
            "state": "running",
            "mounts": [{"target": "/mnt/memory", "access": "read_only", "host_path": "/h/m"}],
            "metadata": {"root": "/var/lib/x"},
        },
    )


def test_exec_request_shape() -> None:
    request = ExecRequest(command="ls", args=("-l",), timeout=timedelta(seconds=5))
    assert_pinned(
        request.to_json(),
        {
            "command": "ls",
            "args": ["-l"],
            "cwd": None,
            "env": {},
            "stdin": None,
            "timeout": {"secs": 5, "nanos": 0},
        },
    )


def test_exec_result_harn_fields_first() -> None:
    result = ExecResult(stdout="hi\n", stderr="", exit_code=3, timed_out=False, duration_ms=12.5)
    assert_pinned(
        result.to_json(),
        {
            "stdout": "hi\n",
            "stderr": "",
            "exit_code": 3,
            "timed_out": False,
            "duration_ms": 12.5,
            "oom_killed": False,
            "truncated": False,
        },
    )


def test_snapshot_shape() -> None:
    snap = SandboxSnapshot(session_id="sess-1", backend="bwrap", snapshot_id="snap-1", metadata={"k": "v"})
    assert_pinned(
        snap.to_json(),
        {"session_id": "sess-1", "backend": "bwrap", "snapshot_id": "snap-1", "metadata": {"k": "v"}},
    )


def test_capabilities_harn_flags_first_in_harn_order() -> None:
    caps = SandboxCapabilities(local_process_sandbox=True, resume=True)
    out = caps.to_json()
    assert list(out)[:5] == [
        "local_process_sandbox",
        "network_policy",
        "snapshot",
        "resume",
        "suspend_on_idle",
    ]
    assert_pinned(
        out,
        {
            "local_process_sandbox": True,
            "network_policy": False,
            "snapshot": False,
            "resume": True,
            "suspend_on_idle": False,
            "filesystem_isolation": False,
            "process_isolation": False,
            "live_mounts": False,
            "memory_snapshot": False,
            "resource_limits": False,
            "memory_limit": False,
            "pids_limit": False,
            "cpu_limit": False,
            "network_deny_all": False,
            "network_unrestricted": False,
            "egress_log": False,
            "exec_streaming": False,
            "persistent_sessions": False,
            "private_filesystem_view": True,
            "private_loopback": True,
            "private_mount_sources": True,
            "private_supervisor": True,
            "oom_keeps_session": True,
        },
    )


# --- harn-produced JSON parses; extensions default ----------------------------------------------------------

HARN_SPEC = """
{
  "session_id": null,
  "labels": {"persona": "reviewer"},
  "network_policy": {"mode": "limited", "allowed_hosts": ["api.github.com", "*.pythonhosted.org"]},
  "mounts": [
    {"source": "/srv/repo", "target": "/workspace/", "access": "read_write"},
    {"source": "", "target": "/scratch", "access": "read_only"}
  ],
  "limits": {
    "wall_time": {"secs": 30, "nanos": 0}, "cpu_count": null, "memory_mb": 1024, "idle_timeout": null
  }
}
"""


def test_harn_spec_parses_with_extension_defaults() -> None:
    spec = SandboxSpec.parse(HARN_SPEC)
    assert spec.session_id is None
    assert spec.labels == {"persona": "reviewer"}
    assert spec.network_policy == NetworkPolicy(
        mode="limited", allowed_hosts=("api.github.com", "*.pythonhosted.org")
    )
    assert spec.mounts[0] == FilesystemMount(
        source="/srv/repo", target="/workspace", access=FilesystemAccess.READ_WRITE
    )
    assert spec.mounts[1].source == ""
    assert spec.limits.wall_time == timedelta(seconds=30)
    assert spec.limits.memory_mb == 1024
    assert spec.limits.cpu_count is None
    # Extensions take their defaults.
    assert spec.env == {}
    assert spec.memory_writable is False
    assert spec.image is None
    assert spec.from_snapshot is None
    assert spec.limits.pids_max is None
    assert spec.limits.tmp_mb is None
    assert spec.limits.output_limit_bytes is None


def test_harn_unrestricted_spec_parses() -> None:
    spec = SandboxSpec.parse(
        '{"session_id": "s-1", "labels": {}, "network_policy": {"mode": "unrestricted"}, "mounts": [],'
        ' "limits": {"wall_time": null, "cpu_count": 2, "memory_mb": null,'
        ' "idle_timeout": {"secs": 600, "nanos": 0}}}'
    )
    assert spec.session_id == "s-1"
    assert spec.network_policy == NetworkPolicy.unrestricted()
    assert spec.limits.idle_timeout == timedelta(minutes=10)


def test_harn_exec_request_parses() -> None:
    request = ExecRequest.parse(
        {"command": "sh", "args": ["-c", "echo hi"], "cwd": None, "env": {}, "stdin": None, "timeout": None}
    )
    assert request.argv == ["sh", "-c", "echo hi"]
    assert request.timeout is None


def test_harn_exec_result_parses_with_extension_defaults() -> None:
    result = ExecResult.parse({"stdout": "x", "stderr": "", "exit_code": 1, "timed_out": True})
    assert result.exit_code == 1
    assert result.timed_out is True
    assert result.success is False
    assert result.duration_ms is None
    assert result.oom_killed is False
    assert result.truncated is False


def test_harn_session_parses() -> None:
    session = SandboxSession.parse(
        {
            "id": "session-42",
            "backend": "local",
            "state": "suspended",
            "mounts": [{"target": "/mnt/memory", "access": "read_only", "host_path": None}],
            "metadata": {},
        }
    )
    assert session.state is SandboxState.SUSPENDED
    assert session.mounts[0].host_path is None


def test_harn_snapshot_parses() -> None:
    snap = SandboxSnapshot.parse({"session_id": "s", "backend": "local", "snapshot_id": "x", "metadata": {}})
    assert snap.snapshot_id == "x"


def test_harn_capabilities_parse_with_extension_defaults() -> None:
    caps = SandboxCapabilities.parse(
        {
            "local_process_sandbox": True,
            "network_policy": False,
            "snapshot": False,
            "resume": False,
            "suspend_on_idle": False,
        }
    )
    assert caps.local_process_sandbox is True
    assert caps.filesystem_isolation is False
    assert caps.persistent_sessions is False
    assert caps.private_filesystem_view is True  # the contract's meaning unless a backend says otherwise


# --- duration inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        ("30s", timedelta(seconds=30)),
        ("30", timedelta(seconds=30)),
        ("2m", timedelta(minutes=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h", timedelta(hours=1)),
        ("1.5d", timedelta(days=1, hours=12)),
        ("250us", timedelta(microseconds=250)),
        ({"secs": 30, "nanos": 0}, timedelta(seconds=30)),
        ({"secs": 1, "nanos": 500_000_000}, timedelta(seconds=1, milliseconds=500)),
        ({"secs": 7}, timedelta(seconds=7)),
        # Sub-microsecond nanos round up, so a positive harn duration never becomes zero.
        ({"secs": 0, "nanos": 1}, timedelta(microseconds=1)),
        ({"secs": 2, "nanos": 1_500}, timedelta(seconds=2, microseconds=2)),
    ],
)
def test_duration_inputs(given: Any, expected: timedelta) -> None:
    assert ExecRequest.parse({"command": "x", "timeout": given}).timeout == expected
    assert ResourceLimits.parse({"wall_time": given}).wall_time == expected


def test_duration_emitted_in_harn_shape_whatever_the_input() -> None:
    for given in (90, "90s", "1.5m", {"secs": 90, "nanos": 0}):
        assert ExecRequest.parse({"command": "x", "timeout": given}).to_json()["timeout"] == {
            "secs": 90,
            "nanos": 0,
        }


def test_invalid_json_text_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        SandboxSpec.parse("{not json")
