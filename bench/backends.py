"""The per-backend suite, written against the ``SandboxBackend`` contract only.

Every stockade backend the registry knows is run through the same steps; what a backend cannot do is read from
``capabilities()`` (or from the absence of the ``suspend`` extension) and reported as skipped with that reason.
Sessions are always terminated, whatever fails.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from stockade import ExecRequest, NetworkPolicy, ResourceLimits, SandboxSpec
from stockade.backend import ExecChunk, SandboxBackend
from stockade.errors import SandboxError, SessionNotFound
from stockade.models import ExecResult, SandboxSession
from stockade.registry import available_backends, backend_class, open_backend

from .config import RunConfig
from .results import SystemResult
from .stats import ms, summarise

__all__ = ["Sessions", "choose_spec", "open_bench_backend", "registered_backends", "run_backend", "wait_ready"]

TRUE = ExecRequest(command="true")
READY_DEADLINE = 30.0
# Shell words, expanded in the guest: the outputs mount and the temporary directory are where the session says
# (guest paths in a private filesystem view, host paths where the guest sees the host's, e.g. landlock).
SESSION_FILES = ('"$STOCKADE_OUTPUTS_DIR/random.bin"', '"${TMPDIR:-/tmp}/zero.bin"')


def registered_backends() -> list[tuple[str, str | None]]:
    """(name, reason it cannot run here or None) for every backend the registry knows."""
    return [(info.name, info.reason) for info in available_backends()]


def open_bench_backend(name: str, workdir: Path, options: dict[str, Any]) -> SandboxBackend:
    """Instantiate ``name``; a backend that takes a ``state_dir`` gets a private one, removed after the run."""
    opts = dict(options)
    params = inspect.signature(backend_class(name).__init__).parameters
    if "state_dir" in params and "state_dir" not in opts:
        state = workdir / f"state-{name}"
        state.mkdir(parents=True, exist_ok=True)
        opts["state_dir"] = str(state)
    return open_backend(name, **opts)


def choose_spec(backend: SandboxBackend) -> SandboxSpec | None:
    """The plainest spec the backend enforces fully: deny-all network, else unrestricted (no traffic is made)."""
    for policy in (NetworkPolicy.deny_all(), NetworkPolicy.unrestricted()):
        spec = SandboxSpec(network_policy=policy)
        if not backend.check(spec):
            return spec
    return None


class Sessions:
    """Provisions through a backend and remembers every live session, so that nothing is left behind."""

    def __init__(self, backend: SandboxBackend) -> None:
        self.backend = backend
        self.live: dict[str, SandboxSession] = {}
        self.ready_retries = 0

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        session = await self.backend.provision(spec)
        self.live[session.id] = session
        return session

    async def provision_ready(self, spec: SandboxSpec, probe: ExecRequest = TRUE) -> tuple[SandboxSession, float]:
        """Provision and wait until ``probe`` succeeds; returns the session and the seconds it took."""
        start = time.perf_counter()
        session = await self.provision(spec)
        result = await self.wait_ready(session.id, probe)
        elapsed = time.perf_counter() - start
        if result.exit_code != 0:
            raise RuntimeError(f"{probe.command} kept failing in a new session: {result.stderr[-300:]}")
        return session, elapsed

    async def wait_ready(self, session_id: str, probe: ExecRequest = TRUE) -> ExecResult:
        return await wait_ready(self.backend, session_id, probe, self)

    async def terminate(self, session_id: str) -> float:
        """Terminate one session; returns the seconds it took."""
        start = time.perf_counter()
        await self.backend.terminate(session_id)
        elapsed = time.perf_counter() - start
        self.live.pop(session_id, None)
        return elapsed

    async def cleanup(self) -> None:
        for session_id in list(self.live):
            with contextlib.suppress(SessionNotFound):
                try:
                    await self.backend.terminate(session_id)
                except SandboxError as exc:
                    print(f"bench: could not terminate {session_id}: {exc}")
            self.live.pop(session_id, None)


async def wait_ready(
    backend: SandboxBackend, session_id: str, probe: ExecRequest = TRUE, counter: Sessions | None = None
) -> ExecResult:
    """Run ``probe`` until it exits 0 (a fresh session may still be starting), for at most 30 s."""
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        try:
            result = await backend.exec(session_id, probe)
            if result.exit_code == 0 or time.monotonic() > deadline:
                return result
        except SandboxError:
            if time.monotonic() > deadline:
                raise
        if counter is not None:
            counter.ready_retries += 1
        await anyio.sleep(0.005)


async def _guard(system: SystemResult, metric: str, step: Any) -> None:
    """Run one measurement step; a failure becomes a skip with the error, not the end of the run."""
    try:
        await step()
    except Exception as exc:
        system.skip(metric, f"failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()


async def run_backend(
    name: str, cfg: RunConfig, workdir: Path, options: dict[str, Any], *, scaling: bool = True,
    system_name: str | None = None,
) -> SystemResult:
    """Every per-backend metric, then the scaling curve and idle memory (``scaling``), for one backend;
    ``system_name`` names the row when it is a variant of the backend (``docker-runsc``)."""
    system = SystemResult(system_name or name, "backend", f"stockade `{name}`")
    try:
        backend = open_bench_backend(name, workdir, options)
    except SandboxError as exc:
        system.unavailable(str(exc))
        return system
    async with backend:
        caps = backend.capabilities()
        system.info["capabilities"] = {k: v for k, v in caps.to_json().items() if v}
        spec = choose_spec(backend)
        if spec is None:
            system.unavailable("enforces neither a deny-all nor an unrestricted network policy")
            return system
        system.info["spec"] = spec.to_json()
        sessions = Sessions(backend)
        try:
            await _suite(system, backend, sessions, spec, cfg)
            if scaling:
                from .scaling import scaling_curve  # scaling imports this module

                await scaling_curve(system, backend, sessions, spec, cfg)
        finally:
            await sessions.cleanup()
            system.info["ready_retries"] = sessions.ready_retries
    return system


async def _suite(system: SystemResult, backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec,
                 cfg: RunConfig) -> None:
    caps = backend.capabilities()
    pool: list[str] = []

    async def provision() -> None:
        samples = []
        for i in range(cfg.provision_warmup + cfg.provision_runs):
            session, elapsed = await sessions.provision_ready(spec)
            pool.append(session.id)
            if i >= cfg.provision_warmup:
                samples.append(elapsed)
        system.put("provision_ready", summarise(ms(samples), "ms", cfg.provision_warmup))

    await _guard(system, "provision_ready", provision)
    if not pool:
        with contextlib.suppress(Exception):
            pool.append((await sessions.provision_ready(spec))[0].id)
    if not pool:
        for metric in ("exec_true", "stream_stdout", "snapshot", "restore", "suspend_resume", "terminate"):
            system.skip(metric, "no session could be provisioned")
        return
    main = pool[0]

    async def exec_true() -> None:
        samples = []
        for i in range(cfg.exec_warmup + cfg.exec_runs):
            start = time.perf_counter()
            result = await backend.exec(main, TRUE)
            elapsed = time.perf_counter() - start
            if result.exit_code != 0:
                raise RuntimeError(f"`true` exited {result.exit_code}")
            if i >= cfg.exec_warmup:
                samples.append(elapsed)
        system.put("exec_true", summarise(ms(samples), "ms", cfg.exec_warmup))

    await _guard(system, "exec_true", exec_true)

    if caps.exec_streaming:
        await _guard(system, "stream_stdout", lambda: _stream(system, backend, sessions, spec, cfg))
    else:
        system.skip("stream_stdout", "capabilities().exec_streaming is false (output arrives only at the end)")

    if caps.snapshot:
        await _guard(system, "snapshot", lambda: _snapshot_restore(system, backend, sessions, spec, cfg))
    else:
        system.skip("snapshot", "capabilities().snapshot is false")
        system.skip("restore", "capabilities().snapshot is false")

    if caps.memory_snapshot:
        await _guard(system, "memory_snapshot", lambda: _memory_snapshot(system, backend, sessions, spec, cfg))
    else:
        system.skip("memory_snapshot", "capabilities().memory_snapshot is false (snapshots keep files only)")

    suspend = getattr(backend, "suspend", None)
    if not caps.resume:
        system.skip("suspend_resume", "capabilities().resume is false")
    elif not callable(suspend):
        system.skip("suspend_resume", "the backend has no explicit suspend() (only idle suspension), so no "
                                      "suspend can be timed")
    else:
        await _guard(system, "suspend_resume", lambda: _suspend_resume(system, backend, main, cfg))

    async def terminate() -> None:
        samples = []
        for i, session_id in enumerate(list(pool)):
            elapsed = await sessions.terminate(session_id)
            if i >= cfg.provision_warmup:
                samples.append(elapsed)
        if not samples:
            raise RuntimeError("too few sessions to time terminate after warm-up")
        system.put("terminate", summarise(ms(samples), "ms", min(cfg.provision_warmup, len(pool))))

    await _guard(system, "terminate", terminate)


async def _collect(stream: AsyncIterator[ExecChunk | ExecResult]) -> tuple[int, ExecResult | None]:
    got, result = 0, None
    async for item in stream:
        if isinstance(item, ExecChunk):
            if item.stream == "stdout":
                got += len(item.data)
        else:
            result = item
    return got, result


async def _stream(system: SystemResult, backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec,
                  cfg: RunConfig) -> None:
    n = cfg.stream_bytes
    stream_spec = SandboxSpec(network_policy=spec.network_policy,
                              limits=ResourceLimits(output_limit_bytes=n + (1 << 20)))
    session, _ = await sessions.provision_ready(stream_spec)
    request = ExecRequest(command="head", args=("-c", str(n), "/dev/zero"))
    rates = []
    for i in range(cfg.stream_warmup + cfg.stream_runs):
        start = time.perf_counter()
        got, result = await _collect(backend.exec_stream(session.id, request))
        elapsed = time.perf_counter() - start
        if result is None or result.exit_code != 0 or got != n:
            raise RuntimeError(f"streamed {got} of {n} bytes (result: {result!r:.200})")
        if i >= cfg.stream_warmup:
            rates.append(n / 1e6 / elapsed)
    await sessions.terminate(session.id)
    system.put("stream_stdout", summarise(rates, "MB/s", cfg.stream_warmup, bytes=n,
                                          command=f"head -c {n} /dev/zero"))


async def _snapshot_restore(system: SystemResult, backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec,
                            cfg: RunConfig) -> None:
    total = cfg.snapshot_bytes
    half = total // 2
    session, _ = await sessions.provision_ready(spec)
    fill = await backend.exec(session.id, ExecRequest(command="sh", args=(
        "-c", f"head -c {half} /dev/urandom > {SESSION_FILES[0]} && head -c {total - half} /dev/zero > "
              f"{SESSION_FILES[1]}")))
    if fill.exit_code != 0:
        raise RuntimeError(f"could not write the session files: {fill.stderr[-300:]}")
    extra = {"bytes": total, "content": f"{half} random bytes in the outputs mount, {total - half} zeros in the "
                                        "temporary directory"}
    samples = []
    snapshot_id = ""
    for i in range(cfg.snapshot_warmup + cfg.snapshot_runs):
        start = time.perf_counter()
        snap = await backend.snapshot(session.id)
        elapsed = time.perf_counter() - start
        snapshot_id = snap.snapshot_id
        if i >= cfg.snapshot_warmup:
            samples.append(elapsed)
    await sessions.terminate(session.id)
    system.put("snapshot", summarise(ms(samples), "ms", cfg.snapshot_warmup, **extra))

    # Restored = provisioned from the snapshot and the random file is back, whole.
    samples = []
    for i in range(cfg.snapshot_warmup + cfg.snapshot_runs):
        elapsed = await _restore_and_check(backend, sessions, spec, snapshot_id, SESSION_FILES[0], half)
        if i >= cfg.snapshot_warmup:
            samples.append(elapsed)
    system.put("restore", summarise(ms(samples), "ms", cfg.snapshot_warmup, verified=True, **extra))


async def _restore_and_check(backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec, snapshot_id: str,
                             path: str, size: int) -> float:
    """Provision a session from ``snapshot_id`` (timed until it answers), check that ``path`` came back with
    ``size`` bytes, terminate it; returns the provision time in seconds."""
    check = ExecRequest(command="sh", args=("-c", f"stat -c %s {path}"))  # the path may name a variable
    restored, elapsed = await sessions.provision_ready(
        SandboxSpec(network_policy=spec.network_policy, from_snapshot=snapshot_id), check)
    found = (await backend.exec(restored.id, check)).stdout.strip()
    await sessions.terminate(restored.id)
    if found != str(size):
        raise RuntimeError(f"the restored session has {found or 'no'} bytes in {path}, not {size}")
    return elapsed


async def _memory_snapshot(system: SystemResult, backend: SandboxBackend, sessions: Sessions, spec: SandboxSpec,
                           cfg: RunConfig) -> None:
    """A session holding ``memory_snapshot_bytes`` in memory (random bytes in the guest's /dev/shm, a tmpfs of
    the sandbox's own kernel under gVisor), snapshotted, then restored until the bytes are back: they can only
    come back through the memory image. Each round has a fresh session (untimed provision and fill): a second
    checkpoint of one gVisor session fails with the docker backend at present ("id already in use")."""
    n = cfg.memory_snapshot_bytes
    held = "/dev/shm/held.bin"
    extra = {"bytes": n, "content": f"{n} random bytes in {held} (memory of the sandbox), a fresh session each"}
    snaps, restores = [], []
    for i in range(cfg.snapshot_warmup + cfg.snapshot_runs):
        session, _ = await sessions.provision_ready(spec)
        fill = await backend.exec(session.id, ExecRequest(command="sh", args=(
            "-c", f"head -c {n} /dev/urandom > {held} && stat -c %s {held}")))
        if fill.exit_code != 0 or fill.stdout.strip() != str(n):
            raise RuntimeError(f"could not fill {held}: {fill.stdout.strip()[-100:]} {fill.stderr[-300:]}")
        start = time.perf_counter()
        snap = await backend.snapshot(session.id)
        elapsed = time.perf_counter() - start
        await sessions.terminate(session.id)
        restore_s = await _restore_and_check(backend, sessions, spec, snap.snapshot_id, held, n)
        if i >= cfg.snapshot_warmup:
            snaps.append(elapsed)
            restores.append(restore_s)
    system.put("memory_snapshot", summarise(ms(snaps), "ms", cfg.snapshot_warmup, **extra))
    system.put("memory_restore", summarise(ms(restores), "ms", cfg.snapshot_warmup, verified=True, **extra))


async def _suspend_resume(system: SystemResult, backend: SandboxBackend, session_id: str, cfg: RunConfig) -> None:
    suspend = backend.suspend  # type: ignore[attr-defined]
    pairs, downs, ups = [], [], []
    for i in range(cfg.suspend_warmup + cfg.suspend_runs):
        start = time.perf_counter()
        await suspend(session_id)
        mid = time.perf_counter()
        await backend.resume(session_id)
        end = time.perf_counter()
        if i >= cfg.suspend_warmup:
            pairs.append(end - start)
            downs.append(mid - start)
            ups.append(end - mid)
    after = await backend.exec(session_id, TRUE)
    if after.exit_code != 0:
        raise RuntimeError("`true` failed after resume")
    system.put("suspend_resume", summarise(ms(pairs), "ms", cfg.suspend_warmup))
    system.put("suspend", summarise(ms(downs), "ms", cfg.suspend_warmup))
    system.put("resume", summarise(ms(ups), "ms", cfg.suspend_warmup))
