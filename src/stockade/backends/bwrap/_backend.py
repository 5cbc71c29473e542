"""The ``bwrap`` backend: long-lived bubblewrap sessions with an agent inside, cgroups and seccomp.

Where it differs from the contract's documentation (``stockade.backend``):

- Network: every session has its own network namespace with only ``lo``. ``limited`` and ``unrestricted``
  policies go through the egress gateway (``stockade.gateway``; see ``_network``): proxies, a DNS stub and a
  NAT redirect inside the namespace, one gateway process per session on the host. That needs ``nft`` and
  ``ip`` on the host; without them only deny-all is offered (``capabilities()`` says so).
  ``share_host_network=True`` is the explicit way out: unrestricted sessions then use the host's network,
  with no gateway, checks or log.
- Resource limits need a writable cgroup hierarchy (root, or a delegated cgroup v2 subtree); without one,
  ``capabilities()`` says so and a spec with limits is refused.
- Snapshots keep files (outputs, memory, session-owned mounts, ``/tmp``), not processes. Suspend/resume (cgroup
  freezer) keeps processes.
- Live mounts (``attach_filesystem``) go straight into the sandbox's mount namespace with the new mount API
  (``_mounts``), for root and unprivileged callers; targets inside other mounts or the system view are refused.
- Sessions outlive the process that created them: the state directory lets any process find them by id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ...backend import ExecChunk, SandboxBackend
from ...errors import (
    ExecError,
    InvalidRequest,
    LifecycleError,
    NetworkPolicyError,
    SessionNotFound,
    Unsupported,
)
from ...models import (
    MEMORY_MOUNT,
    OUTPUTS_MOUNT,
    ExecRequest,
    ExecResult,
    FilesystemAccess,
    FilesystemMount,
    NetworkPolicy,
    ResolvedMount,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
    validate_session_id,
)
from .._archive import restore_filter as _restore_filter
from .._cancel_safe import provision_in_thread
from .._records import record_lock
from ._client import AgentGone, request_frames, short_unix_path
from ._launch import (
    GUEST_HOME,
    GUEST_PATH,
    GuestMount,
    LaunchPlan,
    bwrap_argv,
    data_fd,
    find_guest_python,
    guest_files,
)
from ._mounts import attach_at_start, attach_live, live_mounts_reason, owned_mount, via_helper
from ._network import GatewayHandle, find_tool, gateway_policy_json, proxy_env, start_gateway
from ._pool import POOL_PREFIX, WarmPool, owner_alive, poolable
from ._store import SessionStore, default_state_root, process_start_time

__all__ = ["BwrapBackend", "probe"]

DEFAULT_OUTPUT_LIMIT = 16 << 20
DEFAULT_PIDS_MAX = 512
DEFAULT_TMP_MB = 512


def probe() -> str | None:
    """None when bwrap sessions can start here, else what is missing and how to fix it."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed: apt-get install bubblewrap"
    if not Path("/proc/self/ns/user").exists():
        return "the kernel has no user namespaces"
    max_userns = Path("/proc/sys/user/max_user_namespaces")
    with contextlib.suppress(OSError, ValueError):
        if int(max_userns.read_text()) == 0:
            return "user namespaces are disabled (sysctl user.max_user_namespaces=0)"
    try:
        from ...linux import seccomp

        seccomp.compile_bpf(seccomp.default_profile())
    except Exception as exc:
        return f"cannot build the seccomp filter ({exc}); apt-get install libseccomp2"
    python, _ = find_guest_python()
    if not os.access(python, os.X_OK):
        return "no python3 interpreter for the session agent"
    return None


class BwrapBackend(SandboxBackend):
    """Sessions as long-lived bubblewrap sandboxes. Options:

    ``state_dir``: where sessions and snapshots live (default: ``$STOCKADE_STATE_DIR``, ``/var/lib/stockade``
    for root, ``$XDG_STATE_HOME/stockade`` otherwise). ``default_pids_max``: the pids cap when a spec gives
    none. ``default_tmp_mb``: size of the private ``/tmp``. ``output_limit_bytes``: captured output per stream.

    Egress: ``resolve`` maps names to addresses for the gateway instead of the host's resolver,
    ``dns_upstream`` (``"ADDRESS:PORT"``) makes it ask that DNS server instead; both exist so tests reach fake
    upstreams. ``public_overrides`` (tests only) lists addresses the gateway treats as public, so a name rule
    can be measured against a loopback listener while the bare address still needs a rule of its own.
    ``share_host_network``: unrestricted sessions share the host's network namespace (no gateway, no log, no
    address checks: the guest reaches whatever the host reaches, loopback included).

    ``pool_size``: keep that many sandboxes started ahead of time (a warm pool, see ``_pool``); a spec without
    extra mounts, limits or a snapshot is then served from it in milliseconds. ``await backend.prefill()``
    fills it; ``aclose()`` (the end of ``async with``) terminates what is left in it.
    """

    name = "bwrap"

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        default_pids_max: int = DEFAULT_PIDS_MAX,
        default_tmp_mb: int = DEFAULT_TMP_MB,
        output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT,
        start_timeout: float = 15.0,
        resolve: Mapping[str, str | Sequence[str]] | None = None,
        dns_upstream: str | None = None,
        public_overrides: Sequence[str] = (),
        share_host_network: bool = False,
        pool_size: int = 0,
    ) -> None:
        self.store = SessionStore(Path(state_dir) if state_dir is not None else default_state_root())
        self.default_pids_max = default_pids_max
        self.default_tmp_mb = default_tmp_mb
        self.output_limit_bytes = output_limit_bytes
        self.start_timeout = start_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: list[subprocess.Popen[bytes]] = []
        self._layout: Any = None
        self.resolve = (
            {name: [v] if isinstance(v, str) else list(v) for name, v in resolve.items()} if resolve else None
        )
        self.dns_upstream = dns_upstream
        self.public_overrides = tuple(public_overrides)
        self.share_host_network = share_host_network
        self._gateways: dict[str, subprocess.Popen[bytes]] = {}
        self._cgroups: dict[tuple[str, str], Any] = {}
        if pool_size < 0:
            raise InvalidRequest("must be 0 or more", field="pool_size")
        self._pool = WarmPool(pool_size, self.store, self._start_pooled, self._discard) if pool_size else None
        self._specs: dict[str, SandboxSpec] = {}

    # ------------------------------------------------------------------------------------------ capabilities

    def _cgroup_layout(self) -> Any:
        if self._layout is None:
            from ...linux import cgroups

            self._layout = cgroups.detect_layout()
        return self._layout

    def _cgroups_writable(self) -> bool:
        layout = self._cgroup_layout()
        if layout.kind == "none":
            return False
        roots = [layout.v2_root] if layout.v2_root is not None else []
        roots += list(layout.v1_roots.values())
        return any(root is not None and os.access(root, os.W_OK) for root in roots)

    @staticmethod
    def _egress_available() -> bool:
        # The session's namespace is configured with nft and ip (as root directly, otherwise from inside the
        # user namespace the caller owns).
        return find_tool("nft") is not None and find_tool("ip") is not None

    def capabilities(self) -> SandboxCapabilities:
        layout = self._cgroup_layout()
        egress = self._egress_available()
        cg = self._cgroups_writable()
        freeze = cg and layout.supports("freeze")
        return SandboxCapabilities(
            local_process_sandbox=True,
            network_policy=egress,
            snapshot=freeze,
            resume=freeze,
            suspend_on_idle=freeze,
            filesystem_isolation=True,
            process_isolation=True,
            live_mounts=live_mounts_reason() is None,
            memory_snapshot=False,
            resource_limits=cg,
            memory_limit=cg and layout.supports("memory"),
            pids_limit=cg and layout.supports("pids"),
            cpu_limit=cg and layout.supports("cpu"),
            network_deny_all=True,
            network_unrestricted=egress or self.share_host_network,
            egress_log=egress,
            exec_streaming=True,
            persistent_sessions=True,
            # A read-write mount of a host directory is a bind, which shows its source in mountinfo; the
            # session's own directories and read-only ones do not show (overlays, docs/bwrap.md).
            private_mount_sources=False,
        )

    # ------------------------------------------------------------------------------------------- provision

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.refuse_gaps(spec)
        if not spec.network_policy.denies_all and not self._egress_available() and not self._host_net(spec):
            raise Unsupported(self.name, "network_policy", self._no_egress_reason())
        if spec.image is not None:
            raise Unsupported(self.name, "image", "bwrap sessions use the host's /usr, not images")
        for mount in spec.mounts:
            self._check_source(mount)
        session_id = spec.session_id or secrets.token_hex(16)
        if session_id.startswith(POOL_PREFIX):
            raise InvalidRequest(f"session ids starting with {POOL_PREFIX!r} are reserved", field="session_id")
        pooled = self._pool is not None and poolable(spec)

        def build() -> SandboxSession:
            claimed = self._claim_pooled(spec, session_id) if pooled else None
            return claimed if claimed is not None else self._provision_blocking(spec, session_id)

        return await provision_in_thread(build, self._discard)

    # ------------------------------------------------------------------------------------------- warm pool

    async def prefill(self) -> None:
        """Start pool sandboxes until ``pool_size`` are ready (no-op without a pool)."""
        if self._pool is not None:
            await anyio.to_thread.run_sync(self._pool.fill)

    async def aclose(self) -> None:
        if self._pool is not None:
            await anyio.to_thread.run_sync(self._pool.close)

    def _start_pooled(self, pool_id: str) -> None:
        self._provision_blocking(SandboxSpec(), pool_id, pool_owner=WarmPool.owner())

    def _discard(self, session_id: str) -> bool:
        """Claim and end a sandbox, blocking (terminate; a pool sandbox; a session whose provision was
        cancelled); False if it was not there to claim."""
        record = self.store.claim(session_id)
        if record is None:
            return False
        self._terminate_blocking(record)
        return True

    def _claim_pooled(self, spec: SandboxSpec, session_id: str) -> SandboxSession | None:
        assert self._pool is not None
        while (pool_id := self._pool.take()) is not None:
            record = self.store.read(pool_id)
            if record is None:
                continue
            if not self._alive(record):
                self._discard(pool_id)
                continue
            target = self.store.session_dir(session_id)
            if target.exists():
                self._pool.give_back(pool_id)
                raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id")
            os.rename(self.store.session_dir(pool_id), target)
            proc = self._children.pop(pool_id, None)
            if proc is not None:
                self._children[session_id] = proc
            record.update(id=session_id, spec=spec.to_json(), created=time.time(), pool_owner=None)
            record["network_policy"] = spec.network_policy.to_json()
            record["mounts"] = [{**m, "host_path": m["host_path"].replace(
                str(self.store.session_dir(pool_id)), str(target), 1)} for m in record["mounts"]]
            gateway: GatewayHandle | None = None
            try:
                if not spec.network_policy.denies_all:
                    gateway = self._start_gateway(session_id, target, int(record["init_pid"]), spec.network_policy)
                    record["gateway"] = gateway.data
                self.store.write(session_id, record)
            except BaseException:
                if gateway is not None:
                    self._stop_gateway(session_id, gateway)
                claimed = self.store.claim(session_id)
                self._terminate_blocking(claimed if claimed is not None else record)
                raise
            return self._session_from(record)
        return None

    def _host_net(self, spec: SandboxSpec) -> bool:
        return self.share_host_network and spec.network_policy.mode == "unrestricted"

    @staticmethod
    def _no_egress_reason() -> str:
        return "egress through the gateway needs nft and ip on the host: apt-get install nftables iproute2"

    def _check_source(self, mount: FilesystemMount) -> None:
        if not mount.source:
            return
        try:
            st = os.lstat(mount.source)
        except FileNotFoundError:
            raise InvalidRequest(f"{mount.source!r} does not exist on the host", field="mounts.source") from None
        except OSError as exc:
            raise InvalidRequest(f"cannot use {mount.source!r}: {exc.strerror}", field="mounts.source") from None
        if os.path.islink(mount.source) or os.path.realpath(mount.source) != mount.source:
            raise InvalidRequest(
                f"{mount.source!r} is or passes through a symlink; give the real path", field="mounts.source"
            )
        import stat as stat_mod

        if not (stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISREG(st.st_mode)):
            raise InvalidRequest(f"{mount.source!r} is neither a directory nor a file", field="mounts.source")

    def _provision_blocking(
        self, spec: SandboxSpec, session_id: str, *, pool_owner: dict[str, Any] | None = None
    ) -> SandboxSession:
        from ...linux import seccomp

        try:
            sdir = self.store.create_session_dir(session_id)
        except FileExistsError:
            raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id") from None
        cgroup: Any = None
        proc: subprocess.Popen[bytes] | None = None
        gateway: GatewayHandle | None = None
        fds: list[int] = []
        try:
            outputs, memory = sdir / "outputs", sdir / "memory"
            outputs.mkdir()
            memory.mkdir()
            guest_mounts = [
                owned_mount(sdir, memory, MEMORY_MOUNT,
                            FilesystemAccess.READ_WRITE if spec.memory_writable else FilesystemAccess.READ_ONLY),
                owned_mount(sdir, outputs, OUTPUTS_MOUNT, FilesystemAccess.READ_WRITE),
            ]
            owned: list[str] = []
            for index, mount in enumerate(spec.mounts):
                if mount.source:
                    guest_mounts.append(GuestMount(mount.source, mount.target, mount.access))
                    continue
                owned_dir = sdir / "mounts" / str(index)
                owned_dir.mkdir(parents=True)
                owned.append(mount.target)
                guest_mounts.append(owned_mount(sdir, owned_dir, mount.target, mount.access))
            if spec.from_snapshot:
                self._restore_files(spec.from_snapshot, sdir, guest_mounts)

            limits = spec.limits
            if self._cgroups_writable():
                from ...linux import cgroups

                cgroup = cgroups.SessionCgroup.create(
                    session_id,
                    cgroups.CgroupLimits(
                        memory_bytes=limits.memory_mb * (1 << 20) if limits.memory_mb else None,
                        pids_max=limits.pids_max or self.default_pids_max,
                        cpu_quota=float(limits.cpu_count) if limits.cpu_count else None,
                    ),
                )

            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock_path = sdir / "agent.sock"
            with short_unix_path(str(sock_path)) as short:
                listener.bind(short)
            os.chmod(sock_path, 0o600)
            listener.listen(64)
            fds.append(listener.detach())
            ready_r, ready_w = os.pipe()
            fds += [ready_r, ready_w]
            info_r, info_w = os.pipe()
            fds += [info_r, info_w]
            seccomp_fd = seccomp.bpf_fd(seccomp.default_profile("inet"))
            fds.append(seccomp_fd)
            python, python_binds = find_guest_python()
            files = []
            for guest, data in guest_files("stockade", self._host_net(spec)).items():
                fds.append(data_fd(data))
                files.append((guest, fds[-1]))
            # Read-only directories and the session's own read-write ones (and every mount after the first of
            # those, so that the order of stacking stays the spec's) are placed by the mount helper once the
            # sandbox runs: sealed, or behind an overlay that hides their host paths; see _mounts.py.
            first_sealed = next((i for i, m in enumerate(guest_mounts) if via_helper(m)), None)
            bwrap_mounts = guest_mounts if first_sealed is None else guest_mounts[:first_sealed]
            helper_mounts = [] if first_sealed is None else guest_mounts[first_sealed:]
            plan = LaunchPlan(
                state_dir=sdir,
                python=python,
                python_binds=python_binds,
                mounts=tuple(bwrap_mounts),
                tmp_bytes=(limits.tmp_mb or self.default_tmp_mb) << 20,
                hostname="stockade",
                listen_fd=fds[0],
                ready_fd=ready_w,
                seccomp_fd=seccomp_fd,
                info_fd=info_w,
                share_host_network=self._host_net(spec),
                files=tuple(files),
            )
            log = open(sdir / "bwrap.log", "wb")  # noqa: SIM115 - handed to the child, closed below
            preexec: Callable[[], None] | None = cgroup.preexec_join() if cgroup is not None else None
            try:
                proc = subprocess.Popen(
                    bwrap_argv(plan),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=True,
                    pass_fds=(fds[0], ready_w, info_w, seccomp_fd, *(fd for _, fd in files)),
                    start_new_session=True,
                    preexec_fn=preexec,
                    # Nothing of the caller's environment may reach the sandbox, not even bwrap's own.
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                )
            finally:
                log.close()
            for fd in (ready_w, info_w, seccomp_fd, fds[0], *(fd for _, fd in files)):
                os.close(fd)
            fds = [ready_r, info_r]
            init_pid = self._wait_ready(proc, ready_r, info_r, sdir)
            unsealed = attach_at_start(session_id, init_pid, helper_mounts) if helper_mounts else []
            if spec.from_snapshot:
                self._fill_tmp(sdir, init_pid)
            if not spec.network_policy.denies_all and not self._host_net(spec):
                gateway = self._start_gateway(session_id, sdir, init_pid, spec.network_policy)
            record = {
                "id": session_id,
                "backend": self.name,
                "spec": spec.to_json(),
                "state": SandboxState.RUNNING.value,
                "created": time.time(),
                "bwrap_pid": proc.pid,
                "init_pid": init_pid,
                "init_start": process_start_time(init_pid),
                "cgroup": cgroup.to_json() if cgroup is not None else None,
                "mounts": [
                    {"target": m.target, "access": m.access.value, "host_path": m.host_path}
                    for m in guest_mounts
                ],
                "owned_mounts": owned,
                "unsealed_mounts": unsealed,
                "uid": os.geteuid(),
                "network_policy": spec.network_policy.to_json(),
                "host_network": self._host_net(spec),
                "gateway": gateway.data if gateway is not None else None,
                "gateway_failures": [],
                "pool_owner": pool_owner,
            }
            self.store.write(session_id, record)
            self._children[session_id] = proc
            if limits.idle_timeout is not None and cgroup is not None:
                self._start_idle_watcher(session_id, limits.idle_timeout.total_seconds())
            return self._session_from(record)
        except BaseException:
            if gateway is not None:
                self._stop_gateway(session_id, gateway)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if cgroup is not None:
                with contextlib.suppress(Exception):
                    cgroup.destroy()
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            self.store.remove_session(session_id)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # --------------------------------------------------------------------------------------------- egress

    def _start_gateway(self, session_id: str, sdir: Path, init_pid: int, policy: NetworkPolicy) -> GatewayHandle:
        handle, proc = start_gateway(
            session_id,
            sdir,
            init_pid,
            policy,
            resolve=self.resolve,
            dns_upstream=self.dns_upstream,
            public_overrides=self.public_overrides,
        )
        self._gateways[session_id] = proc
        return handle

    def _stop_gateway(self, session_id: str, handle: GatewayHandle) -> None:
        handle.stop()
        proc = self._gateways.pop(session_id, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)

    def _ensure_gateway(self, record: dict[str, Any]) -> dict[str, Any]:
        """Fail closed, then recover: a dead gateway left the guest without egress; start a new one.

        The failure is recorded in the session (``metadata["gateway_failures"]``) so it is not silent.
        """
        data = record.get("gateway")
        if not data or GatewayHandle(data).alive() or not self._alive(record):
            return record
        session_id = record["id"]
        with record_lock(self.store.session_dir(session_id)):
            # Another exec (or process) may have restarted it meanwhile: decide again on the current record.
            current = self.store.read(session_id)
            if current is None:
                raise SessionNotFound(session_id)
            data = current.get("gateway")
            if not data or GatewayHandle(data).alive():
                return current
            return self._restart_gateway(current, data)

    def _restart_gateway(self, record: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        session_id = record["id"]
        old = self._gateways.pop(session_id, None)
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(timeout=1)
        policy = NetworkPolicy.parse(record["network_policy"])
        handle = self._start_gateway(
            session_id, self.store.session_dir(session_id), int(record["init_pid"]), policy
        )
        record["gateway"] = handle.data
        record.setdefault("gateway_failures", []).append({"time": time.time(), "pid": data.get("pid")})
        self.store.write(session_id, record)
        return record

    def _start_idle_watcher(self, session_id: str, idle_seconds: float) -> None:
        watcher = subprocess.Popen(  # detached: it must outlive this process, like the session does
            [sys.executable, "-m", "stockade.backends.bwrap._idle", str(self.store.root), session_id,
             str(idle_seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )
        self._watchers.append(watcher)

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready_r: int, info_r: int, sdir: Path) -> int:
        deadline = time.monotonic() + self.start_timeout
        ready = b""
        while b"\n" not in ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LifecycleError(f"the sandbox did not start within {self.start_timeout:.0f}s")
            readable, _, _ = select.select([ready_r], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(ready_r, 256)
                if not chunk:
                    break
                ready += chunk
            elif proc.poll() is not None:
                break
        if not ready.startswith(b"ready"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            log = (sdir / "bwrap.log").read_text(errors="replace").strip()[-2000:]
            raise LifecycleError(f"the sandbox failed to start: {log or 'bubblewrap exited'}")
        info = b""
        os.set_blocking(info_r, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(info_r, 4096):
                info += chunk
        try:
            return int(json.loads(info.decode())["child-pid"])
        except (ValueError, KeyError) as exc:
            raise LifecycleError(f"bubblewrap reported no child pid ({info[:200]!r})") from exc

    # ---------------------------------------------------------------------------------------------- lookup

    def _record(self, session_id: str) -> dict[str, Any]:
        validate_session_id(session_id)
        record = self.store.read(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        return record

    def _alive(self, record: dict[str, Any]) -> bool:
        start = process_start_time(int(record["init_pid"]))
        return start is not None and start == record.get("init_start")

    def _session_from(self, record: dict[str, Any]) -> SandboxSession:
        metadata = {
            "state_dir": str(self.store.session_dir(record["id"])),
            "init_pid": str(record["init_pid"]),
            "created": f"{record['created']:.3f}",
        }
        if record.get("unsealed_mounts"):
            # Read-only directories the kernel would not seal: plain binds, through which host sockets answer.
            metadata["unsealed_mounts"] = ",".join(record["unsealed_mounts"])
        if record.get("host_network"):
            metadata["network"] = "host"
        elif record.get("gateway"):
            gateway = GatewayHandle(record["gateway"])
            metadata["gateway_pid"] = str(gateway.pid)
            metadata["gateway"] = "running" if gateway.alive() else "down (no egress; restarted on next use)"
        failures = record.get("gateway_failures") or []
        if failures:
            metadata["gateway_failures"] = str(len(failures))
            metadata["gateway_last_failure"] = f"{failures[-1]['time']:.3f}"
        state = SandboxState(record["state"])
        if not self._alive(record):
            # The sandbox died under us (killed, host restart): say so; terminate still cleans up.
            metadata["health"] = "dead"
            metadata["error"] = "the sandbox process is gone; terminate the session to clean up"
        return SandboxSession(
            id=record["id"],
            backend=self.name,
            state=state,
            mounts=tuple(
                ResolvedMount(target=m["target"], access=FilesystemAccess(m["access"]), host_path=m["host_path"])
                for m in record["mounts"]
            ),
            metadata=metadata,
        )

    async def get_session(self, session_id: str) -> SandboxSession:
        return self._session_from(self._record(session_id))

    async def list_sessions(self) -> list[SandboxSession]:
        out = []
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            if record is not None:
                out.append(self._session_from(record))
        return out

    def _cgroup(self, record: dict[str, Any]) -> Any:
        if not record.get("cgroup"):
            return None
        # Cached per session: reattaching re-validates every path against the host's cgroup mounts, which
        # costs milliseconds, and a session's cgroup never moves.
        key = (record["id"], json.dumps(record["cgroup"], sort_keys=True))
        cached = self._cgroups.get(key)
        if cached is None:
            from ...linux import cgroups

            cached = cgroups.SessionCgroup.from_json(record["cgroup"], layout=self._cgroup_layout())
            self._cgroups[key] = cached
        return cached

    def _spec(self, record: dict[str, Any]) -> SandboxSpec:
        # A session's spec is fixed at provision: parse it once per session, not once per exec.
        cached = self._specs.get(record["id"])
        if cached is None:
            cached = self._specs[record["id"]] = SandboxSpec.parse(record["spec"])
        return cached

    # ------------------------------------------------------------------------------------------------ exec

    def _exec_payload(self, record: dict[str, Any], request: ExecRequest) -> dict[str, Any]:
        spec = self._spec(record)
        env = {
            "PATH": GUEST_PATH,
            "HOME": GUEST_HOME,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "STOCKADE_MEMORY_DIR": MEMORY_MOUNT,
            "STOCKADE_OUTPUTS_DIR": OUTPUTS_MOUNT,
            "HARN_MEMORY_DIR": MEMORY_MOUNT,
            "HARN_OUTPUTS_DIR": OUTPUTS_MOUNT,
        }
        if record.get("gateway"):
            env.update(proxy_env())
        env.update(spec.env)
        env.update(request.env)
        cwd = request.cwd or GUEST_HOME
        if not cwd.startswith("/"):
            cwd = f"{GUEST_HOME}/{cwd}"
        timeout = request.timeout or spec.limits.wall_time
        limit = spec.limits.output_limit_bytes or self.output_limit_bytes
        return {
            "op": "exec",
            "argv": request.argv,
            "cwd": cwd,
            "env": env,
            "stdin": request.stdin,
            "timeout": timeout.total_seconds() if timeout is not None else None,
            "max_output": limit,
        }

    async def _ready_record(self, session_id: str) -> dict[str, Any]:
        record = self._record(session_id)
        if record["state"] == SandboxState.SUSPENDED.value:
            await self.resume(session_id)
            record = self._record(session_id)
        if record.get("gateway"):
            record = await anyio.to_thread.run_sync(self._ensure_gateway, record)
        return record

    async def exec_stream(self, session_id: str, request: ExecRequest) -> AsyncIterator[ExecChunk | ExecResult]:
        record = await self._ready_record(session_id)
        payload = self._exec_payload(record, request)
        cgroup = self._cgroup(record)
        ooms_before = cgroup.oom_kills() if cgroup is not None else 0
        sock = str(self.store.session_dir(session_id) / "agent.sock")
        stdout, stderr = bytearray(), bytearray()
        try:
            async for kind, data in request_frames(sock, payload):
                if kind == "o":
                    stdout += data
                    yield ExecChunk("stdout", data)
                elif kind == "e":
                    stderr += data
                    yield ExecChunk("stderr", data)
                elif kind == "x":
                    body = json.loads(data)
                    raise ExecError(self._start_failure(request, body))
                elif kind == "r":
                    body = json.loads(data)
                    oom = False
                    if cgroup is not None and body.get("signal") == signal.SIGKILL and not body["timed_out"]:
                        oom = cgroup.oom_kills() > ooms_before
                    yield ExecResult(
                        stdout=stdout.decode("utf-8", errors="replace"),
                        stderr=stderr.decode("utf-8", errors="replace"),
                        exit_code=int(body["exit_code"]),
                        timed_out=bool(body["timed_out"]),
                        duration_ms=body.get("duration_ms"),
                        oom_killed=oom,
                        truncated=bool(body.get("truncated")),
                    )
        except AgentGone as exc:
            if self.store.read(session_id) is None:
                raise SessionNotFound(session_id) from exc
            if not self._alive(record):
                raise LifecycleError(
                    f"session {session_id!r} is not running (its sandbox process is gone); terminate it"
                ) from exc
            raise ExecError(f"lost the connection to the session agent: {exc}") from exc

    @staticmethod
    def _start_failure(request: ExecRequest, body: dict[str, Any]) -> str:
        if body.get("stage") == "cwd":
            return f"cannot change to directory {request.cwd!r}: {body.get('message')}"
        if body.get("errno") == 2:
            return f"command not found: {request.command!r}"
        return f"cannot start {request.command!r}: {body.get('message')}"

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        result: ExecResult | None = None
        async for item in self.exec_stream(session_id, request):
            if isinstance(item, ExecResult):
                result = item
        if result is None:
            raise ExecError("the session agent sent no result")
        return result

    # -------------------------------------------------------------------------------------------- mounts

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        record = self._record(session_id)
        reason = live_mounts_reason()
        if reason is not None:
            raise Unsupported(self.name, "attach_filesystem", reason)
        self._check_source(mount)
        if not self._alive(record):
            raise LifecycleError(f"session {session_id!r} is not running; terminate it")
        record = await anyio.to_thread.run_sync(attach_live, self.store, session_id, mount)
        self._specs.pop(session_id, None)  # the recorded spec now lists the new mount
        return self._session_from(record)

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        record = self._record(session_id)
        if record.get("host_network"):
            if policy.mode == "unrestricted":
                return self._session_from(record)
            raise Unsupported(
                self.name, "apply_network_policy", "a session sharing the host network cannot be narrowed"
            )
        if not policy.denies_all and not self._egress_available():
            raise Unsupported(self.name, "apply_network_policy", self._no_egress_reason())
        if not self._alive(record):
            raise LifecycleError(f"session {session_id!r} is not running; terminate it")
        return await anyio.to_thread.run_sync(self._apply_policy_blocking, record, policy)

    def _apply_policy_blocking(self, record: dict[str, Any], policy: NetworkPolicy) -> SandboxSession:
        session_id = record["id"]
        record = self._ensure_gateway(record)
        with record_lock(self.store.session_dir(session_id)):
            current = self.store.read(session_id)
            if current is None:
                raise SessionNotFound(session_id)
            return self._apply_policy_locked(current, policy)

    def _apply_policy_locked(self, record: dict[str, Any], policy: NetworkPolicy) -> SandboxSession:
        session_id = record["id"]
        if record.get("gateway"):
            reply = GatewayHandle(record["gateway"]).control({"op": "policy", "policy": gateway_policy_json(policy)})
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise NetworkPolicyError(f"the gateway refused the policy: {error.get('message', reply)}")
        elif not policy.denies_all:
            # A session that started deny-all gets its gateway (and the namespace's plumbing) now.
            sdir = self.store.session_dir(session_id)
            handle = self._start_gateway(session_id, sdir, int(record["init_pid"]), policy)
            record["gateway"] = handle.data
        record["network_policy"] = policy.to_json()
        self.store.write(session_id, record)
        return self._session_from(record)

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        record = self._record(session_id)
        path = self.store.session_dir(session_id) / "gateway" / "audit.jsonl"
        if record.get("host_network"):
            raise Unsupported(self.name, "network_log", "the session shares the host network: nothing is logged")
        entries = await anyio.to_thread.run_sync(_read_jsonl, path)
        return entries[-limit:] if limit else entries

    # --------------------------------------------------------------------------------- snapshot and resume

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        record = self._record(session_id)
        if self._cgroup(record) is None:
            # Walking guest-writable trees from the host is only race-free while the guest is frozen.
            raise Unsupported(self.name, "snapshot", "needs a cgroup freezer for a consistent, race-free capture")
        if not self._alive(record):
            raise LifecycleError(f"session {session_id!r} is not running; its files cannot be captured live")
        return await anyio.to_thread.run_sync(self._snapshot_blocking, record)

    def _snapshot_blocking(self, record: dict[str, Any]) -> SandboxSnapshot:
        session_id = record["id"]
        sdir = self.store.session_dir(session_id)
        cgroup = self._cgroup(record)
        snapshot_id = f"{session_id[:40]}-{secrets.token_hex(8)}"
        target = self.store.snapshot_dir(snapshot_id)
        target.mkdir(mode=0o700)
        archive = target / SNAPSHOT_ARCHIVE
        # Freezing makes the capture consistent: no exec writes while the archive is cut.
        was_frozen = record["state"] == SandboxState.SUSPENDED.value
        if cgroup is not None and not was_frozen:
            cgroup.freeze()
        try:
            members = {"outputs": sdir / "outputs", "memory": sdir / "memory"}
            for index, target_path in enumerate(record.get("owned_mounts", [])):
                members[f"mounts/{index}"] = self._owned_dir(record, target_path)
            members["tmp"] = Path(f"/proc/{record['init_pid']}/root/tmp")
            _write_archive(archive, members)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            if cgroup is not None and not was_frozen:
                cgroup.thaw()
        manifest = {
            "snapshot_id": snapshot_id,
            "session_id": session_id,
            "backend": self.name,
            "created": time.time(),
            "spec": record["spec"],
            "owned_mounts": record.get("owned_mounts", []),
            "archive": archive.name,
            "archive_bytes": archive.stat().st_size,
            "sha256": _sha256_file(archive),
            "keeps": "files",
        }
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return SandboxSnapshot(
            session_id=session_id,
            backend=self.name,
            snapshot_id=snapshot_id,
            metadata={
                "path": str(target),
                "archive_bytes": str(manifest["archive_bytes"]),
                "sha256": manifest["sha256"],
                "keeps": "files",
            },
        )

    def _owned_dir(self, record: dict[str, Any], target: str) -> Path:
        for mount in record["mounts"]:
            if mount["target"] == target:
                return Path(mount["host_path"])
        raise LifecycleError(f"session-owned mount {target!r} is missing from the session record")

    def _restore_files(self, snapshot_id: str, sdir: Path, mounts: list[GuestMount]) -> None:
        validate_session_id(snapshot_id, "from_snapshot")
        snap = self.store.snapshot_dir(snapshot_id)
        try:
            manifest = json.loads((snap / "manifest.json").read_text())
        except (OSError, ValueError):
            raise InvalidRequest(f"no snapshot with id {snapshot_id!r}", field="from_snapshot") from None
        archive = snap / str(manifest.get("archive", "archive.tar.gz"))
        if archive.parent != snap or not archive.is_file():
            raise LifecycleError(f"snapshot {snapshot_id!r} has no archive")
        if _sha256_file(archive) != manifest["sha256"]:
            raise LifecycleError(f"snapshot {snapshot_id!r} is corrupt (sha256 mismatch)")
        staging = sdir / "restore"
        try:
            _extract_archive(archive, staging)
        except (tarfile.TarError, OSError) as exc:
            raise LifecycleError(f"snapshot {snapshot_id!r} cannot be restored: {exc}") from exc
        for name in ("outputs", "memory"):
            src = staging / name
            if src.is_dir():
                shutil.rmtree(sdir / name)
                src.rename(sdir / name)
        owned_targets = manifest.get("owned_mounts", [])
        by_target = {m.target: m for m in mounts}
        for index, target in enumerate(owned_targets):
            src = staging / "mounts" / str(index)
            mount = by_target.get(target)
            if mount is not None and src.is_dir() and mount.host_path.startswith(str(sdir)):
                shutil.rmtree(mount.host_path)
                src.rename(mount.host_path)
        # /tmp is a tmpfs inside the sandbox; it is filled after start (see _fill_tmp).

    @staticmethod
    def _fill_tmp(sdir: Path, init_pid: int) -> None:
        # Safe to write through /proc/<pid>/root only now: the guest /tmp is a fresh tmpfs and no guest code
        # has run yet, so there is no symlink planted to redirect the copy onto the host.
        staging = sdir / "restore"
        src = staging / "tmp"
        if src.is_dir():
            shutil.copytree(src, f"/proc/{init_pid}/root/tmp", symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)

    async def resume(self, session_id: str) -> SandboxSession:
        record = self._record(session_id)
        if record["state"] != SandboxState.SUSPENDED.value:
            return self._session_from(record)
        cgroup = self._cgroup(record)
        if cgroup is None:
            raise Unsupported(self.name, "resume", "no cgroup freezer is available for this session")
        await anyio.to_thread.run_sync(cgroup.thaw)
        record["state"] = SandboxState.RUNNING.value
        self.store.write(session_id, record)
        return self._session_from(record)

    async def suspend(self, session_id: str) -> SandboxSession:
        """Freeze every process of the session (an extension; idle suspension uses the same path)."""
        record = self._record(session_id)
        cgroup = self._cgroup(record)
        if cgroup is None:
            raise Unsupported(self.name, "suspend", "no cgroup freezer is available for this session")
        if record["state"] == SandboxState.SUSPENDED.value:
            return self._session_from(record)
        await anyio.to_thread.run_sync(cgroup.freeze)
        record["state"] = SandboxState.SUSPENDED.value
        self.store.write(session_id, record)
        return self._session_from(record)

    # ------------------------------------------------------------------------------------------- terminate

    async def terminate(self, session_id: str) -> None:
        validate_session_id(session_id)
        # Claimed atomically: of two concurrent terminates, one does the work and the other is told the
        # session is gone. Claim and termination are one worker-thread call, so a cancelled caller cannot
        # leave the session claimed but running (see _cancel_safe).
        if not await anyio.to_thread.run_sync(self._discard, session_id):
            raise SessionNotFound(session_id)

    def _terminate_blocking(self, record: dict[str, Any]) -> None:
        session_id = record["id"]
        if record.get("gateway"):
            self._stop_gateway(session_id, GatewayHandle(record["gateway"]))
        cgroup = self._cgroup(record)
        if cgroup is not None:
            # Kills every process in the session, including ones that escaped the pid tree by double forks.
            cgroup.destroy()
        elif self._alive(record):
            # Killing pid 1 of the namespace takes every process of the namespace with it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["init_pid"]), signal.SIGKILL)
        bwrap_pid = int(record["bwrap_pid"])
        proc = self._children.pop(session_id, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        else:
            self._wait_gone(bwrap_pid, int(record["init_pid"]))
        self.store.remove_session(session_id)
        self._specs.pop(session_id, None)
        self._cgroups = {key: cg for key, cg in self._cgroups.items() if key[0] != session_id}
        self._watchers = [w for w in self._watchers if w.poll() is None]  # reap the ones that saw it go

    @staticmethod
    def _wait_gone(*pids: int) -> None:
        deadline = time.monotonic() + 5
        for pid in pids:
            # A zombie counts as gone: nothing runs there any more, and its parent (perhaps another process,
            # or pid 1, which reaps late here) may not reap it for a while.
            while time.monotonic() < deadline and process_start_time(pid) is not None:
                time.sleep(0.005)

    def gc(self) -> list[str]:
        """Terminate sessions whose sandbox is gone (its supervisor died), and warm-pool sandboxes whose owning
        process is gone; returns their ids."""
        reaped = []
        for session_id in self.store.terminating_ids(older_than=60.0):
            # A terminate that died half-way a while ago (its caller was killed): finish it.
            record = self.store.claim(session_id, again=True)
            if record is not None:
                self._terminate_blocking(record)
                reaped.append(session_id)
        for pool_id in self.store.pool_ids():
            record = self.store.read(pool_id)
            stale = record is not None and (not owner_alive(record) or not self._alive(record))
            if stale and (record := self.store.claim(pool_id)) is not None:
                self._terminate_blocking(record)
                reaped.append(pool_id)
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            dead = record is not None and not self._alive(record)
            if dead and (record := self.store.claim(session_id)) is not None:
                self._terminate_blocking(record)
                reaped.append(session_id)
        return reaped


SNAPSHOT_ARCHIVE = "archive.tar.zst"
# zstd at its fastest level: it passes incompressible data (most of a 100 MB workspace of
# build outputs and packages) through near memory speed, where gzip spent seconds on it.
_ZSTD_LEVEL = 1


def _write_archive(archive: Path, members: Mapping[str, Path]) -> None:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    with (
        open(archive, "wb") as raw,
        compressor.stream_writer(raw) as out,
        tarfile.open(fileobj=out, mode="w|") as tar,
    ):
        for name, path in members.items():
            tar.add(str(path), arcname=name, recursive=True)


def _extract_archive(archive: Path, staging: Path) -> None:
    if archive.name.endswith(".tar.gz"):  # snapshots taken before zstd
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter=_restore_filter)  # noqa: S202 - filtered: see _restore_filter
        return
    import zstandard

    with (
        open(archive, "rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        tar.extractall(staging, filter=_restore_filter)  # noqa: S202 - filtered: see _restore_filter


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


def _sha256_file(path: Path) -> str:
    # In blocks: a snapshot archive can be far larger than what should sit in memory at once.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
