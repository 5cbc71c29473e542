"""The ``landlock`` backend: confinement without namespaces or root, for hosts where bubblewrap cannot run.

Every command of a session runs under one Landlock domain (the best ABI the kernel offers), the shared
seccomp profile with unix sockets only, no_new_privs, rlimits and a cleared environment; a per-session
supervisor (``_supervisor.py``) tracks every process a session starts and kills them all at ``terminate``.
When the host user is root, commands also run under a per-session uid and gid, so that they own no host file
and can signal no host process. See ``docs/landlock.md`` for the full account.

Where it differs from the contract's documentation (``stockade.backend``):

- **No private filesystem view.** The guest sees host paths: a mount is its host source granted in place,
  and the mount ``target`` is only a name that ``cwd`` and environment values are translated from (as in
  harn's local sandbox). ``ResolvedMount.host_path`` says where the guest finds each mount, and
  ``STOCKADE_*_DIR``/``HARN_*_DIR`` hold host paths. ``/tmp`` is the host's and not writable; ``TMPDIR`` is
  the session's.
- **No process isolation.** The host's process list, command lines and hostname stay visible.
- **Network**: deny-all only. ``limited`` and ``unrestricted`` raise ``Unsupported`` until the egress gateway
  is wired in. Under deny-all the guest cannot create IP sockets at all, so there is no loopback either.
- **Limits**: ``memory_mb`` bounds each process's address space (RLIMIT_AS), not the session's total;
  ``pids_max`` (RLIMIT_NPROC of the per-session uid) only when the host user is root; ``tmp_mb`` caps the
  size of each file written (RLIMIT_FSIZE), not the total; no CPU limit.
- **Snapshots** keep files (home, TMPDIR, outputs, memory, session-owned mounts), captured by ``tar`` run
  inside the session's own confinement, so a guest-planted symlink can never pull a host file into an
  archive. **Suspend/resume** stops and continues every process of the session (SIGSTOP/SIGCONT).
- **Live mounts** are ``Unsupported``: a Landlock domain can only narrow.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ...backend import ExecChunk, SandboxBackend
from ...errors import (
    BackendUnavailable,
    ExecError,
    InvalidRequest,
    LifecycleError,
    SessionNotFound,
    Unsupported,
)
from ...linux import landlock
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
from .._cancel_safe import provision_in_thread, run_to_end
from ._client import SupervisorGone, SupervisorReply, request, request_frames, short_unix_path
from ._policy import MountPlan, SessionPaths, guest_env, resolve_cwd, seccomp_network, session_ruleset
from ._store import SessionStore, default_state_root, process_start_time

__all__ = ["LandlockBackend", "probe"]

DEFAULT_OUTPUT_LIMIT = 16 << 20
DEFAULT_PIDS_MAX = 512
DEFAULT_NOFILE = 4096
# Per-session uids (root mode) are drawn from here: far above login and system ranges and the usual
# subordinate-id ranges of user namespaces.
UID_BASE = 1_500_000_000
UID_SPAN = 100_000_000
_SUPERVISOR = Path(__file__).with_name("_supervisor.py")
_NETWORK_REASON = (
    "the egress gateway is not wired into the landlock backend yet; only deny-all networking is enforced"
)


def probe() -> str | None:
    """None when landlock sessions can start here, else what is missing and how to fix it."""
    try:
        abi = landlock.abi_version()
    except OSError as exc:
        return f"cannot query Landlock: {exc}"
    if abi < 1:
        return ("the kernel has no Landlock: it needs Linux 5.13+ with 'landlock' in the lsm= boot parameter "
                "(CONFIG_SECURITY_LANDLOCK)")
    try:
        from ...linux import seccomp

        seccomp.compile_bpf(seccomp.default_profile(seccomp_network()))
    except Exception as exc:
        return f"cannot build the seccomp filter ({exc}); apt-get install libseccomp2"
    if not os.path.isdir("/proc/self"):
        return "/proc is not mounted"
    return None


# Calls Landlock does not control (at any ABI, or below ABI 3 for truncate) that a second seccomp program
# refuses. Extended attributes: EOPNOTSUPP, which tools such as `cp -a` take as "this filesystem has none".
_XATTR_WRITES = ("setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr")
# Newer than libseccomp 2.5.4 knows: refused by number (the same on every architecture's unified table).
_XATTR_AT = {"setxattrat": 463, "removexattrat": 466}
_NUMBERED_ARCHES = ("X86_64", "AARCH64")


def _export(flt: Any) -> bytes:
    import io

    fd = os.memfd_create("stockade-extra", os.MFD_CLOEXEC)
    with io.FileIO(fd, "r+") as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def _extra_programs(refuse_truncate: bool) -> list[bytes]:
    """seccomp programs stacked on the shared profile for what Landlock leaves open: writing extended
    attributes (a read-only mount's files would otherwise take them), and truncate(2) by path below ABI 3
    (ftruncate stays: it needs an fd opened for writing, which Landlock controls)."""
    import pyseccomp as sc

    named = sc.SyscallFilter(sc.ALLOW)
    native = int(sc.system_arch())
    compat = {int(sc.Arch.X86_64): (sc.Arch.X86, sc.Arch.X32), int(sc.Arch.AARCH64): (sc.Arch.ARM,)}
    for arch in compat.get(native, ()):
        named.add_arch(arch)
    named.set_attr(sc.Attr.ACT_BADARCH, sc.ALLOW)  # the shared profile already kills unknown ABIs
    for name in _XATTR_WRITES:
        named.add_rule(sc.ERRNO(errno.EOPNOTSUPP), name)
    if refuse_truncate:
        for name in ("truncate", "truncate64"):
            if any(int(sc.resolve_syscall(a, name)) >= 0 for a in (native, *map(int, compat.get(native, ())))):
                named.add_rule(sc.ERRNO(errno.EPERM), name)
    programs = [_export(named)]
    unknown = [nr for name, nr in _XATTR_AT.items() if int(sc.resolve_syscall(native, name)) < 0]
    if unknown and any(native == int(getattr(sc.Arch, a)) for a in _NUMBERED_ARCHES):
        numbered = sc.SyscallFilter(sc.ALLOW)
        numbered.set_attr(sc.Attr.ACT_BADARCH, sc.ALLOW)
        for nr in unknown:
            numbered.add_rule(sc.ERRNO(errno.EOPNOTSUPP), nr)
        programs.append(_export(numbered))
    elif not unknown:
        for name in _XATTR_AT:
            named.add_rule(sc.ERRNO(errno.EOPNOTSUPP), name)
        programs[0] = _export(named)
    return programs


class LandlockBackend(SandboxBackend):
    """Sessions confined by Landlock, seccomp and rlimits, without namespaces. Options:

    ``state_dir``: where sessions and snapshots live (default: ``$STOCKADE_STATE_DIR/landlock``,
    ``/var/lib/stockade/landlock`` for root, ``$XDG_STATE_HOME/stockade/landlock`` otherwise).
    ``per_session_uid``: run commands under a fresh uid per session (default: when the host user is root;
    needs root). ``default_pids_max``: the process cap with a per-session uid when a spec gives none.
    ``output_limit_bytes``: captured output per stream. ``abi``: use at most this Landlock ABI (tests and
    downgrades; never more than the kernel's).
    """

    name = "landlock"

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        per_session_uid: bool | None = None,
        default_pids_max: int = DEFAULT_PIDS_MAX,
        nofile: int = DEFAULT_NOFILE,
        output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT,
        start_timeout: float = 15.0,
        abi: int | None = None,
    ) -> None:
        self.per_session_uid = os.geteuid() == 0 if per_session_uid is None else per_session_uid
        if self.per_session_uid and os.geteuid() != 0:
            raise BackendUnavailable(self.name, "per_session_uid needs root (it switches commands to a fresh uid)")
        self.store = SessionStore(
            Path(state_dir) if state_dir is not None else default_state_root(), shared=self.per_session_uid
        )
        self.default_pids_max = default_pids_max
        self.nofile = nofile
        self.output_limit_bytes = output_limit_bytes
        self.start_timeout = start_timeout
        kernel_abi = landlock.abi_version()
        self.abi = kernel_abi if abi is None else min(abi, kernel_abi)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------------------------------ capabilities

    def capabilities(self) -> SandboxCapabilities:
        return SandboxCapabilities(
            local_process_sandbox=True,
            network_policy=False,
            snapshot=True,
            resume=True,
            suspend_on_idle=True,
            filesystem_isolation=self.abi >= 1,
            process_isolation=False,
            live_mounts=False,
            memory_snapshot=False,
            resource_limits=True,
            # Per process (RLIMIT_AS), not per session: see the module docstring and docs/landlock.md.
            memory_limit=True,
            # RLIMIT_NPROC counts every process of a uid: a session limit only with a uid of its own.
            pids_limit=self.per_session_uid,
            cpu_limit=False,
            network_deny_all=self.abi >= 1,
            network_unrestricted=False,
            egress_log=False,
            exec_streaming=True,
            persistent_sessions=True,
            # Mounts are granted in place at their host paths; /tmp is the host's, TMPDIR the session's.
            private_filesystem_view=False,
            private_loopback=False,
            private_mount_sources=False,
        )

    def enforcement(self, connect_port: int | None = None) -> landlock.Enforcement:
        """What Landlock enforces for a session on this kernel, and what it leaves uncontrolled."""
        paths = SessionPaths("/", "/", "/", (MountPlan(OUTPUTS_MOUNT, "/", FilesystemAccess.READ_WRITE),
                                             MountPlan(MEMORY_MOUNT, "/", FilesystemAccess.READ_ONLY)))
        return landlock.plan(session_ruleset(paths, connect_port=connect_port), self.abi).enforcement

    # ------------------------------------------------------------------------------------------- provision

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.refuse_gaps(spec)
        if not spec.network_policy.denies_all:
            raise Unsupported(self.name, "network_policy", _NETWORK_REASON)
        if spec.image is not None:
            raise Unsupported(self.name, "image", "landlock sessions use the host's own system, not images")
        for mount in spec.mounts:
            self._check_source(mount)
        session_id = spec.session_id or secrets.token_hex(16)
        return await provision_in_thread(lambda: self._provision_blocking(spec, session_id), self._discard)

    def _discard(self, session_id: str) -> None:
        """End a session nobody was handed (its provision was cancelled), blocking: as terminate does."""
        record = self.store.read(session_id)
        if record is not None and self.store.claim(session_id):
            anyio.run(self._ask_to_end, record)  # in a worker thread, which has no event loop of its own
            self._terminate_blocking(record)

    @staticmethod
    def _check_source(mount: FilesystemMount) -> None:
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
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise InvalidRequest(f"{mount.source!r} is neither a directory nor a file", field="mounts.source")

    def _allocate_uid(self) -> int:
        taken = {int(r["uid"]) for r in map(self.store.read, self.store.ids()) if r and r.get("uid") is not None}
        live = _process_uids()
        for _ in range(1000):
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid in taken or uid in live:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid
        raise LifecycleError("could not find a free per-session uid")

    def _provision_blocking(self, spec: SandboxSpec, session_id: str) -> SandboxSession:
        try:
            sdir = self.store.create_session_dir(session_id)
        except FileExistsError:
            raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id") from None
        proc: subprocess.Popen[bytes] | None = None
        fds: list[int] = []
        try:
            uid = gid = None
            if self.per_session_uid:
                uid = gid = self._allocate_uid()
            paths, owned = self._make_dirs(spec, sdir, uid)
            if spec.from_snapshot:
                self._restore_files(spec.from_snapshot, spec, paths, uid)
            ruleset_fd, enforcement = landlock.create_ruleset(session_ruleset(paths), self.abi)
            fds.append(ruleset_fd)
            seccomp_fds = self._seccomp_fds(enforcement)
            fds += seccomp_fds
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock_path = sdir / "control.sock"
            with short_unix_path(str(sock_path)) as short:
                listener.bind(short)
            os.chmod(sock_path, 0o600)
            listener.listen(64)
            listen_fd = listener.detach()
            fds.append(listen_fd)
            ready_r, ready_w = os.pipe()
            fds += [ready_r, ready_w]
            token = secrets.token_hex(32)
            limits = spec.limits
            rlimits: dict[str, int] = {"RLIMIT_NOFILE": self.nofile, "RLIMIT_CORE": 0}
            if uid is not None:
                rlimits["RLIMIT_NPROC"] = limits.pids_max or self.default_pids_max
            exec_rlimits: dict[str, int] = {}
            if limits.memory_mb is not None:
                exec_rlimits["RLIMIT_AS"] = limits.memory_mb << 20
            if limits.tmp_mb is not None:
                exec_rlimits["RLIMIT_FSIZE"] = limits.tmp_mb << 20
            config = {
                "token": token,
                "uid": uid,
                "gid": gid,
                "home": paths.home,
                "rlimits": rlimits,
                "exec_rlimits": exec_rlimits,
                "idle_timeout": limits.idle_timeout.total_seconds() if limits.idle_timeout else None,
            }
            log = open(sdir / "supervisor.log", "wb")  # noqa: SIM115 - handed to the child, closed below
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", str(_SUPERVISOR), str(listen_fd), str(ruleset_fd),
                     str(ready_w), *map(str, seccomp_fds)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    close_fds=True,
                    pass_fds=(listen_fd, ruleset_fd, ready_w, *seccomp_fds),
                    start_new_session=True,
                    env={"LANG": "C.UTF-8"},  # nothing of the caller's environment reaches the session
                    cwd="/",
                )
            finally:
                log.close()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(config).encode())
            proc.stdin.close()
            for fd in fds:
                if fd != ready_r:
                    os.close(fd)
            fds = [ready_r]
            self._wait_ready(proc, ready_r, sdir)
            record = {
                "id": session_id,
                "backend": self.name,
                "spec": spec.to_json(),
                "created": time.time(),
                "supervisor_pid": proc.pid,
                "supervisor_start": process_start_time(proc.pid),
                "token": token,
                "uid": uid,
                "gid": gid,
                "paths": {"root": paths.root, "home": paths.home, "tmp": paths.tmp},
                "mounts": [
                    {"target": m.target, "access": m.access.value, "host_path": m.host_path, "owned": m.owned}
                    for m in paths.mounts
                ],
                "owned_mounts": owned,
                "enforcement": enforcement.to_json(),
                "state": SandboxState.RUNNING.value,
            }
            self.store.write(session_id, record)
            self._children[session_id] = proc
            return self._session_from(record, SandboxState.RUNNING)
        except BaseException:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            self.store.remove_session(session_id)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _make_dirs(self, spec: SandboxSpec, sdir: Path, uid: int | None) -> tuple[SessionPaths, list[str]]:
        root = sdir / "root"
        gid = uid
        root.mkdir(mode=0o750 if uid is not None else 0o700)
        guest_owned: list[Path] = []

        def make(path: Path, writable: bool) -> str:
            path.mkdir(parents=True, mode=0o700 if writable else 0o750)
            if writable:
                guest_owned.append(path)
            return str(path)

        home, tmp = make(root / "home", True), make(root / "tmp", True)
        mounts = [
            MountPlan(MEMORY_MOUNT, make(root / "memory", spec.memory_writable),
                      FilesystemAccess.READ_WRITE if spec.memory_writable else FilesystemAccess.READ_ONLY, True),
            MountPlan(OUTPUTS_MOUNT, make(root / "outputs", True), FilesystemAccess.READ_WRITE, True),
        ]
        owned: list[str] = []
        for index, mount in enumerate(spec.mounts):
            if mount.source:
                mounts.append(MountPlan(mount.target, mount.source, mount.access))
            else:
                host = make(root / "mounts" / str(index), mount.access is FilesystemAccess.READ_WRITE)
                mounts.append(MountPlan(mount.target, host, mount.access, True))
                owned.append(mount.target)
        if uid is not None and gid is not None:
            # Root mode: the guest's uid owns what it may write; read-only session dirs stay the host user's,
            # readable through the session's group only.
            for path in [root, *root.rglob("*")]:
                os.chown(path, uid if path in guest_owned else -1, gid, follow_symlinks=False)
        paths = SessionPaths(str(root), home, tmp, tuple(mounts))
        return paths, owned

    def _seccomp_fds(self, enforcement: landlock.Enforcement) -> list[int]:
        from ...linux import seccomp

        fds = [seccomp.bpf_fd(seccomp.default_profile(seccomp_network()))]
        for program in _extra_programs(refuse_truncate=not enforcement.fs & landlock.FsAccess.TRUNCATE):
            fd = os.memfd_create("stockade-extra", os.MFD_CLOEXEC)
            os.write(fd, program)
            os.lseek(fd, 0, os.SEEK_SET)
            fds.append(fd)
        return fds

    def _wait_ready(self, proc: subprocess.Popen[bytes], ready_r: int, sdir: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        ready = b""
        while b"\n" not in ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LifecycleError(f"the session supervisor did not start within {self.start_timeout:.0f}s")
            readable, _, _ = select.select([ready_r], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(ready_r, 512)
                if not chunk:
                    break
                ready += chunk
            elif proc.poll() is not None:
                break
        if ready.startswith(b"ready"):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        log = (sdir / "supervisor.log").read_text(errors="replace").strip()[-2000:]
        why = ready.decode(errors="replace").strip().removeprefix("error ") or log or "the supervisor exited"
        raise LifecycleError(f"the session failed to start: {why}")

    # ---------------------------------------------------------------------------------------------- views

    def _record(self, session_id: str) -> dict[str, Any]:
        validate_session_id(session_id)
        record = self.store.read(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        return record

    @staticmethod
    def _alive(record: dict[str, Any]) -> bool:
        pid = int(record["supervisor_pid"])
        start = process_start_time(pid)
        if start is None or start != record.get("supervisor_start"):
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        return state[state.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")

    @staticmethod
    def _paths(record: dict[str, Any]) -> SessionPaths:
        mounts = tuple(
            MountPlan(m["target"], m["host_path"], FilesystemAccess(m["access"]), bool(m.get("owned")))
            for m in record["mounts"]
        )
        p = record["paths"]
        return SessionPaths(p["root"], p["home"], p["tmp"], mounts)

    def _sock(self, session_id: str) -> str:
        return str(self.store.session_dir(session_id) / "control.sock")

    async def _state(self, record: dict[str, Any]) -> SandboxState:
        if not self._alive(record):
            return SandboxState.RUNNING  # reported as dead in metadata; terminate cleans it up
        try:
            status = await request(self._sock(record["id"]), {"token": record["token"], "op": "ping"})
        except (SupervisorGone, SupervisorReply):
            return SandboxState.RUNNING
        return SandboxState.SUSPENDED if status.get("suspended") else SandboxState.RUNNING

    def _session_from(self, record: dict[str, Any], state: SandboxState) -> SandboxSession:
        enforcement = record.get("enforcement", {})
        paths = record["paths"]
        metadata = {
            "landlock_abi": str(enforcement.get("abi", "")),
            "home": paths["home"],
            "tmpdir": paths["tmp"],
            "root": paths["root"],
            # The per-session supervisor every exec is forked from: the session's own idle footprint (bench/).
            "supervisor_pid": str(record["supervisor_pid"]),
            "uid": str(record["uid"]) if record.get("uid") is not None else "host user",
            "memory_limit_scope": "per process (RLIMIT_AS), not per session",
            "not_enforced": "; ".join(enforcement.get("gaps", [])),
        }
        if not self._alive(record):
            metadata["health"] = "dead"
            metadata["detail"] = "the session supervisor is gone; terminate the session to clean up"
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
        record = self._record(session_id)
        return self._session_from(record, await self._state(record))

    async def list_sessions(self) -> list[SandboxSession]:
        out = []
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            if record is not None:
                out.append(self._session_from(record, await self._state(record)))
        return out

    # ------------------------------------------------------------------------------------------------ exec

    def _exec_body(self, record: dict[str, Any], request: ExecRequest, max_output: int | None = None) -> dict[str, Any]:
        spec = SandboxSpec.parse(record["spec"])
        paths = self._paths(record)
        timeout = request.timeout or spec.limits.wall_time
        return {
            "token": record["token"],
            "op": "exec",
            "argv": request.argv,
            "cwd": resolve_cwd(request.cwd, paths),
            "env": guest_env(paths, spec.env, request.env),
            "stdin": request.stdin,
            "timeout": timeout.total_seconds() if timeout is not None else None,
            "max_output": max_output or spec.limits.output_limit_bytes or self.output_limit_bytes,
        }

    async def _frames(self, record: dict[str, Any], body: dict[str, Any]) -> AsyncIterator[tuple[str, bytes]]:
        session_id = record["id"]
        try:
            async for frame in request_frames(self._sock(session_id), body):
                yield frame
        except SupervisorGone as exc:
            if self.store.read(session_id) is None:
                raise SessionNotFound(session_id) from exc
            if not self._alive(record):
                raise LifecycleError(
                    f"session {session_id!r} is not running (its supervisor is gone); terminate it"
                ) from exc
            raise ExecError(f"lost the connection to the session supervisor: {exc}") from exc

    async def exec_stream(self, session_id: str, request: ExecRequest) -> AsyncIterator[ExecChunk | ExecResult]:
        record = self._record(session_id)
        body = self._exec_body(record, request)
        stdout, stderr = bytearray(), bytearray()
        async for kind, data in self._frames(record, body):
            if kind == "o":
                stdout += data
                yield ExecChunk("stdout", data)
            elif kind == "e":
                stderr += data
                yield ExecChunk("stderr", data)
            elif kind == "x":
                raise ExecError(self._start_failure(request, json.loads(data)))
            elif kind == "r":
                result = json.loads(data)
                yield ExecResult(
                    stdout=stdout.decode("utf-8", errors="replace"),
                    stderr=stderr.decode("utf-8", errors="replace"),
                    exit_code=int(result["exit_code"]),
                    timed_out=bool(result["timed_out"]),
                    duration_ms=result.get("duration_ms"),
                    truncated=bool(result.get("truncated")),
                )

    @staticmethod
    def _start_failure(request: ExecRequest, body: dict[str, Any]) -> str:
        if body.get("error") != "start_failed":
            return f"the session supervisor refused the exec: {body.get('message')}"
        if body.get("stage") == "cwd":
            return f"cannot change to directory {request.cwd!r}: {body.get('message')}"
        if body.get("errno") == 2:
            return f"command not found: {request.command!r}"
        if body.get("errno") == 13:
            return (f"cannot start {request.command!r}: permission denied (executables must be under the system "
                    "paths, the session's directories or a mount)")
        return f"cannot start {request.command!r}: {body.get('message')}"

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        result: ExecResult | None = None
        async for item in self.exec_stream(session_id, request):
            if isinstance(item, ExecResult):
                result = item
        if result is None:
            raise ExecError("the session supervisor sent no result")
        return result

    # -------------------------------------------------------------------------------------------- mounts

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        self._record(session_id)
        raise Unsupported(self.name, "attach_filesystem",
                          "a Landlock domain can only be narrowed, never widened, while its processes live")

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        record = self._record(session_id)
        if policy.denies_all:
            return self._session_from(record, await self._state(record))  # deny-all is all a session ever has
        raise Unsupported(self.name, "apply_network_policy", _NETWORK_REASON)

    # --------------------------------------------------------------------------------- snapshot and resume

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        record = self._record(session_id)
        if not self._alive(record):
            raise LifecycleError(f"session {session_id!r} is not running; its files cannot be captured")
        snapshot_id = f"{session_id[:40]}-{secrets.token_hex(8)}"
        target = self.store.snapshot_dir(snapshot_id)
        target.mkdir(mode=0o700)
        try:
            archive = target / "archive.tar.gz"
            await self._capture(record, archive)
            manifest = {
                "snapshot_id": snapshot_id,
                "session_id": session_id,
                "backend": self.name,
                "created": time.time(),
                "spec": record["spec"],
                "owned_mounts": record.get("owned_mounts", []),
                "archive_bytes": archive.stat().st_size,
                "sha256": await anyio.to_thread.run_sync(_sha256_file, archive),
                "keeps": "files",
            }
            (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return SandboxSnapshot(
            session_id=session_id,
            backend=self.name,
            snapshot_id=snapshot_id,
            metadata={"path": str(target), "archive_bytes": str(manifest["archive_bytes"]),
                      "sha256": str(manifest["sha256"]), "keeps": "files"},
        )

    async def _capture(self, record: dict[str, Any], archive: Path) -> None:
        # tar runs as a command of the session itself: it reads with the guest's rights and nothing more, so a
        # symlink the guest planted cannot make the capture read a host file.
        paths = self._paths(record)
        members = ["home", "tmp", "outputs", "memory"]
        if (Path(paths.root) / "mounts").is_dir():
            members.append("mounts")
        tar = ExecRequest(command="tar", args=("-czf", "-", "-C", paths.root, "--", *members))
        body = self._exec_body(record, tar, max_output=1 << 40)
        body["timeout"] = None
        stderr = bytearray()
        result: dict[str, Any] = {}
        async with await anyio.open_file(archive, "wb") as out:
            async for kind, data in self._frames(record, body):
                if kind == "o":
                    await out.write(data)
                elif kind == "e":
                    stderr += data[:4096]
                elif kind == "x":
                    raise LifecycleError(f"the snapshot could not start tar: {json.loads(data).get('message')}")
                elif kind == "r":
                    result = json.loads(data)
        # tar exits 1 when a file changed while it was read (a command was writing): the capture is still whole.
        if result.get("exit_code") not in (0, 1) or result.get("truncated"):
            detail = stderr.decode(errors="replace")
            raise LifecycleError(f"the snapshot's tar failed ({result.get('exit_code')}): {detail}")

    def _restore_files(self, snapshot_id: str, spec: SandboxSpec, paths: SessionPaths, uid: int | None) -> None:
        validate_session_id(snapshot_id, "from_snapshot")
        snap = self.store.snapshot_dir(snapshot_id)
        try:
            manifest = json.loads((snap / "manifest.json").read_text())
        except (OSError, ValueError):
            raise InvalidRequest(f"no snapshot with id {snapshot_id!r}", field="from_snapshot") from None
        archive = snap / "archive.tar.gz"
        if _sha256_file(archive) != manifest["sha256"]:
            raise LifecycleError(f"snapshot {snapshot_id!r} is corrupt (sha256 mismatch)")
        root = Path(paths.root)
        staging = root.parent / "restore"
        staging.mkdir(mode=0o700)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter=_restore_filter)  # noqa: S202 - the filter below keeps it inside
            destinations = {"home": Path(paths.home), "tmp": Path(paths.tmp), "outputs": Path(paths.outputs),
                            "memory": Path(paths.memory)}
            for index, target in enumerate(manifest.get("owned_mounts", [])):
                with contextlib.suppress(KeyError):
                    plan = paths.mount(target)
                    if plan.owned:
                        destinations[f"mounts/{index}"] = Path(plan.host_path)
            for name, dest in destinations.items():
                src = staging / name
                if not src.is_dir() or src.is_symlink():
                    continue
                owner = dest.stat()
                for child in src.iterdir():
                    child.rename(dest / child.name)
                if uid is not None:
                    for path in dest.rglob("*"):
                        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def resume(self, session_id: str) -> SandboxSession:
        record = self._record(session_id)
        await self._control(record, "resume")
        return self._session_from(record, SandboxState.RUNNING)

    async def suspend(self, session_id: str) -> SandboxSession:
        """Stop every process of the session (SIGSTOP) until :meth:`resume` or the next exec (an extension)."""
        record = self._record(session_id)
        await self._control(record, "suspend")
        return self._session_from(record, SandboxState.SUSPENDED)

    async def _control(self, record: dict[str, Any], op: str) -> dict[str, Any]:
        try:
            return await request(self._sock(record["id"]), {"token": record["token"], "op": op})
        except SupervisorGone as exc:
            raise LifecycleError(f"session {record['id']!r} is not running (its supervisor is gone)") from exc
        except SupervisorReply as exc:
            raise LifecycleError(f"the session supervisor refused {op}: {exc}") from exc

    # ------------------------------------------------------------------------------------------- terminate

    async def terminate(self, session_id: str) -> None:
        record = self._record(session_id)
        if not self.store.claim(session_id):
            raise SessionNotFound(session_id)  # a concurrent terminate got there first
        # Claimed: it must now end whatever happens to the caller (see _cancel_safe).
        await run_to_end(lambda: self._end_claimed(record))

    async def _end_claimed(self, record: dict[str, Any]) -> None:
        await self._ask_to_end(record)
        await anyio.to_thread.run_sync(self._terminate_blocking, record)

    async def _ask_to_end(self, record: dict[str, Any]) -> None:
        """Ask the supervisor to end its session (what it cannot do within 15 s, _terminate_blocking forces)."""
        if self._alive(record):
            with anyio.move_on_after(15), contextlib.suppress(SupervisorGone, SupervisorReply):
                await request(self._sock(record["id"]), {"token": record["token"], "op": "terminate"})

    def _terminate_blocking(self, record: dict[str, Any]) -> None:
        session_id = record["id"]
        pid = int(record["supervisor_pid"])
        proc = self._children.pop(session_id, None)
        deadline = time.monotonic() + 5
        while self._alive(record) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._alive(record):
            # It did not answer: kill it; its descendants are then orphans, found below by uid where possible.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if record.get("uid") is not None:
            _kill_uid(int(record["uid"]))
        self.store.remove_session(session_id)

    def gc(self) -> list[str]:
        """Terminate sessions whose supervisor is gone; returns their ids."""
        reaped = []
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            if record is not None and not self._alive(record) and self.store.claim(session_id):
                self._terminate_blocking(record)
                reaped.append(session_id)
        for record in self.store.abandoned():  # a terminate that died half-way: finish it
            if not self._alive(record):
                self._terminate_blocking(record)
                reaped.append(str(record["id"]))
        return reaped


def _process_uids() -> set[int]:
    uids: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(os.stat(entry.path).st_uid)
    return uids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (a per-session uid: only the session has it), until
    none is left."""
    for _ in range(1000):
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"{entry.path}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found.append(int(entry.name))
                            break
            except (OSError, ValueError):
                continue
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)


def _restore_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter (no absolute or ``..`` names, nothing written outside the destination or
    through a link, no devices, no set-id bits, owners dropped), except that a symlink may point anywhere: a
    guest's files often hold absolute symlinks (a virtualenv's ``bin/python``), and as a link it is only data.
    Writing *through* it stays refused, because the filter resolves every later member's real path."""
    try:
        return tarfile.data_filter(member, dest)
    except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
        if not member.issym():
            raise
    return tarfile.tar_filter(member, dest)  # owners are set afresh after extraction


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
