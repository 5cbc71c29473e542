"""Benchmarks of the bwrap backend against baselines measured in the same run.

    python bench/bwrap_bench.py [--runs N] [--quick] [--json FILE]

Reports medians (and p95) of: provision->ready, exec round trip of ``true`` (ratio against a plain fork+exec of
/bin/true, and against a one-shot ``bwrap ... true``), terminate, suspend+resume, snapshot of 100 MB of session
files. Warm-up runs are excluded. No thresholds: the numbers are for docs/bwrap.md and the issue targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from stockade import ExecRequest, SandboxSpec
from stockade.backends.bwrap import BwrapBackend


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


def _time_sync(fn: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


async def _time_async(fn: Callable[[], Awaitable[object]], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


async def main(runs: int, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "euid": os.geteuid()},
    }
    fork_exec = _time_sync(lambda: subprocess.run(["/bin/true"], check=True), runs)
    results["baseline_fork_exec_true"] = _stats(fork_exec)
    oneshot = ["bwrap", "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib64", "/lib64",
               "--symlink", "usr/lib", "/lib", "--proc", "/proc", "--dev", "/dev", "--cap-drop", "ALL", "/usr/bin/true"]
    results["baseline_bwrap_oneshot_true"] = _stats(_time_sync(lambda: subprocess.run(oneshot, check=True), runs))

    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as state:
        backend = BwrapBackend(state)
        ids: list[str] = []

        async def provision() -> None:
            ids.append((await backend.provision(SandboxSpec())).id)

        prov = await _time_async(provision, max(5, runs // 4))
        results["provision_ready"] = _stats(prov)
        sid = ids[0]
        true_req = ExecRequest(command="/bin/true")
        exec_samples = await _time_async(lambda: backend.exec(sid, true_req), runs)
        results["exec_true"] = _stats(exec_samples)
        results["exec_true"]["ratio_to_fork_exec"] = statistics.median(exec_samples) / statistics.median(fork_exec)

        if backend.capabilities().resume:
            async def suspend_resume() -> None:
                await backend.suspend(sid)
                await backend.resume(sid)

            results["suspend_resume"] = _stats(await _time_async(suspend_resume, max(5, runs // 4)))
        if backend.capabilities().snapshot and not quick:
            await backend.exec(sid, ExecRequest(command="sh", args=(
                "-c", "head -c 50000000 /dev/urandom > /mnt/session/outputs/r; "
                      "head -c 50000000 /dev/zero > /tmp/z")))
            snaps = await _time_async(lambda: backend.snapshot(sid), 3, warmup=1)
            results["snapshot_100MB"] = _stats(snaps)

        async def terminate_one() -> None:
            await backend.terminate(ids.pop())

        term = await _time_async(terminate_one, len(ids), warmup=0)
        results["terminate"] = _stats(term)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="few runs, no snapshot (a smoke test)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = 10 if args.quick else args.runs
    out = anyio.run(main, runs, args.quick)
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text + "\n")
