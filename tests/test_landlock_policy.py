"""The Landlock binding and the landlock backend's pure lowering (ruleset, seccomp families, env, paths)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from stockade.backends.landlock._policy import (
    MountPlan,
    SessionPaths,
    guest_env,
    resolve_cwd,
    seccomp_network,
    session_ruleset,
    translate,
)
from stockade.errors import BackendUnavailable, InvalidRequest, Unsupported
from stockade.linux import landlock
from stockade.models import FilesystemAccess

ABI = landlock.abi_version()
RW, RO = FilesystemAccess.READ_WRITE, FilesystemAccess.READ_ONLY
PATHS = SessionPaths(
    "/s/root",
    "/s/root/home",
    "/s/root/tmp",
    (
        MountPlan("/mnt/memory", "/s/root/memory", RO, True),
        MountPlan("/mnt/session/outputs", "/s/root/outputs", RW, True),
        MountPlan("/mnt/data", "/srv/data", RO),
        MountPlan("/mnt/data/deep", "/srv/deep", RW),
    ),
)


def test_ruleset_grants_exactly_the_session_and_takes_one_optional_gateway_port() -> None:
    ruleset = session_ruleset(PATHS)
    grants = {g.path: g.access for g in ruleset.paths}
    assert grants["/s/root/home"] == grants["/s/root/tmp"] == grants["/s/root/outputs"] == landlock.READ_WRITE
    assert grants["/srv/deep"] == landlock.READ_WRITE
    assert grants["/srv/data"] == grants["/s/root/memory"] == grants["/s/root"] == landlock.READ_ONLY
    assert grants["/usr"] == landlock.READ_ONLY and not grants["/usr"] & landlock.FsAccess.WRITE_FILE
    assert not any(p.startswith(("/home", "/root", "/var", "/tmp", "/etc/passwd", "/etc/shadow")) for p in grants)
    assert ruleset.tcp_connect_ports == () and ruleset.tcp_bind_ports == () and ruleset.restrict_tcp
    assert seccomp_network() == "pair"
    limited = session_ruleset(PATHS, connect_port=3128)
    assert limited.tcp_connect_ports == (3128,) and limited.tcp_bind_ports == ()
    assert seccomp_network(3128) == "inet_tcp"  # UDP, raw and the rest stay refused


def test_what_each_abi_enforces() -> None:
    assert landlock.FsAccess.REFER not in landlock.handled_fs(1)
    assert landlock.FsAccess.REFER in landlock.handled_fs(2)
    assert landlock.FsAccess.TRUNCATE in landlock.handled_fs(3)
    assert landlock.FsAccess.IOCTL_DEV in landlock.handled_fs(5)
    assert landlock.FsAccess.RESOLVE_UNIX not in landlock.handled_fs(8)
    assert landlock.FsAccess.RESOLVE_UNIX in landlock.handled_fs(9)
    assert not landlock.handled_net(3) and landlock.handled_net(4)
    assert not landlock.available_scopes(5) and landlock.available_scopes(6) == (
        landlock.Scope.SIGNAL | landlock.Scope.ABSTRACT_UNIX_SOCKET)
    old = landlock.plan(session_ruleset(PATHS), abi=2).enforcement
    assert any("truncate" in g for g in old.gaps) and any("ABI < 6" in g for g in old.gaps)
    new = landlock.plan(session_ruleset(PATHS), abi=9).enforcement
    assert not any("pathname unix" in g for g in new.gaps) and any("chmod" in g for g in new.gaps)
    assert new.net == landlock.NetAccess.BIND_TCP | landlock.NetAccess.CONNECT_TCP
    # A gateway port cannot be enforced below ABI 4: refused, never silently dropped.
    with pytest.raises(Unsupported, match="ABI 3"):
        landlock.plan(session_ruleset(PATHS, connect_port=3128), abi=3)
    with pytest.raises(BackendUnavailable):
        landlock.plan(session_ruleset(PATHS), abi=0)


def test_bad_rulesets_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest):
        landlock.Ruleset(paths=(), tcp_connect_ports=(70000,))
    with pytest.raises(InvalidRequest):
        landlock.Ruleset(paths=(landlock.PathGrant("relative", landlock.READ_ONLY),))
    if ABI >= 1:
        with pytest.raises(InvalidRequest, match="does not exist"):
            landlock.create_ruleset(landlock.Ruleset(paths=(landlock.PathGrant("/no/such/path", landlock.READ_ONLY),)))
        fd, _ = landlock.create_ruleset(landlock.Ruleset(paths=landlock.grants(["/no/such"], landlock.READ_ONLY,
                                                                               optional=True)))
        os.close(fd)


def test_guest_paths_translate_to_host_paths() -> None:
    mounts = PATHS.mounts
    assert translate("/mnt/data/x/y", mounts) == "/srv/data/x/y"
    assert translate("/mnt/data/deep/z", mounts) == "/srv/deep/z"  # the longest target wins
    assert translate("/mnt/data2/x", mounts) == "/mnt/data2/x"  # a prefix that is not a path component
    assert translate("/mnt/session/outputs", mounts) == "/s/root/outputs"
    assert resolve_cwd(None, PATHS) == "/s/root/home"
    assert resolve_cwd("work/../src", PATHS) == "/s/root/home/src"
    assert resolve_cwd("/mnt/memory", PATHS) == "/s/root/memory"
    assert resolve_cwd("/tmp", PATHS) == "/tmp"  # not a mount: left alone (and not writable)


def test_guest_env_is_built_only_from_declared_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_POLICY_CANARY", "host-value")
    env = guest_env(PATHS, {"A": "spec", "D": "/mnt/data/f", "R": "relative/mnt/data"}, {"A": "request"})
    assert "STOCKADE_POLICY_CANARY" not in env
    assert env["A"] == "request" and env["D"] == "/srv/data/f" and env["R"] == "relative/mnt/data"
    assert env["HOME"] == "/s/root/home" and env["TMPDIR"] == "/s/root/tmp"
    assert env["STOCKADE_OUTPUTS_DIR"] == env["HARN_OUTPUTS_DIR"] == "/s/root/outputs"
    assert env["STOCKADE_MEMORY_DIR"] == env["HARN_MEMORY_DIR"] == "/s/root/memory"


@pytest.mark.skipif(ABI < 4, reason=f"TCP port rules need Landlock ABI 4 (this kernel has {ABI})")
def test_one_allowed_connect_port_is_reachable_and_no_other() -> None:
    """The building block of a future ``limited`` policy: connect to the gateway's port only."""
    allowed, other = socket.socket(), socket.socket()
    for s in (allowed, other):
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        s.settimeout(0.2)
    ruleset = landlock.Ruleset(paths=landlock.grants(["/usr", "/lib", "/lib64"], landlock.READ_ONLY, optional=True),
                               tcp_connect_ports=(allowed.getsockname()[1],))
    fd, enforcement = landlock.create_ruleset(ruleset)
    assert landlock.NetAccess.CONNECT_TCP in enforcement.net
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            landlock.restrict_self(fd)
            words = []
            for target in (allowed, other):
                c = socket.socket()
                words.append(str(c.connect_ex(target.getsockname())))
                c.close()
            try:
                tempfile.TemporaryFile().close()
                words.append("fs-open")
            except OSError:
                words.append("fs-refused")  # the filesystem is confined too: /tmp is not granted
            os.write(read_w, " ".join(words).encode())
        finally:
            os._exit(0)
    os.close(fd)
    os.close(read_w)
    os.waitpid(pid, 0)
    answer = os.read(read_r, 200).decode().split()
    os.close(read_r)
    try:
        assert answer == ["0", "13", "fs-refused"]  # allowed port connects, the other gets EACCES
        allowed.accept()[0].close()  # and the allowed connect really arrived
        with pytest.raises(TimeoutError):
            other.accept()
    finally:
        allowed.close()
        other.close()


def test_landlock_is_active_on_this_machine() -> None:
    if Path("/sys/kernel/security/lsm").exists() and "landlock" not in Path("/sys/kernel/security/lsm").read_text():
        assert ABI == 0
    else:
        assert ABI >= 1
