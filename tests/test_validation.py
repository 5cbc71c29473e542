"""One test per validation rule: InvalidRequest, its ``field`` saying where and its message the rule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from stockade.errors import InvalidRequest
from stockade.models import (
    ExecRequest,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    ResourceLimits,
    SandboxSpec,
    parse_duration,
    validate_session_id,
)


def refused(data: Any, model: type[SandboxSpec] | type[ExecRequest] = SandboxSpec) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        model.parse(data)
    return info.value


def mount_spec(**mount: Any) -> dict[str, Any]:
    return {"mounts": [{"target": "/mnt/x", **mount}]}


def test_error_carries_field_and_prefixes_message() -> None:
    err = refused({"session_id": ""})
    assert err.field == "session_id"
    assert str(err) == "session_id: must not be empty"
    assert err.message == str(err)


# --- session id -------------------------------------------------------------------------------------------


def test_session_id_empty() -> None:
    err = refused({"session_id": ""})
    assert (err.field, "must not be empty" in str(err)) == ("session_id", True)


def test_session_id_too_long() -> None:
    err = refused({"session_id": "a" * 65})
    assert err.field == "session_id"
    assert "at most 64 characters (got 65)" in str(err)
    assert SandboxSpec.parse({"session_id": "a" * 64}).session_id == "a" * 64


@pytest.mark.parametrize("bad", ["a b", "a/b", "a:b", "ü", "a\n", "a\x00"])
def test_session_id_bad_characters(bad: str) -> None:
    err = refused({"session_id": bad})
    assert err.field == "session_id"
    assert "may contain only letters, digits, '.', '_' and '-'" in str(err)


def test_session_id_leading_dot() -> None:
    err = refused({"session_id": ".hidden"})
    assert err.field == "session_id"
    assert "must not start with '.' or '-'" in str(err)


def test_session_id_leading_dash() -> None:
    err = refused({"session_id": "-rf"})
    assert err.field == "session_id"
    assert "must not start with '.' or '-'" in str(err)


@pytest.mark.parametrize("bad", [5, ["a"], True])
def test_session_id_not_a_string(bad: Any) -> None:
    err = refused({"session_id": bad})
    assert err.field == "session_id"
    assert "must be a string" in str(err)


def test_session_id_helper_and_accepted_forms() -> None:
    for good in ("a", "A1", "_x", "sess-1.2_3", "0"):
        assert validate_session_id(good) == good
    with pytest.raises(InvalidRequest) as info:
        validate_session_id("", "id")
    assert info.value.field == "id"


# --- mount target -----------------------------------------------------------------------------------------


def test_mount_target_relative() -> None:
    err = refused(mount_spec(target="mnt/x"))
    assert err.field == "mounts.0.target"
    assert "must be an absolute guest path" in str(err)


@pytest.mark.parametrize("target", ["/a/../etc", "/..", "/a/.."])
def test_mount_target_dotdot(target: str) -> None:
    err = refused(mount_spec(target=target))
    assert err.field == "mounts.0.target"
    assert "must not contain a '..' component" in str(err)


def test_mount_target_dot() -> None:
    err = refused(mount_spec(target="/a/./b"))
    assert err.field == "mounts.0.target"
    assert "must not contain a '.' component" in str(err)


def test_mount_target_nul() -> None:
    err = refused(mount_spec(target="/a\x00b"))
    assert err.field == "mounts.0.target"
    assert "must not contain a NUL character" in str(err)


@pytest.mark.parametrize("target", ["/", "//", "///"])
def test_mount_target_root(target: str) -> None:
    err = refused(mount_spec(target=target))
    assert err.field == "mounts.0.target"
    assert "must not be '/'" in str(err)


@pytest.mark.parametrize(
    ("target", "root"), [("/proc", "/proc"), ("/sys/fs", "/sys"), ("/dev/shm/x", "/dev")]
)
def test_mount_target_kernel_filesystems(target: str, root: str) -> None:
    err = refused(mount_spec(target=target))
    assert err.field == "mounts.0.target"
    assert f"must not be {root} or below it" in str(err)


def test_mount_target_near_kernel_filesystems_is_fine() -> None:
    assert FilesystemMount(target="/processes").target == "/processes"
    assert FilesystemMount(target="/devices/x").target == "/devices/x"


def test_mount_target_normalised() -> None:
    assert FilesystemMount(target="//a//b/").target == "/a/b"
    assert SandboxSpec.parse(mount_spec(target="/mnt//x/")).mounts[0].target == "/mnt/x"


def test_mount_target_not_a_string() -> None:
    err = refused(mount_spec(target=7))
    assert err.field == "mounts.0.target"
    assert "must be a string" in str(err)


def test_mount_target_missing() -> None:
    err = refused({"mounts": [{"source": "/x"}]})
    assert err.field == "mounts.0.target"
    assert "is required" in str(err)


def test_mount_error_names_the_index() -> None:
    err = refused({"mounts": [{"target": "/ok"}, {"target": "bad"}]})
    assert err.field == "mounts.1.target"


# --- mount source -----------------------------------------------------------------------------------------


def test_mount_source_relative() -> None:
    err = refused(mount_spec(source="data"))
    assert err.field == "mounts.0.source"
    assert "must be an absolute host path or empty" in str(err)


def test_mount_source_nul() -> None:
    err = refused(mount_spec(source="/a\x00"))
    assert err.field == "mounts.0.source"
    assert "must not contain a NUL character" in str(err)


def test_mount_source_normalised_and_empty_allowed() -> None:
    assert FilesystemMount(source="//srv//data/", target="/d").source == "/srv/data"
    assert FilesystemMount(source="", target="/d").source == ""
    assert FilesystemMount.parse({"source": None, "target": "/d"}).source == ""


def test_mount_access_value() -> None:
    err = refused(mount_spec(access="rw"))
    assert err.field == "mounts.0.access"
    assert "read_only" in str(err)


def test_duplicate_targets() -> None:
    err = refused({"mounts": [{"target": "/a"}, {"target": "/b"}, {"target": "//a/"}]})
    assert err.field == "mounts.2.target"
    assert "'/a' is mounted twice" in str(err)


# --- env --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["1A", "A-B", "A=B", "", "A\n", "Ä"])
def test_env_bad_key(key: str) -> None:
    err = refused({"env": {key: "x"}})
    assert err.field == "env"
    assert "must match [A-Za-z_][A-Za-z0-9_]*" in str(err)


def test_env_nul_in_value() -> None:
    err = refused({"env": {"HOME": "/x\x00"}})
    assert err.field == "env.HOME"
    assert "must not contain a NUL character" in str(err)


def test_env_value_not_a_string() -> None:
    err = refused({"env": {"N": 1}})
    assert err.field == "env"
    assert "value of 'N' must be a string" in str(err)


def test_exec_env_rules_too() -> None:
    err = refused({"command": "x", "env": {"A": "\x00"}}, ExecRequest)
    assert err.field == "env.A"
    err = refused({"command": "x", "env": {"9": ""}}, ExecRequest)
    assert err.field == "env"


def test_labels_rules() -> None:
    err = refused({"labels": {"-x": "v"}})
    assert err.field == "labels"
    assert "key '-x' must match" in str(err)
    err = refused({"labels": {"k": "v" * 1025}})
    assert "at most 1024 characters" in str(err)


# --- exec request -----------------------------------------------------------------------------------------


def test_command_nul() -> None:
    err = refused({"command": "ls\x00"}, ExecRequest)
    assert err.field == "command"
    assert "must not contain a NUL character" in str(err)


def test_command_empty() -> None:
    err = refused({"command": ""}, ExecRequest)
    assert err.field == "command"
    assert "must not be empty" in str(err)


def test_command_missing() -> None:
    err = refused({}, ExecRequest)
    assert err.field == "command"
    assert "is required" in str(err)


def test_args_nul() -> None:
    err = refused({"command": "x", "args": ["ok", "b\x00d"]}, ExecRequest)
    assert err.field == "args.1"
    assert "must not contain a NUL character" in str(err)


def test_args_not_a_list() -> None:
    err = refused({"command": "x", "args": "-l"}, ExecRequest)
    assert err.field == "args"
    assert "must be a list of strings" in str(err)


def test_args_item_not_a_string() -> None:
    err = refused({"command": "x", "args": ["a", 2]}, ExecRequest)
    assert err.field == "args.1"


def test_cwd_nul() -> None:
    err = refused({"command": "x", "cwd": "/a\x00"}, ExecRequest)
    assert err.field == "cwd"
    assert "must not contain a NUL character" in str(err)


def test_cwd_empty() -> None:
    err = refused({"command": "x", "cwd": ""}, ExecRequest)
    assert err.field == "cwd"
    assert "must be a non-empty path" in str(err)


def test_stdin_not_a_string() -> None:
    err = refused({"command": "x", "stdin": 5}, ExecRequest)
    assert err.field == "stdin"


# --- limits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cpu_count", "memory_mb", "pids_max", "tmp_mb", "output_limit_bytes"])
@pytest.mark.parametrize("value", [0, -1])
def test_limit_not_positive(key: str, value: int) -> None:
    err = refused({"limits": {key: value}})
    assert err.field == f"limits.{key}"
    assert "must be between 1 and" in str(err)
    assert f"(got {value})" in str(err)


@pytest.mark.parametrize(
    ("key", "too_big"),
    [
        ("cpu_count", 4097),
        ("memory_mb", 4 * 1024 * 1024 + 1),
        ("pids_max", 4_194_305),
        ("output_limit_bytes", 1 << 41),
    ],
)
def test_limit_above_bound(key: str, too_big: int) -> None:
    err = refused({"limits": {key: too_big}})
    assert err.field == f"limits.{key}"
    assert f"(got {too_big})" in str(err)


@pytest.mark.parametrize("value", [1.5, "512", [1], float("nan"), float("inf")])
def test_limit_not_an_integer(value: Any) -> None:
    err = refused({"limits": {"memory_mb": value}})
    assert err.field == "limits.memory_mb"
    assert "must be a whole number" in str(err)


def test_limit_bool_refused() -> None:
    err = refused({"limits": {"cpu_count": True}})
    assert err.field == "limits.cpu_count"
    assert "must be a whole number" in str(err)


def test_limit_whole_float_accepted() -> None:
    assert ResourceLimits.parse({"memory_mb": 512.0}).memory_mb == 512


def test_limits_standalone_name_their_own_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        ResourceLimits.parse({"cpu_count": 0})
    assert info.value.field == "cpu_count"


# --- durations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, -0.5, "-1s", {"secs": -1, "nanos": 0}])
def test_duration_negative(value: Any) -> None:
    err = refused({"limits": {"wall_time": value}})
    assert err.field == "limits.wall_time"
    assert any(rule in str(err) for rule in ("must be positive", "secs must be >= 0", "must be a number"))


@pytest.mark.parametrize("value", [0, 0.0, "0s", "0", {"secs": 0, "nanos": 0}])
def test_duration_zero(value: Any) -> None:
    err = refused({"limits": {"wall_time": value}})
    assert err.field == "limits.wall_time"
    assert "must be positive" in str(err)


@pytest.mark.parametrize("value", ["soon", "30 seconds", "1e3s", "30S", "", "s"])
def test_duration_garbage_string(value: str) -> None:
    err = refused({"limits": {"idle_timeout": value}})
    assert err.field == "limits.idle_timeout"
    assert "must be a number with an optional unit" in str(err)


@pytest.mark.parametrize(
    "value", [31 * 86400, "31d", "721h", {"secs": 30 * 86400, "nanos": 1}, 10**400, "9" * 400 + "s"]
)
def test_duration_too_long(value: Any) -> None:
    err = refused({"limits": {"wall_time": value}})
    assert err.field == "limits.wall_time"
    assert "must be at most 30 days" in str(err)


def test_duration_thirty_days_is_the_bound() -> None:
    assert ResourceLimits.parse({"wall_time": "30d"}).wall_time == timedelta(days=30)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ({"secs": 1, "extra": 0}, 'must have the form {"secs": N, "nanos": N}'),
        ({"nanos": 5}, 'must have the form {"secs": N, "nanos": N}'),
        ({"secs": 1.5, "nanos": 0}, "secs and nanos must be whole numbers"),
        ({"secs": True, "nanos": 0}, "secs and nanos must be whole numbers"),
        ({"secs": 1, "nanos": 1_000_000_000}, "nanos within 0..999999999"),
        ({"secs": 1, "nanos": -1}, "nanos within 0..999999999"),
    ],
)
def test_duration_bad_dict(value: Any, rule: str) -> None:
    err = refused({"command": "x", "timeout": value}, ExecRequest)
    assert err.field == "timeout"
    assert rule in str(err)


@pytest.mark.parametrize("value", [True, [1], float("nan"), float("inf")])
def test_duration_wrong_type(value: Any) -> None:
    err = refused({"command": "x", "timeout": value}, ExecRequest)
    assert err.field == "timeout"


def test_parse_duration_names_its_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_duration("nope", "limits.timeout")
    assert info.value.field == "limits.timeout"


# --- network policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("*", "bare '*' is not allowed"),
        ("*.com", "at least two labels after '*.'"),
        ("https://x.com", "URL scheme"),
        ("x.com/path", "paths are not allowed"),
        ("a..b.com", "empty label"),
        ("x.com:0", "outside 1-65535"),
        ("x.com:99999", "outside 1-65535"),
        ("x.com:http", "non-numeric port"),
        ("", "empty host pattern"),
    ],
)
def test_bad_host_pattern(pattern: str, fragment: str) -> None:
    err = refused({"network_policy": {"mode": "limited", "allowed_hosts": ["ok.example.com", pattern]}})
    assert err.field is not None and "allowed_hosts" in err.field
    assert err.field == "network_policy.allowed_hosts"
    assert fragment in str(err)


def test_bad_host_pattern_through_helper() -> None:
    with pytest.raises(InvalidRequest) as info:
        NetworkPolicy.limited("*")
    assert info.value.field == "allowed_hosts"


def test_host_patterns_normalised_and_deduplicated() -> None:
    policy = NetworkPolicy.limited("API.GitHub.com", "api.github.com.", "api.github.com")
    assert policy.allowed_hosts == ("api.github.com",)


def test_allowed_hosts_not_a_list() -> None:
    err = refused({"network_policy": {"mode": "limited", "allowed_hosts": "x.com"}})
    assert err.field == "network_policy.allowed_hosts"
    assert "must be a list of host patterns" in str(err)


def test_allowed_hosts_item_not_a_string() -> None:
    err = refused({"network_policy": {"mode": "limited", "allowed_hosts": [1]}})
    assert err.field == "network_policy.allowed_hosts"
    assert "must be a list of strings" in str(err)


def test_unknown_field_in_network_policy() -> None:
    # A typo must not silently become a weaker (or different) policy.
    err = refused({"network_policy": {"mode": "limited", "allowed_host": ["x.com"], "allowed_hosts": []}})
    assert err.field == "network_policy.allowed_host"
    assert "is not a known field" in str(err)


def test_limited_without_allowed_hosts() -> None:
    err = refused({"network_policy": {"mode": "limited"}})
    assert err.field == "network_policy.allowed_hosts"
    assert "is required when mode is 'limited'" in str(err)


def test_limited_typo_without_allowed_hosts() -> None:
    err = refused({"network_policy": {"mode": "limited", "allowed_host": ["x.com"]}})
    assert err.field is not None and err.field.startswith("network_policy.allowed_host")


def test_unrestricted_with_hosts() -> None:
    err = refused({"network_policy": {"mode": "unrestricted", "allowed_hosts": ["x.com"]}})
    assert err.field == "network_policy.allowed_hosts"
    assert "must be absent when mode is 'unrestricted'" in str(err)


def test_unknown_mode() -> None:
    err = refused({"network_policy": {"mode": "open"}})
    assert err.field == "network_policy.mode"


def test_mode_missing() -> None:
    err = refused({"network_policy": {"allowed_hosts": []}})
    assert err.field == "network_policy.mode"
    assert "is required" in str(err)


# --- unknown fields ---------------------------------------------------------------------------------------


def test_unknown_top_level_spec_field() -> None:
    err = refused({"mount": [{"target": "/a"}]})
    assert err.field == "mount"
    assert "is not a known field" in str(err)


def test_unknown_nested_fields() -> None:
    assert refused({"limits": {"memory": 5}}).field == "limits.memory"
    assert refused({"mounts": [{"target": "/a", "readonly": True}]}).field == "mounts.0.readonly"
    assert refused({"command": "x", "timeout_s": 5}, ExecRequest).field == "timeout_s"


def test_other_spec_fields() -> None:
    assert refused({"image": "  "}).field == "image"
    assert refused({"from_snapshot": "../x"}).field == "from_snapshot"


# --- constructing in code obeys the same rules --------------------------------------------------------------


def test_constructor_raises_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        FilesystemMount(target="relative", access=FilesystemAccess.READ_ONLY)
    assert info.value.field == "target"
    with pytest.raises(InvalidRequest) as info:
        ResourceLimits(wall_time=timedelta(seconds=-1))
    assert info.value.field == "wall_time"
    with pytest.raises(InvalidRequest) as info:
        SandboxSpec(mounts=(FilesystemMount(target="/a"), FilesystemMount(target="/a/")))
    assert info.value.field == "mounts.1.target"


def test_models_are_frozen() -> None:
    spec = SandboxSpec()
    with pytest.raises(ValueError):
        spec.session_id = "x"
