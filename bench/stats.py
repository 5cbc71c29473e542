"""Samples -> summaries (median, p95), and the timing loops every measurement uses.

A summary is a plain dict so that it goes straight into the JSON results. Warm-up runs are run and thrown away
before any sample is kept; the count of both is recorded next to the figures.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "Summary",
    "ms",
    "percentile",
    "ratio",
    "summarise",
    "time_async",
    "time_sync",
]

Summary = dict[str, Any]
"""``{"unit", "p50", "p95", "mean", "min", "max", "n", "warmup", ...}``; extra keys per metric."""


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list: always one of the samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarise(samples: list[float], unit: str, warmup: int, **extra: Any) -> Summary:
    """Median, p95 and spread of ``samples`` (already in ``unit``)."""
    if not samples:
        raise ValueError("no samples to summarise")
    out: Summary = {
        "unit": unit,
        "p50": statistics.median(samples),
        "p95": percentile(samples, 0.95),
        "mean": statistics.fmean(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "warmup": warmup,
    }
    out.update(extra)
    return out


def ratio(value: Summary, baseline: Summary, baseline_name: str) -> dict[str, Any]:
    """``value.p50 / baseline.p50``, labelled with what the baseline was."""
    return {"baseline": baseline_name, "value": value["p50"] / baseline["p50"] if baseline["p50"] else math.inf}


def time_sync(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``, ``warmup`` calls discarded first."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


async def time_async(fn: Callable[[], Awaitable[object]], runs: int, warmup: int) -> list[float]:
    """Seconds per awaited call of ``fn``, ``warmup`` calls discarded first."""
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]
