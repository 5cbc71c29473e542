"""The conformance suite on bwrap run by an unprivileged user, through ``stockade doctor`` as that user.

Run as root, the test switches to uid/gid 65534 with ``setpriv`` (no capabilities, no groups); run as any other
user, it runs as that user. The unprivileged process gets its own HOME and XDG_STATE_HOME (so the backend's
default state root is exercised) and its own copy of stockade and its dependencies: the test interpreter's
packages may sit under a directory others cannot enter (``/root``). Every case must be measured and pass; where
a capability is reported false (cgroup limits without a writable or delegated hierarchy), the case checks that
the backend refuses with ``Unsupported``, and this test checks that the user really cannot create a cgroup.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import stockade
from stockade.backends.bwrap import probe
from stockade.backends.bwrap._network import find_tool
from stockade.conformance import list_cases

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"bwrap backend unavailable: {REASON}")
ROOT = os.geteuid() == 0
NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]
PASSING = {"conforms", "not_applicable"}


@dataclass(frozen=True)
class Unprivileged:
    """How to run a command as the unprivileged user, and the directories it owns."""

    prefix: tuple[str, ...]
    python: str
    env: dict[str, str]
    home: Path
    uid: int

    def run(self, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=str(self.home), check=False)

    def python_script(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", script, *args)


def _requirement_names() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0] for dep in deps]


def _install_stockade(site: Path) -> None:
    """This checkout's package plus the metadata an install would write (backends are found by entry point)."""
    shutil.copytree(Path(stockade.__file__).parent, site / "stockade", ignore=shutil.ignore_patterns("__pycache__"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / f"stockade-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: stockade\nVersion: {project['version']}\n")
    groups = [f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
              for group, entries in project.get("entry-points", {}).items()]
    (info / "entry_points.txt").write_text("\n".join(groups))


def _copy_packages(site: Path) -> None:
    """stockade (this checkout) and the installed distributions it needs, transitively, into ``site``."""
    _install_stockade(site)
    todo, seen = _requirement_names(), set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement for another Python version (e.g. exceptiongroup)
        for file in dist.files or []:
            if ".." in file.parts or "__pycache__" in file.parts:
                continue
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, site / file)
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[<>=!~;\[ (]", requirement, maxsplit=1)[0])


def _interpreter(prefix: tuple[str, ...], env: dict[str, str], home: Path) -> str | None:
    """An interpreter of this test's Python version that the unprivileged user can start."""
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The interpreter must also reach its own files: started from a directory the user cannot enter, CPython
    # falls back to another installation's standard library.
    check = ("import os, sys, pydantic_core, anyio; assert os.access(sys.executable, os.X_OK); "
             "print('%d.%d' % sys.version_info[:2])")
    for candidate in (f"/usr/bin/python{wanted}", "/usr/bin/python3", sys.executable):
        probe_run = subprocess.run(
            [*prefix, candidate, "-c", check],
            capture_output=True, text=True, timeout=60, env=env, cwd=str(home), check=False,
        )
        if probe_run.returncode == 0 and probe_run.stdout.strip() == wanted:
            return candidate
    return None


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[Unprivileged]:
    if ROOT and shutil.which("setpriv") is None:
        pytest.skip("switching to an unprivileged user needs setpriv (Debian util-linux)")
    # pytest's tmp_path sits in a 0700 directory of root's: use one the user can reach.
    base = Path(tempfile.mkdtemp(prefix="stockade-unpriv-conformance-"))
    os.chmod(base, 0o755)
    home, site = base / "home", base / "site"
    home.mkdir()
    _copy_packages(site)
    uid = NOBODY if ROOT else os.geteuid()
    if ROOT:
        os.chown(home, NOBODY, NOBODY)
    prefix: tuple[str, ...] = (
        ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--") if ROOT else ()
    )
    env = {
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    python = _interpreter(prefix, env, home)
    try:
        if python is None:
            pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} interpreter that uid {uid} "
                        f"can start ({sys.executable} is not reachable and /usr/bin has none of that version)")
        yield Unprivileged(prefix, python, env, home, uid)
    finally:
        _reap_leftovers(home / "state" / "stockade")
        shutil.rmtree(base, ignore_errors=True)


def _reap_leftovers(state: Path) -> None:
    # Cases terminate their sessions; should one have failed to, do not leave its sandbox running.
    for record_file in state.glob("sessions/*/state.json"):
        try:
            record = json.loads(record_file.read_text())
            os.killpg(int(record["bwrap_pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def test_conformance_suite_passes_unprivileged_with_every_case_measured(unprivileged: Unprivileged) -> None:
    doctor = unprivileged.run(unprivileged.python, "-m", "stockade.cli", "doctor", "--backend", "bwrap", "--json")
    assert doctor.stdout, doctor.stderr
    [report] = json.loads(doctor.stdout)
    assert report["host"]["euid"] == unprivileged.uid and report["host"]["uid"] == unprivileged.uid
    verdicts = {case["case"]: case["verdict"] for case in report["cases"]}
    # The case list of the very copy the user ran (the checkout may have changed since this module imported).
    listed = unprivileged.python_script("import json; from stockade.conformance import list_cases; "
                                        "print(json.dumps(list_cases()))")
    assert listed.returncode == 0, listed.stderr
    assert sorted(verdicts) == sorted(json.loads(listed.stdout)), "the unprivileged run did not run every case"
    assert set(list_cases()) <= set(verdicts)
    bad = {case["case"]: f"{case['verdict']}: {case['detail']}" for case in report["cases"]
           if case["verdict"] not in PASSING}
    assert bad == {}, json.dumps(bad, indent=2)
    if find_tool("nft") and find_tool("ip"):
        # Egress through the gateway works unprivileged too (set up from inside the user's own namespace).
        egress = [c for c in verdicts if c.startswith("network.") and c not in ("network.deny_all_refused",)]
        assert {c: verdicts[c] for c in egress} == {c: "conforms" for c in egress}
    assert doctor.returncode == 0, doctor.stderr
    assert not list((unprivileged.home / "state" / "stockade" / "sessions").iterdir()), "sessions were left behind"


_CGROUP_PROBE = textwrap.dedent("""
    import json, os, secrets, sys
    from stockade.backends.bwrap import BwrapBackend
    from stockade.linux import cgroups
    layout = cgroups.detect_layout()
    roots = [r for r in [layout.v2_root, *layout.v1_roots.values()] if r is not None]
    created = []
    for root in roots:
        path = os.path.join(str(root), "stockade-probe-" + secrets.token_hex(4))
        try:
            os.mkdir(path)
        except OSError:
            continue
        created.append(str(root))
        os.rmdir(path)
    caps = BwrapBackend(os.environ["XDG_STATE_HOME"] + "/caps").capabilities().to_json()
    print(json.dumps({"caps": caps, "cgroup_roots_writable": created, "roots": [str(r) for r in roots]}))
""")


def test_capabilities_reported_unprivileged_are_honest(unprivileged: Unprivileged) -> None:
    result = unprivileged.python_script(_CGROUP_PROBE)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    caps = out["caps"]
    assert out["roots"], "no cgroup hierarchy was found to probe"
    # Limits are claimed exactly when the user can make a cgroup of its own (false here unless delegated).
    writable = bool(out["cgroup_roots_writable"])
    assert caps["resource_limits"] is writable
    if not writable:
        assert not (caps["memory_limit"] or caps["pids_limit"] or caps["cpu_limit"] or caps["snapshot"])
    assert caps["live_mounts"] and caps["filesystem_isolation"] and caps["network_deny_all"]
    egress = bool(find_tool("nft") and find_tool("ip"))
    assert caps["network_policy"] is egress and caps["egress_log"] is egress


_LIVE_MOUNTS = textwrap.dedent("""
    import anyio, json, os, sys
    from stockade import ExecRequest, FilesystemMount, SandboxSpec
    from stockade.backends.bwrap import BwrapBackend
    ro, rw = sys.argv[1], sys.argv[2]
    async def sh(b, sid, script):
        r = await b.exec(sid, ExecRequest(command="sh", args=("-c", script)))
        return r.stdout
    async def main():
        b = BwrapBackend(os.environ["XDG_STATE_HOME"] + "/live")
        s = await b.provision(SandboxSpec())
        try:
            await b.attach_filesystem(s.id, FilesystemMount(source=ro, target="/mnt/ro"))
            await b.attach_filesystem(s.id, FilesystemMount(source=rw, target="/mnt/rw", access="read_write"))
            out = {
                "read": await sh(b, s.id, "cat /mnt/ro/keep"),
                "attack": await sh(b, s.id, "echo x > /mnt/ro/keep; echo x > /mnt/ro/new; rm -f /mnt/ro/keep; "
                                            "mount -o remount,rw /mnt/ro; echo x > /mnt/ro/keep && echo WROTE; "
                                            "echo done"),
                "write": await sh(b, s.id, "echo admitted > /mnt/rw/new && echo ok"),
                "mountinfo": await sh(b, s.id, "grep ' /mnt/r[ow] ' /proc/self/mountinfo"),
            }
        finally:
            await b.terminate(s.id)
        out["left"] = len(b.store.ids())
        print(json.dumps(out))
    anyio.run(main)
""")


def test_live_mounts_work_unprivileged(unprivileged: Unprivileged) -> None:
    ro, rw = unprivileged.home / "ro", unprivileged.home / "rw"
    ro.mkdir()
    rw.mkdir()
    text = f"canary-{secrets.token_hex(8)}"
    (ro / "keep").write_text(text)
    os.chmod(ro / "keep", 0o644)
    if ROOT:  # the guest runs as the unprivileged user on the host: its rw directory must be its own
        os.chown(rw, NOBODY, NOBODY)
    result = unprivileged.python_script(_LIVE_MOUNTS, str(ro), str(rw))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["read"] == text
    assert out["attack"].strip().endswith("done") and "WROTE" not in out["attack"]
    assert (ro / "keep").read_text() == text and sorted(p.name for p in ro.iterdir()) == ["keep"]
    assert out["write"] == "ok\n" and (rw / "new").read_text() == "admitted\n"
    options = {line.split()[4]: line.split()[5].split(",") for line in out["mountinfo"].splitlines()}
    assert "ro" in options["/mnt/ro"] and "rw" in options["/mnt/rw"]
    assert out["left"] == 0
