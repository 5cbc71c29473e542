"""Pieces of the benchmark runner that need no sandbox: how a session's host pid is found, and how the ray and
gVisor targets are judged (met / not met / not measured) from a run's figures. No thresholds on speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a tool of the repository, not part of the installed package

from bench.scaling import idle_memory, missing_pid_reason, session_pid  # noqa: E402
from bench.targets import evaluate  # noqa: E402

from stockade.models import SandboxSession, SandboxState  # noqa: E402

MB = 1_000_000


def _session(backend: str, **metadata: str) -> SandboxSession:
    return SandboxSession(id="s-1", backend=backend, state=SandboxState.RUNNING, metadata=metadata)


def test_landlock_supervisor_pid_is_the_sessions_pid() -> None:
    assert session_pid(_session("landlock", supervisor_pid="4242", home="/x")) == 4242
    assert session_pid(_session("bwrap", init_pid="17")) == 17


def test_landlock_without_supervisor_pid_is_not_measured_with_the_reason() -> None:
    session = _session("landlock", home="/x", uid="1000")
    assert session_pid(session) is None
    assert "supervisor_pid" in missing_pid_reason(session)
    assert "supervisor_pid" in missing_pid_reason(_session("bwrap"))  # the generic reason names the keys too


def test_idle_memory_of_a_supervisor_counts_its_descendants() -> None:
    # A shell stands in for landlock's supervisor; its child for the session's command.
    supervisor = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while "sleep" not in idle_memory([supervisor.pid], since_ticks=0)["processes_per_session"]:
            assert time.monotonic() < deadline, "the child never appeared"
            time.sleep(0.05)
        memory = idle_memory([supervisor.pid], since_ticks=0)
    finally:
        os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
    assert sorted(memory["processes_per_session"]) == ["sh", "sleep"]
    assert memory["pss_mib"][0] > 0
    assert memory["rss_p50_mib"] >= memory["pss_mib"][0]


def _system(metrics: dict[str, dict[str, Any]], info: dict[str, Any] | None = None,
            skipped: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "backend", "label": "", "available": True, "reason": None, "info": info or {},
            "metrics": metrics, "skipped": skipped or {}}


def _fig(p50: float, **extra: Any) -> dict[str, Any]:
    return {"p50": p50, "p95": p50, "max": p50, **extra}


def _verdicts(systems: dict[str, dict[str, Any]], system: str) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in evaluate(systems) if v["system"] == system}


CLUSTER = {"nodes": {"10.0.0.1": 104, "10.0.0.2": 104}, "node_backend": "bwrap", "ray": "2.60.0",
           "cluster_start_s": 20.0}
PROVISION = "provision through Ray within 100 ms of the node backend's own (warm actors)"
EXEC = "exec round trip overhead <= 3 ms over the node backend"
SPREAD = "200 sessions spread over two nodes by slots"


def test_ray_targets_against_bwrap_in_the_same_run() -> None:
    levels = [{"sessions": 200, "per_node": {"10.0.0.1": 104, "10.0.0.2": 96}}]
    systems = {"bwrap": _system({"provision_ready": _fig(200.0), "exec_true": _fig(9.0)}),
               "ray": _system({"provision_ready": _fig(250.0), "exec_true": _fig(16.0)},
                              {"ray_cluster": CLUSTER, "scaling": levels})}
    verdicts = _verdicts(systems, "ray")
    assert verdicts[PROVISION]["status"] == "met" and verdicts[PROVISION]["measured"].startswith("+50")
    assert verdicts[EXEC]["status"] == "not met" and verdicts[EXEC]["measured"].startswith("+7")
    assert verdicts[SPREAD]["status"] == "met"


def test_ray_spread_not_met_on_one_node_and_not_measured_when_small() -> None:
    one_node = [{"sessions": 200, "per_node": {"10.0.0.1": 200}}]
    systems = {"ray": _system({}, {"ray_cluster": CLUSTER, "scaling": one_node})}
    assert _verdicts(systems, "ray")[SPREAD]["status"] == "not met"
    small = [{"sessions": 3, "per_node": {"10.0.0.1": 1, "10.0.0.2": 2}}]
    systems = {"ray": _system({"exec_true": _fig(16.0)}, {"ray_cluster": CLUSTER, "scaling": small})}
    verdict = _verdicts(systems, "ray")[SPREAD]
    assert verdict["status"] == "not measured" and "3 sessions" in verdict["note"]
    # Without the node backend's own row the overheads cannot be judged: said, not guessed.
    assert _verdicts(systems, "ray")[EXEC]["status"] == "not measured"
    assert "bwrap" in _verdicts(systems, "ray")[EXEC]["note"]


GVISOR = "gVisor checkpoint and restore <= 1 s for a session holding 50 MB"


@pytest.mark.parametrize(("snap", "restore", "status"), [(400.0, 900.0, "met"), (400.0, 1200.0, "not met")])
def test_gvisor_checkpoint_target(snap: float, restore: float, status: str) -> None:
    systems = {"docker-runsc": _system({"memory_snapshot": _fig(snap, bytes=50 * MB),
                                        "memory_restore": _fig(restore, bytes=50 * MB)})}
    assert _verdicts(systems, "docker-runsc")[GVISOR]["status"] == status


def test_gvisor_checkpoint_target_not_measured_when_small_or_failed() -> None:
    small = {"docker-runsc": _system({"memory_snapshot": _fig(100.0, bytes=2 * MB),
                                      "memory_restore": _fig(100.0, bytes=2 * MB)})}
    verdict = _verdicts(small, "docker-runsc")[GVISOR]
    assert verdict["status"] == "not measured" and "2 MB" in verdict["note"]
    failed = {"docker-runsc": _system({}, skipped={"memory_snapshot": "failed: LifecycleError: boom"})}
    verdict = _verdicts(failed, "docker-runsc")[GVISOR]
    assert verdict["status"] == "not measured" and "boom" in verdict["note"]
