"""parse(emit(x)) == x for every model, through a dict and through JSON text."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from stockade.models import (
    MAX_CPU_COUNT,
    MAX_DURATION,
    MAX_MEMORY_MB,
    MAX_OUTPUT_BYTES,
    MAX_PIDS,
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
    parse_model,
)

M = TypeVar("M", bound=BaseModel)

_ID_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_ID_REST = _ID_FIRST + ".-"
_ENV_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_ENV_REST = _ENV_FIRST + "0123456789"
_SEGMENT = "abcdefghijklmnopqrstuvwxyz0123456789_-"
# Text without NUL (the one character every string field refuses); surrogates cannot be encoded as JSON text.
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)

session_ids = st.builds(
    lambda a, b: a + b, st.sampled_from(_ID_FIRST), st.text(st.sampled_from(_ID_REST), max_size=63)
)
env_keys = st.builds(
    lambda a, b: a + b, st.sampled_from(_ENV_FIRST), st.text(st.sampled_from(_ENV_REST), max_size=10)
)
envs = st.dictionaries(env_keys, texts, max_size=4)
label_keys = st.builds(
    lambda a, b: a + b, st.sampled_from("abc012"), st.text(st.sampled_from("abc./_-"), max_size=8)
)
labels = st.dictionaries(label_keys, texts, max_size=3)


def _not_kernel(path: str) -> bool:
    return not any(path == root or path.startswith(root + "/") for root in ("/proc", "/sys", "/dev"))


segments = st.text(st.sampled_from(_SEGMENT), min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
guest_paths = (
    st.lists(segments, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)).filter(_not_kernel)
)
host_paths = st.one_of(
    st.just(""), st.lists(segments, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p))
)
accesses = st.sampled_from(FilesystemAccess)

mounts = st.builds(FilesystemMount, source=host_paths, target=guest_paths, access=accesses)
# timedelta holds microseconds; durations are positive and at most 30 days.
durations = st.integers(min_value=1, max_value=int(MAX_DURATION.total_seconds()) * 1_000_000).map(
    lambda us: timedelta(microseconds=us)
)

labels_ = st.text(st.sampled_from("abcdefghij0123456789-"), min_size=1, max_size=8).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
names = st.lists(labels_, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "example"]))
host_patterns = st.one_of(
    names,
    names.map(lambda n: "*." + n),
    st.tuples(names, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.ip_addresses(v=4).map(str),
)
network_policies = st.one_of(
    st.just(NetworkPolicy.unrestricted()),
    st.lists(host_patterns, max_size=4).map(lambda hosts: NetworkPolicy.limited(*hosts)),
)

limits = st.builds(
    ResourceLimits,
    wall_time=st.none() | durations,
    cpu_count=st.none() | st.integers(1, MAX_CPU_COUNT),
    memory_mb=st.none() | st.integers(1, MAX_MEMORY_MB),
    idle_timeout=st.none() | durations,
    pids_max=st.none() | st.integers(1, MAX_PIDS),
    tmp_mb=st.none() | st.integers(1, MAX_MEMORY_MB),
    output_limit_bytes=st.none() | st.integers(1, MAX_OUTPUT_BYTES),
)


@st.composite
def specs(draw: st.DrawFn) -> SandboxSpec:
    ms = draw(st.lists(mounts, max_size=4, unique_by=lambda m: m.target))
    return SandboxSpec(
        session_id=draw(st.none() | session_ids),
        labels=draw(labels),
        network_policy=draw(network_policies),
        mounts=tuple(ms),
        limits=draw(limits),
        env=draw(envs),
        memory_writable=draw(st.booleans()),
        image=draw(st.none() | st.text(st.sampled_from("abc:/.0123"), min_size=1, max_size=12)),
        from_snapshot=draw(st.none() | session_ids),
    )


exec_requests = st.builds(
    ExecRequest,
    command=texts.filter(bool),
    args=st.lists(texts, max_size=4).map(tuple),
    cwd=st.none() | texts.filter(bool),
    env=envs,
    stdin=st.none() | texts,
    timeout=st.none() | durations,
)
exec_results = st.builds(
    ExecResult,
    stdout=texts,
    stderr=texts,
    exit_code=st.integers(-(2**31), 2**31 - 1),
    timed_out=st.booleans(),
    duration_ms=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
    oom_killed=st.booleans(),
    truncated=st.booleans(),
)
resolved_mounts = st.builds(
    ResolvedMount, target=guest_paths, access=accesses, host_path=st.none() | host_paths.filter(bool)
)
sessions = st.builds(
    SandboxSession,
    id=session_ids,
    backend=texts,
    state=st.sampled_from(SandboxState),
    mounts=st.lists(resolved_mounts, max_size=3).map(tuple),
    metadata=st.dictionaries(texts, texts, max_size=3),
)
snapshots = st.builds(
    SandboxSnapshot,
    session_id=session_ids,
    backend=texts,
    snapshot_id=texts,
    metadata=st.dictionaries(texts, texts, max_size=3),
)
capabilities = st.builds(
    SandboxCapabilities, **{name: st.booleans() for name in SandboxCapabilities.model_fields}
)


def roundtrip(value: M) -> None:
    cls = type(value)
    as_dict: dict[str, Any] = value.model_dump(mode="json")
    assert parse_model(cls, as_dict) == value
    text = json.dumps(as_dict)
    assert parse_model(cls, text) == value
    assert parse_model(cls, value.model_dump_json()) == value
    # Emitting again gives the same document (the emitted form is canonical).
    assert parse_model(cls, text).model_dump(mode="json") == as_dict


@given(network_policies)
def test_network_policy(value: NetworkPolicy) -> None:
    roundtrip(value)


@given(mounts)
def test_filesystem_mount(value: FilesystemMount) -> None:
    roundtrip(value)


@given(limits)
def test_resource_limits(value: ResourceLimits) -> None:
    roundtrip(value)


@given(specs())
def test_spec(value: SandboxSpec) -> None:
    roundtrip(value)


@given(exec_requests)
def test_exec_request(value: ExecRequest) -> None:
    roundtrip(value)


@given(exec_results)
def test_exec_result(value: ExecResult) -> None:
    roundtrip(value)


@given(resolved_mounts)
def test_resolved_mount(value: ResolvedMount) -> None:
    roundtrip(value)


@given(sessions)
def test_session(value: SandboxSession) -> None:
    roundtrip(value)


@given(snapshots)
def test_snapshot(value: SandboxSnapshot) -> None:
    roundtrip(value)


@given(capabilities)
def test_capabilities(value: SandboxCapabilities) -> None:
    roundtrip(value)


@given(durations)
def test_duration_emit_parse(value: timedelta) -> None:
    request = ExecRequest(command="x", timeout=value)
    wire = request.to_json()["timeout"]
    assert wire["secs"] * 1_000_000 + wire["nanos"] // 1000 == value // timedelta(microseconds=1)
    assert 0 <= wire["nanos"] < 1_000_000_000
    assert ExecRequest.parse(request.to_json()).timeout == value
