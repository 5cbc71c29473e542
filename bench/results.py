"""The shape of a run's results (what ``results.json`` holds) and the names of the metrics.

Every measured thing is a *system* (a stockade backend, a baseline, or a peer) with *metrics*; a metric that
could not be measured is listed under ``skipped`` with the reason, never left out silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from .stats import Summary

__all__ = ["METRICS", "SCHEMA", "Kind", "MetricInfo", "SystemResult"]

SCHEMA = "stockade-bench/1"

Kind = Literal["backend", "baseline", "peer"]


@dataclass(frozen=True)
class MetricInfo:
    title: str
    unit: str
    higher_is_better: bool = False


METRICS: dict[str, MetricInfo] = {
    "provision_ready": MetricInfo("provision -> ready (until a first `true` succeeds)", "ms"),
    "exec_true": MetricInfo("exec round trip of `true`", "ms"),
    "stream_stdout": MetricInfo("streaming throughput of stdout", "MB/s", higher_is_better=True),
    "snapshot": MetricInfo("snapshot of the session files", "ms"),
    "restore": MetricInfo("restore from the snapshot (until the files are readable)", "ms"),
    "memory_snapshot": MetricInfo("snapshot of a session holding memory (gVisor checkpoint)", "ms"),
    "memory_restore": MetricInfo("restore of that snapshot (until the memory's bytes are back)", "ms"),
    "suspend_resume": MetricInfo("suspend + resume", "ms"),
    "suspend": MetricInfo("suspend", "ms"),
    "resume": MetricInfo("resume", "ms"),
    "terminate": MetricInfo("terminate", "ms"),
    "idle_memory": MetricInfo("host memory per idle session (PSS)", "MiB"),
}


@dataclass
class SystemResult:
    """One system's figures: ``metrics`` (name -> summary) and ``skipped`` (name -> reason)."""

    name: str
    kind: Kind
    label: str
    available: bool = True
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Summary] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def put(self, metric: str, summary: Summary) -> Summary:
        self.metrics[metric] = summary
        return summary

    def skip(self, metric: str, reason: str) -> None:
        self.skipped[metric] = reason
        print(f"bench: {self.name}: {metric} not measured: {reason}", file=sys.stderr, flush=True)

    def unavailable(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        print(f"bench: {self.name}: skipped: {reason}", file=sys.stderr, flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "label": self.label,
            "available": self.available,
            "reason": self.reason,
            "info": self.info,
            "metrics": self.metrics,
            "skipped": self.skipped,
        }
