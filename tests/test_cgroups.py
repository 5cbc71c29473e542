"""Session cgroups (stockade.linux.cgroups) on the real host, plus layout parsing on synthetic mount tables.

Behavioural tests run on the host's own layout ("host") and, where the host has the pieces, on restricted
views of it: "v1" (v1 hierarchies only, v1 freezer), "v1-nofreezer" (signal-loop kill) and "v2" (the cgroup2
tree only: cgroup.kill / cgroup.freeze). On a hybrid host this exercises all three code paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from stockade.errors import BackendUnavailable, InvalidRequest, LifecycleError
from stockade.linux.cgroups import (
    CgroupLayout,
    CgroupLimits,
    Feature,
    SessionCgroup,
    _parse_mountinfo,
    detect_layout,
    reap_stale,
)

PARENT = "stockade-test"
MiB = 1 << 20


def _host_layout_or_skip() -> CgroupLayout:
    if os.geteuid() != 0:
        pytest.skip("needs root: session cgroups are made under the cgroup mount roots")
    layout = detect_layout()
    if layout.kind == "none":
        pytest.skip("needs a mounted cgroup filesystem (none in /proc/self/mountinfo)")
    return layout


def _variant(kind: str) -> CgroupLayout:
    host = _host_layout_or_skip()
    if kind == "host":
        return host
    if kind in ("v1", "v1-nofreezer"):
        if not (host.v1_writable and "freezer" in host.v1_roots):
            pytest.skip("needs a writable cgroup v1 freezer hierarchy")
        roots = dict(host.v1_roots)
        if kind == "v1-nofreezer":
            del roots["freezer"]
        return replace(
            host,
            kind="v1",
            v2_root=None,
            v2_base=None,
            v2_controllers=frozenset(),
            v2_features=frozenset(),
            v1_roots=MappingProxyType(roots),
        )
    if kind == "v2":
        if host.v2_base is None or not {"kill", "freeze"} <= host.v2_features:
            pytest.skip("needs a writable cgroup v2 tree with cgroup.kill and cgroup.freeze")
        return replace(host, kind="v2", v1_roots=MappingProxyType({}), v1_writable=False)
    raise AssertionError(kind)


def _unique() -> str:
    return f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"


class Maker:
    """Creates session cgroups and processes, and cleans both up whatever the test did."""

    def __init__(self) -> None:
        self.cgroups: list[SessionCgroup] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def cgroup(
        self, limits: CgroupLimits | None = None, layout: CgroupLayout | None = None, name: str | None = None
    ) -> SessionCgroup:
        cg = SessionCgroup.create(name or _unique(), limits or CgroupLimits(), layout=layout, parent=PARENT)
        self.cgroups.append(cg)
        return cg

    def spawn(self, cg: SessionCgroup, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, preexec_fn=cg.preexec_join(), close_fds=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def close(self) -> None:
        for cg in self.cgroups:
            cg.destroy()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _remove_test_parent() -> Iterator[None]:
    yield
    if os.geteuid() != 0:
        return
    layout = detect_layout()
    roots = {layout.v2_base, *layout.v1_roots.values()} - {None}
    for root in roots:
        assert root is not None
        # Fails (ENOTEMPTY/EBUSY) while a concurrent run still has sessions there, which is fine.
        with contextlib.suppress(OSError):
            (root / PARENT).rmdir()


@pytest.fixture
def maker() -> Iterator[Maker]:
    _host_layout_or_skip()
    m = Maker()
    try:
        yield m
    finally:
        m.close()


def _py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its (late-reaping) new parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ------------------------------------------------------------------------------------------ layout parsing

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_parse_mountinfo_hybrid_with_comounted_and_named_hierarchies() -> None:
    v2, v1 = _parse_mountinfo(HYBRID_MOUNTINFO)
    assert v2 == Path("/sys/fs/cgroup/unified")
    assert v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "freezer": Path("/sys/fs/cgroup/freezer"),
    }  # name=systemd carries no controller


def test_parse_mountinfo_pure_v2_and_escaped_mount_point() -> None:
    text = "29 23 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    assert _parse_mountinfo(text) == (Path("/sys/fs/my cgroup"), {})


def _fake_tree(tmp_path: Path, mountinfo_lines: list[tuple[str, str, str]], controllers: str = "") -> str:
    lines = []
    for i, (rel, fstype, opts) in enumerate(mountinfo_lines):
        d = tmp_path / rel
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
        if fstype == "cgroup2":
            (d / "cgroup.controllers").write_text(controllers + "\n")
            (d / "cgroup.subtree_control").write_text("")
        lines.append(f"{40 + i} 31 0:{40 + i} / {d} rw,relatime - {fstype} {fstype} {opts}")
    return "\n".join(lines) + "\n"


def test_detect_layout_pure_v2(tmp_path: Path) -> None:
    text = _fake_tree(tmp_path, [("cg2", "cgroup2", "rw")], controllers="cpuset cpu io memory pids")
    layout = detect_layout(mountinfo=text, proc_cgroup="0::/\n")
    assert layout.kind == "v2"
    assert layout.v2_root == tmp_path / "cg2"
    assert layout.v2_controllers == {"cpuset", "cpu", "io", "memory", "pids"}
    if os.access(tmp_path, os.W_OK):
        assert layout.supports("memory") and layout.supports("pids") and layout.supports("cpu")
        assert layout.home("memory") == "v2"


def test_detect_layout_pure_v1(tmp_path: Path) -> None:
    text = _fake_tree(tmp_path, [("memory", "cgroup", "rw,memory"), ("pids", "cgroup", "rw,pids")])
    layout = detect_layout(mountinfo=text, proc_cgroup="4:memory:/\n")
    assert layout.kind == "v1"
    assert layout.v2_root is None
    assert set(layout.v1_roots) == {"memory", "pids"}
    # Refusal: no cpu hierarchy, no freezer and no cgroup.kill mean no cpu limit and no reliable freeze.
    assert not layout.supports("cpu")
    assert not layout.supports("freeze")
    assert not layout.supports("kill")
    # Admission sibling: what is mounted (and writable) is supported.
    if os.access(tmp_path, os.W_OK):
        assert layout.supports("memory") and layout.supports("pids")


def test_detect_layout_none_refuses_and_describes() -> None:
    layout = detect_layout(mountinfo="22 1 0:5 / /proc rw - proc proc rw\n", proc_cgroup="")
    assert layout.kind == "none"
    assert not any(layout.supports(f) for f in ("memory", "pids", "cpu", "freeze", "kill"))
    assert "none" in layout.describe()


def test_detect_layout_matches_this_host() -> None:
    layout = detect_layout()
    fstypes = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fstype = line.partition(" - ")[2].split()[0]
        if fstype in ("cgroup", "cgroup2") and line.split()[4] in {
            str(layout.v2_root),
            *map(str, layout.v1_roots.values()),
        }:
            fstypes.add(fstype)
    expected = {frozenset(): "none", frozenset({"cgroup"}): "v1", frozenset({"cgroup2"}): "v2"}.get(
        frozenset(fstypes), "hybrid"
    )
    assert layout.kind == expected
    assert "\n" not in layout.describe()
    assert layout.kind in layout.describe()


def test_detect_layout_hybrid_host_supports_everything() -> None:
    layout = _host_layout_or_skip()
    if layout.kind != "hybrid":
        pytest.skip(f"this host's cgroup layout is {layout.kind}, not hybrid")
    # The project's machines: v1 memory/pids/cpu/freezer plus a controller-less v2 tree with kill/freeze.
    features: tuple[Feature, ...] = ("memory", "pids", "cpu", "freeze", "kill")
    for feature in features:
        assert layout.supports(feature), (feature, layout.describe())
    assert layout.home("memory") == "v1"
    assert {"kill", "freeze"} <= layout.v2_features


# ---------------------------------------------------------------------------------- create / refuse / destroy


def test_create_and_destroy_leaves_no_directory(maker: Maker) -> None:
    cg = maker.cgroup(CgroupLimits(memory_bytes=64 * MiB, pids_max=64, cpu_quota=0.5))
    assert cg.paths and all(p.is_dir() for p in cg.paths)
    cg.destroy()
    assert not any(p.exists() for p in cg.paths)
    cg.destroy()  # idempotent


def test_limits_are_written(maker: Maker) -> None:
    cg = maker.cgroup(CgroupLimits(memory_bytes=64 * MiB, pids_max=33, cpu_quota=0.5))
    d = {p.name: p for p in cg.paths}
    files = {f.name: f for p in cg.paths for f in p.iterdir()}
    assert d  # every hierarchy has the session dir
    if "memory.limit_in_bytes" in files:
        assert int(files["memory.limit_in_bytes"].read_text()) == 64 * MiB
        if "memory.memsw.limit_in_bytes" in files:
            assert int(files["memory.memsw.limit_in_bytes"].read_text()) == 64 * MiB
    else:
        assert int(files["memory.max"].read_text()) == 64 * MiB
        if "memory.swap.max" in files:
            assert files["memory.swap.max"].read_text().strip() == "0"
        assert files["memory.oom.group"].read_text().strip() == "0"
    assert files["pids.max"].read_text().strip() == "33"
    if "cpu.cfs_quota_us" in files:
        assert files["cpu.cfs_period_us"].read_text().strip() == "100000"
        assert files["cpu.cfs_quota_us"].read_text().strip() == "50000"
    else:
        assert files["cpu.max"].read_text().split() == ["50000", "100000"]


def test_unenforceable_limit_is_refused_without_leftovers(maker: Maker) -> None:
    layout = _variant("v2")
    if "memory" in layout.v2_controllers:
        pytest.skip("the v2 tree here has the memory controller, so nothing to refuse")
    name = _unique()
    with pytest.raises(BackendUnavailable, match="memory"):
        SessionCgroup.create(name, CgroupLimits(memory_bytes=64 * MiB), layout=layout, parent=PARENT)
    assert layout.v2_base is not None
    assert not (layout.v2_base / PARENT / name).exists()


def test_enforceable_limit_on_same_layout_is_admitted(maker: Maker) -> None:
    layout = _variant("v2")
    cg = maker.cgroup(CgroupLimits(), layout=layout)  # no limit asked: kill/freeze-only session
    assert cg.v2_dir is not None and cg.v2_dir.is_dir()


def test_no_cgroups_at_all_is_refused() -> None:
    layout = detect_layout(mountinfo="", proc_cgroup="")
    with pytest.raises(BackendUnavailable, match="no cgroup"):
        SessionCgroup.create(_unique(), CgroupLimits(), layout=layout, parent=PARENT)


def test_host_layout_admits_all_limits(maker: Maker) -> None:
    layout = _variant("host")
    wanted = CgroupLimits(
        memory_bytes=64 * MiB if layout.supports("memory") else None,
        pids_max=50 if layout.supports("pids") else None,
        cpu_quota=1.0 if layout.supports("cpu") else None,
    )
    assert maker.cgroup(wanted).paths


def test_existing_cgroup_is_not_adopted(maker: Maker) -> None:
    first = maker.cgroup()
    with pytest.raises(LifecycleError, match="already exists"):
        SessionCgroup.create(first.name, CgroupLimits(), parent=PARENT)
    # The refused create must not have removed the directories of the one that exists.
    assert all(p.is_dir() for p in first.paths)


def test_distinct_name_is_admitted(maker: Maker) -> None:
    a, b = maker.cgroup(), maker.cgroup()
    assert set(a.paths).isdisjoint(b.paths)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "-x", ".hidden", "x" * 129, "a b"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        SessionCgroup.create(bad, CgroupLimits(), layout=detect_layout(mountinfo="", proc_cgroup=""))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        CgroupLimits(memory_bytes=0)
    with pytest.raises(InvalidRequest):
        CgroupLimits(pids_max=0)
    with pytest.raises(InvalidRequest):
        CgroupLimits(cpu_quota=float("nan"))
    assert CgroupLimits(memory_bytes=4096, pids_max=1, cpu_quota=0.01).wanted() == ["memory", "pids", "cpu"]


# --------------------------------------------------------------------------------------------- memory / pids

ALLOC = "import sys; data = b'x' * (int(sys.argv[1]) << 20); print(len(data))"


def test_memory_limit_oom_kills_a_greedy_child(maker: Maker) -> None:
    if not _variant("host").supports("memory"):
        pytest.skip("no usable memory controller")
    cg = maker.cgroup(CgroupLimits(memory_bytes=64 * MiB))
    proc = maker.spawn(cg, _py(ALLOC, "256"), stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == -9
    assert cg.oom_kills() >= 1
    peak = cg.memory_peak()
    assert peak is None or peak <= 64 * MiB + 4096


def test_memory_limit_admits_a_modest_child(maker: Maker) -> None:
    if not _variant("host").supports("memory"):
        pytest.skip("no usable memory controller")
    cg = maker.cgroup(CgroupLimits(memory_bytes=64 * MiB))
    proc = maker.spawn(cg, _py(ALLOC, "16"), stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert int(out) == 16 * MiB
    assert cg.oom_kills() == 0
    peak = cg.memory_peak()
    assert peak is None or peak >= 16 * MiB


FORKS = """
import os, signal, sys
kids = []
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
print(len(kids), flush=True)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


def _forks(maker: Maker, pids_max: int, attempts: int) -> int:
    if not _variant("host").supports("pids"):
        pytest.skip("no usable pids controller")
    cg = maker.cgroup(CgroupLimits(pids_max=pids_max))
    proc = maker.spawn(cg, _py(FORKS, str(attempts)), stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return int(out)


def test_pids_limit_stops_a_fork_loop(maker: Maker) -> None:
    forked = _forks(maker, pids_max=20, attempts=50)
    assert forked + 1 <= 20  # the forking parent counts too


def test_pids_limit_admits_forks_below_it(maker: Maker) -> None:
    assert _forks(maker, pids_max=200, attempts=50) == 50


# ----------------------------------------------------------------------------------- kill / freeze / reattach

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        while True:
            time.sleep(1)
    os._exit(0)
os.wait()
"""


@pytest.mark.parametrize("variant", ["host", "v1", "v1-nofreezer", "v2"])
def test_kill_ends_a_double_forked_daemon(maker: Maker, tmp_path: Path, variant: str) -> None:
    cg = maker.cgroup(layout=_variant(variant))
    pidfile = tmp_path / "daemon.pid"
    launcher = maker.spawn(cg, _py(DAEMON, str(pidfile)))
    assert launcher.wait(timeout=30) == 0
    assert _wait_for(pidfile.exists)
    daemon = int(pidfile.read_text())
    assert not _gone(daemon)
    assert daemon in cg.pids()  # escaped the launcher's tree, not the cgroup
    cg.kill()
    assert cg.pids() == set()
    assert _gone(daemon)


def test_kill_of_an_empty_cgroup_returns(maker: Maker) -> None:
    cg = maker.cgroup()
    cg.kill()
    assert cg.pids() == set()


COUNTER = """
import os, sys, time
n = 0
while True:
    n += 1
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.005)
"""


def _count(path: Path) -> int:
    return int(path.read_text())


@pytest.mark.parametrize("variant", ["host", "v1", "v2"])
def test_freeze_stops_and_thaw_resumes(maker: Maker, tmp_path: Path, variant: str) -> None:
    layout = _variant(variant)
    if not layout.supports("freeze"):
        pytest.skip("no cgroup freezer (neither cgroup.freeze nor the v1 freezer)")
    cg = maker.cgroup(layout=layout)
    counter = tmp_path / "count"
    maker.spawn(cg, _py(COUNTER, str(counter)))
    assert _wait_for(lambda: counter.exists() and _count(counter) > 3)
    cg.freeze()
    assert cg.frozen()
    before = _count(counter)
    time.sleep(0.3)
    assert _count(counter) == before  # refused: no progress while frozen
    cg.thaw()
    assert not cg.frozen()
    assert _wait_for(lambda: _count(counter) > before + 3)  # admitted again after thaw


def test_freeze_without_freezer_is_refused(maker: Maker) -> None:
    cg = maker.cgroup(layout=_variant("v1-nofreezer"))
    with pytest.raises(LifecycleError, match="no freezer"):
        cg.freeze()
    assert not cg.frozen()


@pytest.mark.parametrize("variant", ["host", "v1", "v2"])
def test_from_json_reattaches_and_kills(maker: Maker, variant: str) -> None:
    cg = maker.cgroup(
        CgroupLimits(pids_max=100) if variant != "v2" else CgroupLimits(), layout=_variant(variant)
    )
    proc = maker.spawn(cg, ["sleep", "60"])
    state = json.loads(json.dumps(cg.to_json()))
    again = SessionCgroup.from_json(state)
    assert again.paths == cg.paths
    assert again.limits == cg.limits
    assert proc.pid in again.pids()
    again.kill()
    assert proc.wait(timeout=10) == -9
    again.destroy()
    assert not any(p.exists() for p in cg.paths)


def test_from_json_refuses_paths_outside_its_cgroup(maker: Maker) -> None:
    cg = maker.cgroup()
    state = cg.to_json()
    bad_v2 = dict(state, v2="/sys/fs/cgroup/unified/system.slice")
    bad_v1 = dict(state, v1={"memory": "/tmp/stockade-test/" + cg.name})
    for tampered in (bad_v2, bad_v1):
        with pytest.raises(InvalidRequest):
            SessionCgroup.from_json(tampered)
    assert SessionCgroup.from_json(state).paths == cg.paths  # the genuine record is admitted


def test_preexec_join_places_the_child_from_its_start(maker: Maker) -> None:
    cg = maker.cgroup()
    proc = maker.spawn(cg, ["sleep", "60"])
    assert proc.pid in cg.pids()
    membership = Path(f"/proc/{proc.pid}/cgroup").read_text()
    inside = [line for line in membership.splitlines() if line.endswith(f"/{PARENT}/{cg.name}")]
    assert len(inside) == len(cg.paths), membership  # one line per hierarchy the session uses
    assert os.getpid() not in cg.pids()


def test_add_pid_moves_a_running_process(maker: Maker) -> None:
    cg = maker.cgroup()
    proc = subprocess.Popen(["sleep", "60"])
    maker.procs.append(proc)
    assert proc.pid not in cg.pids()
    cg.add_pid(proc.pid)
    assert proc.pid in cg.pids()
    cg.kill()
    assert proc.wait(timeout=10) == -9


def test_add_pid_of_a_missing_process_is_refused(maker: Maker) -> None:
    cg = maker.cgroup()
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(LifecycleError):
        cg.add_pid(proc.pid)


def test_reap_stale_removes_only_what_keep_rejects(maker: Maker) -> None:
    stale, live = maker.cgroup(), maker.cgroup()
    proc = maker.spawn(stale, ["sleep", "60"])
    reaped = reap_stale(PARENT, keep=lambda name: name != stale.name)
    assert reaped == [stale.name]
    assert proc.wait(timeout=10) == -9
    assert not any(p.exists() for p in stale.paths)
    assert all(p.is_dir() for p in live.paths)  # kept
