"""The ``bwrap`` backend: long-lived bubblewrap sessions with an agent inside, cgroups and seccomp.

Where it differs from the contract's documentation (``stockade.backend``):

- Network: deny-all only (an empty network namespace with ``lo``). ``unrestricted`` and ``limited`` raise
  ``Unsupported`` until the egress gateway is wired in; nothing is ever silently widened.
- Resource limits need a writable cgroup hierarchy (root, or a delegated cgroup v2 subtree); without one,
  ``capabilities()`` says so and a spec with limits is refused.
- Snapshots keep files (outputs, memory, session-owned mounts, ``/tmp``), not processes. Suspend/resume (cgroup
  freezer) keeps processes.
- Live mounts (``attach_filesystem``) need root on the host.
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ...backend import ExecChunk, SandboxBackend
from ...errors import (
    ExecError,
    InvalidRequest,
    LifecycleError,
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
from ._client import AgentGone, request_frames, short_unix_path
from ._launch import GUEST_HOME, GUEST_PATH, GuestMount, LaunchPlan, bwrap_argv, find_guest_python
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
    ) -> None:
        self.store = SessionStore(Path(state_dir) if state_dir is not None else default_state_root())
        self.default_pids_max = default_pids_max
        self.default_tmp_mb = default_tmp_mb
        self.output_limit_bytes = output_limit_bytes
        self.start_timeout = start_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: list[subprocess.Popen[bytes]] = []
        self._layout: Any = None

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

    def capabilities(self) -> SandboxCapabilities:
        layout = self._cgroup_layout()
        cg = self._cgroups_writable()
        freeze = cg and layout.supports("freeze")
        return SandboxCapabilities(
            local_process_sandbox=True,
            network_policy=False,
            snapshot=freeze,
            resume=freeze,
            suspend_on_idle=freeze,
            filesystem_isolation=True,
            process_isolation=True,
            live_mounts=os.geteuid() == 0,
            memory_snapshot=False,
            resource_limits=cg,
            memory_limit=cg and layout.supports("memory"),
            pids_limit=cg and layout.supports("pids"),
            cpu_limit=cg and layout.supports("cpu"),
            network_deny_all=True,
            network_unrestricted=False,
            egress_log=False,
            exec_streaming=True,
            persistent_sessions=True,
        )

    # ------------------------------------------------------------------------------------------- provision

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.refuse_gaps(spec)
        if spec.network_policy.mode == "unrestricted" or not spec.network_policy.denies_all:
            raise Unsupported(self.name, "network_policy", "only deny-all networking is enforced so far")
        if spec.image is not None:
            raise Unsupported(self.name, "image", "bwrap sessions use the host's /usr, not images")
        for mount in spec.mounts:
            self._check_source(mount)
        session_id = spec.session_id or secrets.token_hex(16)
        return await anyio.to_thread.run_sync(self._provision_blocking, spec, session_id)

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

    def _provision_blocking(self, spec: SandboxSpec, session_id: str) -> SandboxSession:
        from ...linux import seccomp

        try:
            sdir = self.store.create_session_dir(session_id)
        except FileExistsError:
            raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id") from None
        cgroup: Any = None
        proc: subprocess.Popen[bytes] | None = None
        fds: list[int] = []
        try:
            outputs, memory = sdir / "outputs", sdir / "memory"
            outputs.mkdir()
            memory.mkdir()
            guest_mounts = [
                GuestMount(str(memory), MEMORY_MOUNT,
                           FilesystemAccess.READ_WRITE if spec.memory_writable else FilesystemAccess.READ_ONLY),
                GuestMount(str(outputs), OUTPUTS_MOUNT, FilesystemAccess.READ_WRITE),
            ]
            owned: list[str] = []
            for index, mount in enumerate(spec.mounts):
                source = mount.source
                if not source:
                    owned_dir = sdir / "mounts" / str(index)
                    owned_dir.mkdir(parents=True)
                    source = str(owned_dir)
                    owned.append(mount.target)
                guest_mounts.append(GuestMount(source, mount.target, mount.access))
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
            plan = LaunchPlan(
                state_dir=sdir,
                python=python,
                python_binds=python_binds,
                mounts=tuple(guest_mounts),
                tmp_bytes=(limits.tmp_mb or self.default_tmp_mb) << 20,
                hostname="stockade",
                listen_fd=fds[0],
                ready_fd=ready_w,
                seccomp_fd=seccomp_fd,
                info_fd=info_w,
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
                    pass_fds=(fds[0], ready_w, info_w, seccomp_fd),
                    start_new_session=True,
                    preexec_fn=preexec,
                    # Nothing of the caller's environment may reach the sandbox, not even bwrap's own.
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                )
            finally:
                log.close()
            for fd in (ready_w, info_w, seccomp_fd, fds[0]):
                os.close(fd)
            fds = [ready_r, info_r]
            init_pid = self._wait_ready(proc, ready_r, info_r, sdir)
            if spec.from_snapshot:
                self._fill_tmp(sdir, init_pid)
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
                "uid": os.geteuid(),
            }
            self.store.write(session_id, record)
            self._children[session_id] = proc
            if limits.idle_timeout is not None and cgroup is not None:
                self._start_idle_watcher(session_id, limits.idle_timeout.total_seconds())
            return self._session_from(record)
        except BaseException:
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
        from ...linux import cgroups

        return cgroups.SessionCgroup.from_json(record["cgroup"])

    # ------------------------------------------------------------------------------------------------ exec

    def _exec_payload(self, record: dict[str, Any], request: ExecRequest) -> dict[str, Any]:
        spec = SandboxSpec.parse(record["spec"])
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
        raise Unsupported(self.name, "attach_filesystem", "live mounts are not implemented yet")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        record = self._record(session_id)
        if policy.denies_all:
            spec = SandboxSpec.parse(record["spec"])
            if spec.network_policy.denies_all:
                return self._session_from(record)
        raise Unsupported(self.name, "apply_network_policy", "only deny-all networking is enforced so far")

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
        archive = target / "archive.tar.gz"
        # Freezing makes the capture consistent: no exec writes while the archive is cut.
        was_frozen = record["state"] == SandboxState.SUSPENDED.value
        if cgroup is not None and not was_frozen:
            cgroup.freeze()
        try:
            members = {"outputs": sdir / "outputs", "memory": sdir / "memory"}
            for index, target_path in enumerate(record.get("owned_mounts", [])):
                members[f"mounts/{index}"] = self._owned_dir(record, target_path)
            members["tmp"] = Path(f"/proc/{record['init_pid']}/root/tmp")
            with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
                for name, path in members.items():
                    tar.add(str(path), arcname=name, recursive=True)
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
        archive = snap / "archive.tar.gz"
        if _sha256_file(archive) != manifest["sha256"]:
            raise LifecycleError(f"snapshot {snapshot_id!r} is corrupt (sha256 mismatch)")
        staging = sdir / "restore"
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
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
        record = self._record(session_id)
        await anyio.to_thread.run_sync(self._terminate_blocking, record)

    def _terminate_blocking(self, record: dict[str, Any]) -> None:
        session_id = record["id"]
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
        self._watchers = [w for w in self._watchers if w.poll() is None]  # reap the ones that saw it go

    @staticmethod
    def _wait_gone(*pids: int) -> None:
        deadline = time.monotonic() + 5
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.005)

    def gc(self) -> list[str]:
        """Terminate sessions whose sandbox is gone (its supervisor died); returns their ids."""
        reaped = []
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            if record is not None and not self._alive(record):
                self._terminate_blocking(record)
                reaped.append(session_id)
        return reaped


def _sha256_file(path: Path) -> str:
    # In blocks: a snapshot archive can be far larger than what should sit in memory at once.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
