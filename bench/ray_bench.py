"""The ray backend against its node backend, measured in the same run on a two-node cluster in namespaces.

    python3 bench/ray_bench.py [--runs N] [--sessions 200] [--json FILE]      (root: it makes network namespaces)

Reports medians (and p95) of: provision and exec (``true``) through Ray and straight through the node backend
(bwrap) on the same machine, their differences (the issue's targets: provision within 100 ms, exec within
3 ms of the node backend), the cost of one Ray actor per session against one placement group per session (the
design choice), and how many of ``--sessions`` sessions land on each node when slots split them. No thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from stockade import ExecRequest, SandboxSpec
from stockade.backends.bwrap import BwrapBackend
from stockade.backends.ray import RayBackend
from stockade.backends.ray._localcluster import LocalCluster


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


async def _timed(fn: Callable[[], Awaitable[Any]], runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


async def _lifecycle(backend: Any, spec: SandboxSpec, runs: int) -> dict[str, Any]:
    provisioned: list[str] = []

    async def provision() -> None:
        provisioned.append((await backend.provision(spec)).id)

    prov = await _timed(provision, runs)
    session_id = provisioned[0]
    request = ExecRequest(command="true")
    execs = await _timed(lambda: backend.exec(session_id, request), runs * 4)
    for sid in provisioned:
        await backend.terminate(sid)
    return {"provision": _stats(prov), "exec_true": _stats(execs)}


def _actor_vs_group(runs: int) -> dict[str, Any]:
    """One Ray actor per session (a worker process each) against one placement group per session."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class PerSession:
        def pid(self) -> int:
            return os.getpid()

    actor_times, pss, actors = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        actor = PerSession.remote()  # type: ignore[attr-defined]
        pid = ray.get(actor.pid.remote())
        actor_times.append(time.perf_counter() - start)
        actors.append(actor)
        with contextlib.suppress(OSError, StopIteration):
            pss.append(next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text()
                            .splitlines() if line.startswith("Pss:")) / 1024)
    for actor in actors:
        ray.kill(actor)
    group_times = []
    for _ in range(runs):
        start = time.perf_counter()
        pg = placement_group([{"stockade_slots": 1}])
        ray.get(pg.ready())
        group_times.append(time.perf_counter() - start)
        remove_placement_group(pg)
    return {
        "actor_per_session_create": _stats(actor_times),
        "actor_per_session_pss_mb": statistics.median(pss) if pss else None,
        "placement_group_per_session_create": _stats(group_times),
    }


async def _spread(backend: RayBackend, count: int) -> dict[str, Any]:
    ids: list[str] = []
    per_node: Counter[str] = Counter()
    limiter = anyio.Semaphore(8)
    start = time.perf_counter()

    async def one() -> None:
        async with limiter:
            session = await backend.provision(SandboxSpec())
            ids.append(session.id)
            per_node[session.metadata["node_ip"]] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    elapsed = time.perf_counter() - start
    refused = False
    try:
        extra = await backend.provision(SandboxSpec())
        ids.append(extra.id)
    except Exception:
        refused = True
    for sid in ids:
        await backend.terminate(sid)
    return {"sessions": count, "per_node": dict(per_node), "seconds": elapsed, "one_more_refused": refused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    half = max(1, args.sessions // 2)
    results: dict[str, Any] = {"uname": os.uname().release, "cpus": os.cpu_count()}
    cluster = LocalCluster(slots=(half, args.sessions - half), start_timeout=180)
    try:
        started = time.perf_counter()
        cluster.start()
        cluster.connect_driver()
        cluster.wait_nodes()
        results["cluster_start_s"] = time.perf_counter() - started
        spec = SandboxSpec(labels={"stockade.ray/node": cluster.head.ip})

        async def run() -> None:
            local = BwrapBackend(cluster.root / "local-state")
            results["bwrap"] = await _lifecycle(local, SandboxSpec(), args.runs)
            opened = time.perf_counter()
            backend = RayBackend(cluster.gcs_address, placement_timeout=60)
            results["ray_open_s"] = time.perf_counter() - opened
            results["ray"] = await _lifecycle(backend, spec, args.runs)
            results["spread"] = await _spread(backend, args.sessions)

        anyio.run(run)
        results.update(_actor_vs_group(min(args.runs, 8)))
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
        cluster.remove_files()
    for op in ("provision", "exec_true"):
        results[f"{op}_overhead_ms"] = results["ray"][op]["p50_ms"] - results["bwrap"][op]["p50_ms"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
