"""How much work each measurement does: the full run that the docs publish, and the quick smoke run CI uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["FULL", "QUICK", "RunConfig"]

MB = 1_000_000


@dataclass(frozen=True)
class RunConfig:
    """Counts and sizes of one run. ``*_runs`` samples are kept, after ``*_warmup`` discarded ones."""

    mode: str
    # Commands and execs.
    exec_runs: int
    exec_warmup: int
    # Whole sandboxes (provision, terminate, one-shot peers that start a sandbox per command).
    provision_runs: int
    provision_warmup: int
    # 100 MB of stdout, streamed.
    stream_bytes: int
    stream_runs: int
    stream_warmup: int
    # Session files captured by a snapshot: half random bytes (incompressible), half zeros.
    snapshot_bytes: int
    snapshot_runs: int
    snapshot_warmup: int
    # A session holding this much in memory, for backends whose snapshots keep memory (gVisor).
    memory_snapshot_bytes: int
    suspend_runs: int
    suspend_warmup: int
    # Concurrent sessions; the largest level also gives the idle memory per session.
    scaling_levels: tuple[int, ...]
    scaling_exec_rounds: int
    # Idle containers of the docker peer measured for memory (a container costs far more to start).
    peer_memory_sessions: int
    # Gateway.
    gateway_latency_runs: int
    gateway_latency_warmup: int
    gateway_stream_bytes: int
    gateway_stream_runs: int
    gateway_concurrent: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_levels(self, levels: tuple[int, ...]) -> RunConfig:
        return replace(self, scaling_levels=levels)


FULL = RunConfig(
    mode="full",
    exec_runs=200,
    exec_warmup=10,
    provision_runs=30,
    provision_warmup=3,
    stream_bytes=100 * MB,
    stream_runs=5,
    stream_warmup=1,
    snapshot_bytes=100 * MB,
    snapshot_runs=5,
    snapshot_warmup=1,
    memory_snapshot_bytes=50 * MB,
    suspend_runs=30,
    suspend_warmup=3,
    scaling_levels=(1, 10, 50, 200),
    scaling_exec_rounds=5,
    peer_memory_sessions=20,
    gateway_latency_runs=300,
    gateway_latency_warmup=20,
    gateway_stream_bytes=256 * MB,
    gateway_stream_runs=7,
    gateway_concurrent=1000,
)

QUICK = RunConfig(
    mode="quick",
    exec_runs=10,
    exec_warmup=2,
    provision_runs=3,
    provision_warmup=1,
    stream_bytes=4 * MB,
    stream_runs=2,
    stream_warmup=1,
    snapshot_bytes=2 * MB,
    snapshot_runs=2,
    snapshot_warmup=0,
    memory_snapshot_bytes=2 * MB,
    suspend_runs=3,
    suspend_warmup=1,
    scaling_levels=(1, 3),
    scaling_exec_rounds=2,
    peer_memory_sessions=2,
    gateway_latency_runs=20,
    gateway_latency_warmup=3,
    gateway_stream_bytes=4 * MB,
    gateway_stream_runs=2,
    gateway_concurrent=50,
)
