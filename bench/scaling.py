"""The scaling curve: N sessions at once (1, 10, 50, 200), and the host memory of each idle session.

Per level: provision N sessions concurrently (each until its first ``true``), run ``true`` in all of them at
once for a few rounds, let them sit idle, measure the memory of every session's processes (``procmem``), then
terminate all of them concurrently. The largest level gives the backend's ``idle_memory`` figure and its
sessions per GiB.
"""

from __future__ import annotations

import http.client
import os
import statistics
import time
from collections import Counter
from typing import Any

import anyio

from stockade import SandboxSpec
from stockade.backend import SandboxBackend
from stockade.models import SandboxSession

from .backends import TRUE, Sessions
from .config import RunConfig
from .peers.dockerapi import DockerAPI
from .procmem import (
    boot_ticks_now,
    cgroup_memory_bytes,
    mem_available_kib,
    process_memory,
    session_processes,
)
from .results import SystemResult
from .stats import ms, summarise

__all__ = ["idle_memory", "missing_pid_reason", "scaling_curve", "session_pid"]

# bwrap: init_pid (ray passes its node backend's through); landlock: supervisor_pid, the session's supervisor,
# whose descendants are the session's processes.
PID_KEYS = ("init_pid", "supervisor_pid", "pid", "container_pid")


def session_pid(session: SandboxSession) -> int | None:
    """A host pid of the session, from the metadata keys backends use for it, or from the container it names
    (resolved through the engine at ``DOCKER_HOST``, a unix socket)."""
    for key in PID_KEYS:
        value = str(session.metadata.get(key, ""))
        if value.isdigit():
            return int(value)
    container = session.metadata.get("container", "")
    host = os.environ.get("DOCKER_HOST", "")
    if container and host.startswith("unix://"):
        api = DockerAPI(host.removeprefix("unix://"))
        try:
            return api.inspect_pid(container) or None
        except (OSError, RuntimeError, KeyError, ValueError, http.client.HTTPException):
            return None
        finally:
            api.close()
    return None


def idle_memory(pids: list[int], since_ticks: int) -> dict[str, Any]:
    """Per-session PSS/RSS/USS (MiB) and cgroup charge of sessions given by one pid each."""
    pss, rss, uss, charged = [], [], [], []
    names: list[str] = []
    for pid in pids:
        procs = session_processes(pid, since_ticks, pids)
        use = process_memory(procs)
        pss.append(use.pss_kib / 1024)
        rss.append(use.rss_kib / 1024)
        uss.append(use.uss_kib / 1024)
        if not names:
            names = use.names
        cg = cgroup_memory_bytes(pid)
        if cg is not None:
            charged.append(cg / (1 << 20))
    return {
        "pss_mib": pss,
        "rss_p50_mib": statistics.median(rss),
        "uss_p50_mib": statistics.median(uss),
        "cgroup_p50_mib": statistics.median(charged) if charged else None,
        "processes_per_session": names,
    }


def missing_pid_reason(session: SandboxSession | None) -> str:
    """Why a session's memory cannot be measured: no host pid in its metadata."""
    keys = ", ".join(PID_KEYS)
    if session is not None and session.backend == "landlock":
        return ("the landlock session's metadata has no supervisor_pid: this version of the landlock backend "
                "does not expose the host pid of the session's supervisor")
    return f"the backend's session metadata names no host pid ({keys}) and no container of the engine at DOCKER_HOST"


async def _gather_timed(calls: list[Any]) -> tuple[list[float], list[Any], list[BaseException]]:
    """Run every zero-argument coroutine function at once; (seconds each, results, errors)."""
    seconds: list[float] = []
    results: list[Any] = []
    errors: list[BaseException] = []

    async def one(call: Any) -> None:
        start = time.perf_counter()
        try:
            results.append(await call())
            seconds.append(time.perf_counter() - start)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    return seconds, results, errors


async def _level(backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec, n: int, cfg: RunConfig,
                 settle: float) -> dict[str, Any]:
    level: dict[str, Any] = {"sessions": n}
    since = boot_ticks_now()
    available_before = mem_available_kib()
    start = time.perf_counter()
    _, provisioned, errors = await _gather_timed([lambda: sessions.provision_ready(spec) for _ in range(n)])
    level["provision_wall_ms"] = (time.perf_counter() - start) * 1000
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent provisions failed; first: {errors[0]!r}")
    ready = [s for s, _ in provisioned]
    level["provision"] = summarise(ms([t for _, t in provisioned]), "ms", 0)
    if any(s.metadata.get("node_ip") for s in ready):  # ray: where the sessions landed
        level["per_node"] = dict(Counter(s.metadata.get("node_ip") or "?" for s in ready))

    latencies: list[float] = []
    rates: list[float] = []
    for _ in range(cfg.scaling_exec_rounds):
        start = time.perf_counter()
        seconds, results, errors = await _gather_timed(
            [lambda s=s: backend.exec(s.id, TRUE) for s in ready])
        wall = time.perf_counter() - start
        if errors or any(r.exit_code != 0 for r in results):
            raise RuntimeError(f"concurrent exec failed at {n} sessions: {errors[:1]!r}")
        latencies += seconds
        rates.append(n / wall)
    level["exec"] = summarise(ms(latencies), "ms", 0, rounds=cfg.scaling_exec_rounds)
    level["exec_per_second"] = statistics.median(rates)

    await anyio.sleep(settle)
    pids = [p for p in (session_pid(s) for s in ready) if p is not None]
    if len(pids) == n:
        memory = idle_memory(pids, since)
        memory["host_memavailable_drop_per_session_mib"] = (available_before - mem_available_kib()) / 1024 / n
        level["memory"] = memory
    else:
        level["memory"] = None
        level["memory_reason"] = missing_pid_reason(ready[0] if ready else None)

    start = time.perf_counter()
    seconds, _, errors = await _gather_timed([lambda s=s: sessions.terminate(s.id) for s in ready])
    level["terminate_wall_ms"] = (time.perf_counter() - start) * 1000
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent terminates failed; first: {errors[0]!r}")
    level["terminate"] = summarise(ms(seconds), "ms", 0)
    return level


async def scaling_curve(system: SystemResult, backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec,
                        cfg: RunConfig) -> None:
    """Fill ``system.info["scaling"]`` and the ``idle_memory`` metric (from the largest level measured)."""
    settle = 1.0 if cfg.mode == "full" else 0.2
    levels: list[dict[str, Any]] = []
    system.info["scaling"] = levels
    for n in cfg.scaling_levels:
        try:
            levels.append(await _level(backend, sessions, spec, n, cfg, settle))
        except Exception as exc:
            system.skip(f"scaling_{n}", f"failed: {type(exc).__name__}: {exc}")
            await sessions.cleanup()
            break
        print(f"bench: {system.name}: {n} concurrent sessions measured", flush=True)
    measured = [lv for lv in levels if lv.get("memory")]
    if not measured:
        reason = levels[0].get("memory_reason") if levels else "no scaling level could be measured"
        system.skip("idle_memory", str(reason))
        return
    top = measured[-1]
    pss = top["memory"]["pss_mib"]
    summary = summarise(pss, "MiB", 0, sessions=top["sessions"],
                        rss_p50=top["memory"]["rss_p50_mib"], uss_p50=top["memory"]["uss_p50_mib"],
                        cgroup_p50=top["memory"]["cgroup_p50_mib"],
                        host_memavailable_drop=top["memory"]["host_memavailable_drop_per_session_mib"],
                        processes=top["memory"]["processes_per_session"])
    summary["sessions_per_gib"] = 1024 / summary["p50"] if summary["p50"] else None
    system.put("idle_memory", summary)
