"""Policy lowering: PermissionPolicy (TOML) -> SandboxSpec, mount arguments, sizes, and backend gaps."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from stockade.backend import SandboxBackend, SpecGap
from stockade.errors import InvalidRequest, Unsupported
from stockade.models import (
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    ResourceLimits,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
)
from stockade.policy import PermissionPolicy, parse_mount_arg, parse_size_mb

FULL_POLICY = """
[filesystem]
read = ["/srv/data:/mnt/data", "/etc/ssl"]
write = ["/srv/out:/mnt/out"]
memory_writable = true

[network]
allow = ["api.github.com", "*.pythonhosted.org:443"]

[limits]
memory = "512M"
cpus = 2
timeout = "30s"
idle_timeout = "10m"
pids = 256
tmp = "2G"

[env]
LANG = "C.UTF-8"
"""


def test_full_policy_to_spec() -> None:
    spec = PermissionPolicy.from_toml(FULL_POLICY).to_spec()
    assert spec.mounts == (
        FilesystemMount(source="/srv/data", target="/mnt/data", access=FilesystemAccess.READ_ONLY),
        FilesystemMount(source="/etc/ssl", target="/etc/ssl", access=FilesystemAccess.READ_ONLY),
        FilesystemMount(source="/srv/out", target="/mnt/out", access=FilesystemAccess.READ_WRITE),
    )
    assert spec.memory_writable is True
    assert spec.network_policy == NetworkPolicy(
        mode="limited", allowed_hosts=("api.github.com", "*.pythonhosted.org:443")
    )
    assert spec.limits == ResourceLimits(
        memory_mb=512,
        cpu_count=2,
        wall_time=timedelta(seconds=30),
        idle_timeout=timedelta(minutes=10),
        pids_max=256,
        tmp_mb=2048,
    )
    assert spec.env == {"LANG": "C.UTF-8"}


def test_empty_policy_is_the_safe_default() -> None:
    spec = PermissionPolicy.from_toml("").to_spec()
    assert spec == SandboxSpec()
    assert spec.network_policy.denies_all
    assert spec.mounts == ()


def test_unrestricted_network() -> None:
    spec = PermissionPolicy.from_toml("[network]\nunrestricted = true\n").to_spec()
    assert spec.network_policy == NetworkPolicy.unrestricted()


def test_empty_allow_list_denies_all() -> None:
    spec = PermissionPolicy.from_toml("[network]\nallow = []\n").to_spec()
    assert spec.network_policy.denies_all


def test_to_spec_overrides() -> None:
    spec = PermissionPolicy(memory="1G").to_spec(session_id="s-1", labels={"who": "me"})
    assert spec.session_id == "s-1"
    assert spec.labels == {"who": "me"}
    assert spec.limits.memory_mb == 1024


def test_to_spec_is_deterministic() -> None:
    policy = PermissionPolicy.from_toml(FULL_POLICY)
    assert policy.to_spec() == policy.to_spec()


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(FULL_POLICY, encoding="utf-8")
    assert PermissionPolicy.from_file(path) == PermissionPolicy.from_toml(FULL_POLICY)
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_file(tmp_path / "missing.toml")
    assert info.value.field == "policy"
    assert "cannot read policy file" in str(info.value)


# --- sizes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "mb"),
    [
        ("512M", 512),
        ("512m", 512),
        ("512MiB", 512),
        ("512MB", 512),
        ("2G", 2048),
        ("1.5G", 1536),
        ("1048576K", 1024),
        ("1T", 1024 * 1024),
        ("100", 100),
        (100, 100),
        (0.5, 1),  # rounded up to whole MiB
        ("1b", 1),
    ],
)
def test_sizes(given: Any, mb: int) -> None:
    assert parse_size_mb(given, "limits.memory") == mb


@pytest.mark.parametrize("given", ["lots", "-5M", "5X", "", True, [1], float("nan"), float("inf"), 0, "0G"])
def test_bad_sizes(given: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_size_mb(given, "limits.memory")
    assert info.value.field == "limits.memory"


def test_limits_bare_numbers_in_toml() -> None:
    spec = PermissionPolicy.from_toml("[limits]\nmemory = 256\ntmp = 64\ntimeout = 90\n").to_spec()
    assert (spec.limits.memory_mb, spec.limits.tmp_mb, spec.limits.wall_time) == (
        256,
        64,
        timedelta(seconds=90),
    )


def test_nan_memory_in_toml_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_toml("[limits]\nmemory = nan\n")
    assert info.value.field == "limits.memory"


@pytest.mark.parametrize(
    ("toml", "field", "fragment"),
    [
        ("[limits]\ncpus = 0\n", "limits.cpus", "must be between 1 and"),
        ("[limits]\npids = -1\n", "limits.pids", "must be between 1 and"),
        ('[limits]\ncpus = "two"\n', "limits.cpus", "must be a whole number"),
        ('[limits]\nmemory = "99999T"\n', "limits.memory", "must be between 1 and"),
        ('[limits]\ntimeout = "soon"\n', "limits.timeout", "must be a number with an optional unit"),
        ('[limits]\nidle_timeout = "40d"\n', "limits.idle_timeout", "at most 30 days"),
        ('[network]\nallow = ["*"]\n', "network.allow", "bare '*'"),
        ('[network]\nallow = "x.com"\n', "network.allow", "must be a list of strings"),
        ('[network]\nunrestricted = "yes"\n', "network.unrestricted", "must be true or false"),
        ('[filesystem]\nread = ["/a:relative"]\n', "filesystem.read", "must be an absolute guest path"),
        ('[filesystem]\nwrite = ["/a:/proc/x"]\n', "filesystem.write", "must not be /proc"),
        ("[filesystem]\nmemory_writable = 1\n", "filesystem.memory_writable", "must be true or false"),
        ('[env]\n"BAD-KEY" = "x"\n', "env", "must match"),
        ("[env]\nN = 1\n", "env", "must be a table of strings"),
        ("filesystem = 3\n", "filesystem", "must be a table"),
        ("not toml at all [", "policy", "is not valid TOML"),
    ],
)
def test_bad_values_name_the_policy_key(toml: str, field: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_toml(toml)
    assert info.value.field == field
    assert fragment in str(info.value)


# --- unknown names and contradictions ---------------------------------------------------------------------


def test_unknown_table_refused_with_its_name() -> None:
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_toml("[netwrok]\nallow = []\n")
    assert info.value.field == "policy"
    assert "unknown table(s) ['netwrok']" in str(info.value)
    assert "known: filesystem, network, limits, env" in str(info.value)


@pytest.mark.parametrize(
    ("toml", "table", "key"),
    [
        ('[network]\nallowed = ["x.com"]\n', "network", "allowed"),
        ("[filesystem]\nreed = []\n", "filesystem", "reed"),
        ('[limits]\nmem = "1G"\n', "limits", "mem"),
    ],
)
def test_unknown_key_refused_with_its_name(toml: str, table: str, key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_toml(toml)
    assert info.value.field == table
    assert f"unknown key(s) ['{key}']" in str(info.value)


def test_allow_and_unrestricted_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        PermissionPolicy.from_toml('[network]\nallow = ["x.com"]\nunrestricted = true\n')
    assert info.value.field == "network"
    assert "either an allow list or unrestricted = true, not both" in str(info.value)


def test_same_target_read_and_write_refused() -> None:
    with pytest.raises(InvalidRequest, match="mounted twice"):
        PermissionPolicy.from_toml('[filesystem]\nread = ["/a"]\nwrite = ["/b:/a"]\n')


# --- mount arguments --------------------------------------------------------------------------------------


def test_mount_arg_src_only() -> None:
    assert parse_mount_arg("/srv/data", FilesystemAccess.READ_ONLY) == FilesystemMount(
        source="/srv/data", target="/srv/data", access=FilesystemAccess.READ_ONLY
    )


def test_mount_arg_src_and_dst() -> None:
    assert parse_mount_arg("/srv/out/:/mnt/out", FilesystemAccess.READ_WRITE) == FilesystemMount(
        source="/srv/out", target="/mnt/out", access=FilesystemAccess.READ_WRITE
    )


def test_mount_arg_relative_source_resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    mount = parse_mount_arg("data", FilesystemAccess.READ_ONLY)
    assert mount.source == str(tmp_path / "data")
    # DST defaults to the resolved source, not to the relative text (which is not a guest path).
    assert mount.target == str(tmp_path / "data")
    assert parse_mount_arg("data:/d", FilesystemAccess.READ_ONLY).source == str(tmp_path / "data")


def test_mount_arg_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    mount = parse_mount_arg("~/notes:/notes", FilesystemAccess.READ_ONLY)
    assert mount.source == os.path.join(str(tmp_path), "notes")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must be SRC or SRC:DST"),
        (":/dst", "needs a host path before ':'"),
        ("/src:", "needs a guest path after ':'"),
        ("/src:dst", "must be an absolute guest path"),
        ("/src:/a/../b", "'..'"),
    ],
)
def test_mount_arg_errors(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_mount_arg(text, FilesystemAccess.READ_ONLY, "--ro")
    assert info.value.field == "--ro"
    assert fragment in str(info.value)


# --- backend.check / refuse_gaps --------------------------------------------------------------------------


class CapsBackend(SandboxBackend):
    """A test double whose only behaviour is its capabilities."""

    name = "caps"

    def __init__(self, **flags: bool) -> None:
        self._caps = SandboxCapabilities(**flags)

    def capabilities(self) -> SandboxCapabilities:
        return self._caps

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        raise NotImplementedError

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        raise NotImplementedError

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        raise NotImplementedError

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        raise NotImplementedError

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        raise NotImplementedError

    async def resume(self, session_id: str) -> SandboxSession:
        raise NotImplementedError

    async def terminate(self, session_id: str) -> None:
        raise NotImplementedError


FULL_CAPS = {name: True for name in SandboxCapabilities.model_fields}


def test_check_lists_gaps_for_a_weak_backend() -> None:
    backend = CapsBackend(**{**FULL_CAPS, "memory_limit": False, "network_policy": False})
    spec = PermissionPolicy.from_toml(FULL_POLICY).to_spec()
    assert backend.check(spec) == [
        SpecGap(
            "network_policy.allowed_hosts",
            "network_policy",
            "caps cannot enforce a per-host egress allowlist",
        ),
        SpecGap("limits.memory_mb", "memory_limit", "caps cannot enforce a memory limit"),
    ]


def test_check_is_empty_for_a_capable_backend() -> None:
    spec = PermissionPolicy.from_toml(FULL_POLICY).to_spec()
    assert CapsBackend(**FULL_CAPS).check(spec) == []


@pytest.mark.parametrize(
    ("spec", "field", "capability"),
    [
        (SandboxSpec(), "network_policy", "network_deny_all"),
        (SandboxSpec(network_policy=NetworkPolicy.unrestricted()), "network_policy", "network_unrestricted"),
        (SandboxSpec(limits=ResourceLimits(pids_max=5)), "limits.pids_max", "pids_limit"),
        (SandboxSpec(limits=ResourceLimits(cpu_count=1)), "limits.cpu_count", "cpu_limit"),
        (
            SandboxSpec(limits=ResourceLimits(idle_timeout=timedelta(minutes=1))),
            "limits.idle_timeout",
            "suspend_on_idle",
        ),
        (SandboxSpec(from_snapshot="snap-1"), "from_snapshot", "snapshot"),
        (SandboxSpec(mounts=(FilesystemMount(target="/a"),)), "mounts", "filesystem_isolation"),
    ],
)
def test_check_one_gap_per_missing_flag(spec: SandboxSpec, field: str, capability: str) -> None:
    backend = CapsBackend(**{**FULL_CAPS, capability: False})
    assert [(g.field, g.capability) for g in backend.check(spec)] == [(field, capability)]
    assert CapsBackend(**FULL_CAPS).check(spec) == []


def test_refuse_gaps_raises_unsupported_naming_the_field() -> None:
    backend = CapsBackend(**{**FULL_CAPS, "memory_limit": False})
    spec = PermissionPolicy(memory="512M").to_spec()
    with pytest.raises(Unsupported) as info:
        backend.refuse_gaps(spec)
    assert info.value.backend == "caps"
    assert info.value.operation == "limits.memory_mb"
    assert "limits.memory_mb" in str(info.value)
    assert "memory limit" in str(info.value)
    CapsBackend(**FULL_CAPS).refuse_gaps(spec)  # no gaps: returns quietly
