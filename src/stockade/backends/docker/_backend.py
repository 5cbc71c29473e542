"""The ``docker`` backend: one container per session over the Engine API, with runc or gVisor (``runsc``).

Where it differs from the contract's documentation (``stockade.backend``):

- The guest sees an **image**'s root (``spec.image``, default :data:`DEFAULT_IMAGE`, built locally with
  ``stockade image build``; nothing is ever pulled), read-only, with a private tmpfs ``/tmp``, as uid 1000
  with no capabilities, ``no-new-privileges`` and stockade's seccomp filter. The image needs ``/bin/sh`` and
  ``sleep`` (and ``tar`` for file snapshots). The container's own processes (its init and ``sleep``) run as
  another uid, :data:`INIT_UID`, so a command can neither signal them nor read their ``/proc`` entries.
- Network: the container has its own namespace with loopback only (``NetworkMode: none``). With runc, a
  local engine and root, ``limited`` and ``unrestricted`` go through the bwrap backend's egress gateway,
  plumbed into that namespace (docs/network.md): proxies, DNS stub, the NAT rule, live policy updates, the
  log. Under gVisor (its own network stack) or without root they raise ``Unsupported``.
- Read-only directory mounts are sealed overlays where the engine is local and runs runc (see ``_sealed``).
- Live mounts (``attach_filesystem``) raise ``Unsupported``.
- Snapshots: with runc they keep files (``/tmp``, outputs, memory, session-owned mounts); with gVisor they
  keep the running processes too (``docker checkpoint``; ``capabilities().memory_snapshot``), and a session
  started ``from_snapshot`` continues them. A process that still holds an exec's stdin/stdout/stderr cannot be
  checkpointed by gVisor: such a snapshot is refused with the reason (redirect background processes' stdio).
- Under gVisor every exec starts through a static seccomp loader (``_seccomp_exec``; compiled on this host, so
  gVisor sessions need a C compiler and a static libc), because Debian's runsc filters only the container's
  init and its descendants; gVisor's own ``/dev/fuse`` and ``/dev/net/tun`` are covered by empty files.
- Under gVisor a memory-limit OOM kills the whole sandbox (the session is then dead; terminate it;
  ``oom_keeps_session`` false), a command can read the init's ``/proc`` entries (``private_supervisor`` false),
  and no pids limit is offered (gVisor's own threads count against it and a low limit stops it from booting).
- Suspend on idle is not offered; ``suspend()`` / ``resume`` pause and unpause the container.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread

from ...backend import SandboxBackend
from ...errors import (
    BackendUnavailable,
    ExecError,
    InvalidRequest,
    LifecycleError,
    NetworkPolicyError,
    SessionNotFound,
    Unsupported,
)
from ...linux import mounts as linux_mounts
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
from .._archive import restore_filter
from .._cancel_safe import provision_in_thread
from .._records import record_lock
from ..bwrap._network import GatewayHandle, find_tool, gateway_policy_json, proxy_env, start_gateway
from ._engine import Engine, EngineNotFound, ExecOutcome, default_base_url
from ._host import check_source, chown_tree, helper_processes, kill_and_wait, oom_kills
from ._kill import GUEST_KILLER, host_kill_tree
from ._seccomp import profile_json
from ._seccomp_exec import FILTER as SECCOMP_FILTER
from ._seccomp_exec import LOADER as SECCOMP_LOADER
from ._seccomp_exec import loader_and_filter, start_error
from ._store import Store, default_state_root, install_file

__all__ = ["DEFAULT_IMAGE", "DockerBackend", "probe"]

DEFAULT_IMAGE = "stockade/base:latest"
GUEST_UID = 1000
INIT_UID = 1001
"""The uid of the container's init and keep-alive: not the guest's, so ``kill -9 -1`` and ``/proc/1`` are out of
its reach (no capabilities, so uid alone decides)."""
EXEC_INIT = "/sbin/stockade-init"
"""Where the execute-only copy of the engine's init that wraps each exec (runc) is bound."""
_EXEC_INIT_BINARIES = {"docker": ("docker-init", "/usr/libexec/docker/docker-init", "/usr/bin/docker-init")}
"""The engine's init on the host (a name in PATH, or paths), by engine. Engines not named here (Podman, whose
catatonit takes other arguments) wrap execs in :attr:`DockerBackend.init_path` as the engine mounts it, which
the command can read."""
GUEST_HOME = "/tmp"
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
DEFAULT_OUTPUT_LIMIT = 16 << 20
DEFAULT_PIDS_MAX = 512
DEFAULT_TMP_MB = 512
LABEL_SESSION = "stockade.session"
LABEL_STATE = "stockade.state"
KEEPALIVE = ["sleep", "2147483647"]
GVISOR_DEVICES = ("/dev/fuse", "/dev/net/tun")
"""Devices of gVisor's own /dev that a guest must not reach; each is covered by an empty read-only file."""

Runtime = Literal["runc", "runsc"]


def probe() -> str | None:
    """None when the engine at the default address answers, else what is missing and how to fix it."""
    return _probe("docker", default_base_url("docker"))


def _probe(engine_name: str, base_url: str) -> str | None:
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the Python package 'docker' is missing: pip install 'stockade[docker]'"  # podman's client too
    engine = Engine(base_url, engine_name, timeout=5)
    try:
        engine.ping()
    except Exception as exc:
        where = "STOCKADE_PODMAN_HOST" if engine_name == "podman" else "DOCKER_HOST"
        return f"cannot reach the {engine_name} engine at {base_url} ({exc}); start it or set {where}"
    finally:
        engine.close()
    return None


class DockerBackend(SandboxBackend):
    """Sessions as containers. Options:

    ``base_url``: the engine's API (default ``$STOCKADE_DOCKER_HOST``, ``$DOCKER_HOST``, the usual socket).
    ``runtime``: ``"runc"`` or ``"runsc"`` (gVisor, registered in the engine's ``runtimes``).
    ``image``: the image for specs that name none. ``state_dir``: host directories and snapshots (default
    ``$STOCKADE_STATE_DIR/docker`` or ``/var/lib/stockade/docker``). ``default_pids_max``, ``default_tmp_mb``,
    ``output_limit_bytes``: as for bwrap.
    """

    name = "docker"
    engine_name = "docker"
    init_path = "/sbin/docker-init"
    """Where the engine's init (tini) appears in containers started with ``Init: true``."""
    init_args: tuple[str, ...] = ("-s",)
    """Makes the init a child subreaper when it wraps an exec (tini needs ``-s``)."""
    init_exec_failure: re.Pattern[str] | None = None
    """What the init prints alone on stderr when it cannot exec the command (tini exits 127 itself)."""
    engine_tmpfs: Mapping[str, str] = {}
    """Tmpfs mounts (path -> options) besides ``/tmp`` that the engine's own defaults make necessary."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        runtime: Runtime = "runc",
        image: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        default_pids_max: int = DEFAULT_PIDS_MAX,
        default_tmp_mb: int = DEFAULT_TMP_MB,
        output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT,
        engine_timeout: float = 120.0,
        resolve: Mapping[str, str | Sequence[str]] | None = None,
        dns_upstream: str | None = None,
        public_overrides: Sequence[str] = (),
    ) -> None:
        if runtime not in ("runc", "runsc"):
            raise InvalidRequest(f"must be 'runc' or 'runsc', not {runtime!r}", field="runtime")
        self.runtime: Runtime = runtime
        self.engine = Engine(base_url or default_base_url(self.engine_name), self.engine_name, engine_timeout)
        self.default_image = image or os.environ.get("STOCKADE_DOCKER_IMAGE") or DEFAULT_IMAGE
        root = Path(state_dir) if state_dir is not None else default_state_root(self.engine_name)
        self.store = Store(root)
        self.default_pids_max = default_pids_max
        self.default_tmp_mb = default_tmp_mb
        self.output_limit_bytes = output_limit_bytes
        self._runtime_checked = False
        self._exec_init: Path | None = None
        # The egress gateway's test and deployment hooks, as on bwrap (docs/network.md).
        self.resolve = {k: [v] if isinstance(v, str) else list(v) for k, v in (resolve or {}).items()}
        self.dns_upstream = dns_upstream
        self.public_overrides = list(public_overrides)

    async def aclose(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------------------------------------ capabilities

    @functools.cached_property
    def _egress_blocker(self) -> str | None:
        # Asked by capabilities(), provision and the network calls: fixed for an instance, so looked up once.
        return self._no_egress_reason()

    def _no_egress_reason(self) -> str | None:
        """Why ``limited``/``unrestricted`` cannot be enforced here, or None when the gateway can be wired in."""
        if self.runtime != "runc":
            return "gVisor keeps its own network stack, which the egress gateway cannot be plumbed into"
        if not self.engine.is_local() or os.geteuid() != 0:
            return ("the egress gateway is plumbed into the container's network namespace from this host, which "
                    "needs a local engine and root")
        missing = [tool for tool in ("nft", "ip") if find_tool(tool) is None]
        if missing:
            return f"the egress gateway needs {' and '.join(missing)} (Debian: nftables, iproute2)"
        return None

    def capabilities(self) -> SandboxCapabilities:
        gvisor = self.runtime == "runsc"
        egress = self._egress_blocker is None
        return SandboxCapabilities(
            local_process_sandbox=False,
            network_policy=egress,
            snapshot=True,
            resume=True,
            suspend_on_idle=False,
            filesystem_isolation=True,
            process_isolation=True,
            live_mounts=False,
            memory_snapshot=gvisor,
            resource_limits=True,
            memory_limit=True,
            pids_limit=not gvisor,
            cpu_limit=True,
            network_deny_all=True,
            network_unrestricted=egress,
            egress_log=egress,
            exec_streaming=False,
            persistent_sessions=True,
            # runc: the engine shows every mount's host source (and its own data root) in mountinfo; gVisor's
            # gofer shows none.
            private_mount_sources=gvisor,
            # gVisor: Debian's runsc opens another uid's /proc/<pid>/environ, maps and fd links (the container's
            # init and keep-alive hold no request data, but the check is missing); and the memory limit's OOM kill
            # takes the whole sandbox.
            private_supervisor=not gvisor,
            oom_keeps_session=not gvisor,
        )

    # ------------------------------------------------------------------------------------------- provision

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        if not spec.network_policy.denies_all and (reason := self._egress_blocker) is not None:
            raise Unsupported(self.name, "network_policy", reason)  # the specific reason, before the generic one
        self.refuse_gaps(spec)
        for index, mount in enumerate(spec.mounts):
            check_source(mount, index)
        session_id = spec.session_id or secrets.token_hex(16)
        return await provision_in_thread(lambda: self._provision_blocking(spec, session_id), self._discard)

    def _discard(self, session_id: str) -> bool:
        """Claim and end a session, blocking (terminate; a session whose provision was cancelled); False if it
        was not there to claim."""
        record = self.store.claim(session_id)
        if record is None:
            return False
        self._terminate_blocking(record)
        return True

    def _check_runtime(self) -> None:
        if self._runtime_checked or self.runtime == "runc":
            return
        runtimes = self.engine.info().get("Runtimes") or {}
        if self.runtime not in runtimes:
            raise BackendUnavailable(
                self.name,
                f"the engine has no {self.runtime!r} runtime; register it in daemon.json's \"runtimes\" "
                '(e.g. {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", '
                '"--oci-seccomp"]}}) and reload the daemon',
            )
        self._runtime_checked = True

    def _provision_blocking(self, spec: SandboxSpec, session_id: str) -> SandboxSession:
        self._check_runtime()
        manifest = self._load_snapshot(spec.from_snapshot) if spec.from_snapshot else None
        if manifest is not None and manifest["runtime"] != self.runtime and manifest["keeps"] == "processes":
            raise InvalidRequest(
                f"snapshot {spec.from_snapshot!r} holds gVisor process memory; restore it with runtime='runsc'",
                field="from_snapshot",
            )
        try:
            sdir = self.store.create_session_dir(session_id)
        except FileExistsError:
            raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id") from None
        container_id: str | None = None
        gateway: GatewayHandle | None = None
        try:
            mounts, owned = self._prepare_dirs(spec, sdir)
            if manifest is not None:
                self._restore_dirs(manifest, sdir, mounts, owned)
            exec_init = self._exec_init_copy()
            seccomp_exec = loader_and_filter(self.store.root) if self.runtime == "runsc" else None
            config = self._container_config(spec, session_id, mounts, exec_init, seccomp_exec)
            container_id = self.engine.create(f"stockade-{session_id}", config)
            if manifest is not None and manifest["keeps"] == "processes":
                self._start_from_checkpoint(container_id, Path(manifest["path"]) / "checkpoint")
            else:
                self.engine.start(container_id)
            state = self.engine.inspect(container_id)["State"]
            if not state.get("Running"):
                raise LifecycleError(f"the container exited at once: {state.get('Error') or state}")
            if not spec.network_policy.denies_all:
                gateway = self._start_gateway(session_id, int(state["Pid"]), spec.network_policy)
            record = {
                "id": session_id,
                "backend": self.name,
                "runtime": self.runtime,
                "container": container_id,
                "spec": spec.to_json(),
                "created": time.time(),
                "mounts": [
                    {"target": m["Target"], "access": "read_only" if m["ReadOnly"] else "read_write",
                     "host_path": m["Source"]}
                    for m in mounts
                ],
                "owned_mounts": owned,
                "from_snapshot": spec.from_snapshot,
                "exec_init": EXEC_INIT if exec_init is not None else None,
                "seccomp_exec": seccomp_exec is not None,
                "network_policy": spec.network_policy.to_json(),
                "gateway": gateway.data if gateway is not None else None,
                "gateway_failures": [],
            }
            if manifest is not None and manifest["keeps"] == "files":
                self._restore_tmp(record, Path(manifest["path"]) / "tmp.tar")
            self.store.write(session_id, record)
            return self._session_from(record, state)
        except BaseException:
            if gateway is not None:
                gateway.stop()
            if container_id is not None:
                with contextlib.suppress(Exception):
                    self.engine.remove(container_id)
            self.store.remove_session(session_id)
            raise

    def _prepare_dirs(self, spec: SandboxSpec, sdir: Path) -> tuple[list[dict[str, Any]], list[str]]:
        outputs, memory = sdir / "outputs", sdir / "memory"
        outputs.mkdir()
        memory.mkdir()
        mounts = [
            _bind(str(memory), MEMORY_MOUNT, read_only=not spec.memory_writable),
            _bind(str(outputs), OUTPUTS_MOUNT, read_only=False),
        ]
        owned: list[str] = []
        for index, mount in enumerate(spec.mounts):
            source = mount.source
            if not source:
                owned_dir = sdir / "mounts" / str(index)
                owned_dir.mkdir(parents=True)
                source = str(owned_dir)
                owned.append(mount.target)
            mounts.append(_bind(source, mount.target, read_only=mount.access == FilesystemAccess.READ_ONLY))
        if self._egress_blocker is None:
            # The gateway's DNS stub answers in the container's own namespace (also once a deny-all session is
            # widened live), never the host's resolver.
            resolv = sdir / "resolv.conf"
            resolv.write_text("nameserver 127.0.0.53\noptions ndots:0\n")
            mounts.append(_bind(str(resolv), "/etc/resolv.conf", read_only=True))
        # The guest runs as GUEST_UID: the directories the session owns are its to write (where bound rw).
        for path in [outputs, memory, *(Path(m["Source"]) for m in mounts if m["Target"] in owned)]:
            chown_tree(path, GUEST_UID, GUEST_UID)
        return mounts, owned

    def _exec_init_copy(self) -> Path | None:
        """The host's copy of the engine's init that wraps each exec, mode 0111 (runc only; gVisor execs run
        unwrapped).

        A process that execs a file it cannot read is made non-dumpable by the kernel: its ``/proc`` entries
        (mem, environ, fd) belong to root and it cannot be traced, even by its own uid. So the wrapper stays out
        of reach of the command it runs, whose own binary is readable and so dumpable again.
        """
        candidates = _EXEC_INIT_BINARIES.get(self.engine_name, ())
        if self.runtime == "runsc" or not candidates:
            return None
        if self._exec_init is not None:
            return self._exec_init
        source = next((found for name in candidates if (found := shutil.which(name)) is not None), None)
        if source is None:
            raise BackendUnavailable(
                self.name,
                f"cannot find the engine's init on this host (looked for {', '.join(candidates)}); it wraps "
                "every exec (Debian's docker.io ships it as docker-init)",
            )
        dest = self.store.root / "exec-init"
        data = Path(source).read_bytes()
        try:
            current = dest.read_bytes() if (dest.stat().st_mode & 0o777) == 0o111 else None
        except OSError:
            current = None
        if current != data:
            install_file(dest, data, 0o111)
        self._exec_init = dest
        return dest

    def _empty_file(self) -> Path:
        path = self.store.root / "empty"
        if not path.is_file() or path.stat().st_size:
            install_file(path, b"", 0o444)
        return path

    def _sealed(self, mount: dict[str, Any], session_id: str) -> dict[str, Any]:
        """A read-only directory bind of the spec as a sealed overlay, where this host can make one.

        ``connect()`` ignores a bind's read-only flag, so a host daemon's unix socket in the directory would answer
        the guest (escape.net.unix_in_ro_mount). An overlayfs whose lower layers are the source and an empty one
        does not: the socket there is the overlay's inode, which no listener is bound to. With runc and a local
        engine:

        - as root (and with the new mount API), the backend mounts that overlay itself under the session's
          directory (:func:`stockade.linux.mounts.seal_at`, the bwrap backend's sealing: layers by descriptor)
          and binds it like any directory, so it gets the binds' ``rprivate`` propagation and its mountinfo line
          names the session directory, not the source; ``Store.remove_session`` detaches it;
        - otherwise, with Docker, its local volume driver mounts the overlay (an anonymous volume, removed with
          the container), for paths the overlay's option string can carry. Podman's compatible API ignores an
          inline volume's driver options, and a named overlay volume does not start there (Podman chowns a new
          volume's read-only root);
        - anything else stays a plain read-only bind. Under gVisor too: its gofer refuses ``connect()`` to a
          host socket in a plain bind, and it served a volume without its ``ro`` flag (the Sentry let the guest
          make fifos and truncate there).
        """
        source = mount["Source"]
        if (
            not mount["ReadOnly"]
            or mount["Target"] in (MEMORY_MOUNT, EXEC_INIT)
            or self.runtime == "runsc"
            or not self.engine.is_local()
            or not os.path.isdir(source)
        ):
            return mount
        if os.geteuid() == 0 and linux_mounts.new_mount_api_available():
            point = self.store.sealed_dir(session_id, mount["Target"])
            point.mkdir(mode=0o755, parents=True)
            try:
                sealed = linux_mounts.seal_at(source, str(point))
            except OSError as exc:
                raise InvalidRequest(f"cannot mount {source!r} read-only: {exc.strerror or exc}") from None
            return {**mount, "Source": str(point)} if sealed else mount
        if self.engine_name != "docker" or any(c in source for c in ":,\\\n"):
            return mount
        empty = self.store.session_dir(session_id) / "sealed-empty"
        empty.mkdir(mode=0o555, exist_ok=True)
        # Anonymous (removed with the container), so the engine refuses ReadOnly on the mount: the overlay is
        # read-only itself ("ro", and an overlay without an upper layer cannot be written anyway).
        return {
            "Type": "volume",
            "Target": mount["Target"],
            "VolumeOptions": {
                "NoCopy": True,
                "DriverConfig": {
                    "Name": "local",
                    "Options": {"type": "overlay", "device": "overlay", "o": f"ro,lowerdir={source}:{empty}"},
                },
            },
        }

    def _container_config(
        self,
        spec: SandboxSpec,
        session_id: str,
        mounts: list[dict[str, Any]],
        exec_init: Path | None = None,
        seccomp_exec: tuple[Path, Path] | None = None,
    ) -> dict[str, Any]:
        limits = spec.limits
        tmp_mb = limits.tmp_mb or self.default_tmp_mb
        if exec_init is not None:
            mounts = [*mounts, _bind(str(exec_init), EXEC_INIT, read_only=True)]
        if seccomp_exec is not None:
            loader, bpf = seccomp_exec
            mounts = [
                *mounts,
                _bind(str(loader), SECCOMP_LOADER, read_only=True),
                _bind(str(bpf), SECCOMP_FILTER, read_only=True),
            ]
        if self.runtime == "runsc":
            # gVisor's /dev has its own FUSE and TUN devices, which any uid may open (escape.fs.dev): an empty
            # read-only file covers each. runc's /dev has neither.
            empty = self._empty_file()
            mounts = [*mounts, *(_bind(str(empty), device, read_only=True) for device in GVISOR_DEVICES)]
        mounts = [self._sealed(m, session_id) for m in mounts]
        host: dict[str, Any] = {
            "Init": True,
            "Runtime": self.runtime,
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges", self._seccomp_option()],
            "Mounts": mounts,
            "Tmpfs": {**self.engine_tmpfs, "/tmp": f"rw,nosuid,nodev,size={tmp_mb}m,mode=1777"},
            "IpcMode": "private",
            "ShmSize": tmp_mb << 20,  # /dev/shm is guest-writable memory too: bounded like /tmp
            "RestartPolicy": {"Name": "no"},
        }
        if self.runtime == "runc":
            # Docker opens unprivileged ICMP ("ping") sockets to every group of a container; no guest gets them.
            host["Sysctls"] = {"net.ipv4.ping_group_range": "1 0"}
        if limits.memory_mb is not None:
            host["Memory"] = limits.memory_mb << 20
            host["MemorySwap"] = limits.memory_mb << 20  # no swap: the limit is the limit
        if self.runtime != "runsc":
            host["PidsLimit"] = limits.pids_max or self.default_pids_max
        if limits.cpu_count is not None:
            host["NanoCpus"] = limits.cpu_count * 1_000_000_000
        return {
            "Image": spec.image or self.default_image,
            "Entrypoint": [KEEPALIVE[0]],
            "Cmd": KEEPALIVE[1:],
            "User": f"{INIT_UID}:{INIT_UID}",
            "WorkingDir": GUEST_HOME,
            "Hostname": "stockade",
            "Env": [f"{k}={v}" for k, v in self._base_env().items()],
            "Labels": {
                **{f"stockade.label.{k}": v for k, v in spec.labels.items()},
                LABEL_SESSION: session_id,
                LABEL_STATE: str(self.store.root),
            },
            "NetworkDisabled": True,
            "HostConfig": host,
        }

    def _seccomp_option(self) -> str:
        """Docker takes the profile's JSON inline."""
        return "seccomp=" + profile_json("inet")

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {
            "PATH": GUEST_PATH,
            "HOME": GUEST_HOME,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "STOCKADE_MEMORY_DIR": MEMORY_MOUNT,
            "STOCKADE_OUTPUTS_DIR": OUTPUTS_MOUNT,
            "HARN_MEMORY_DIR": MEMORY_MOUNT,
            "HARN_OUTPUTS_DIR": OUTPUTS_MOUNT,
        }

    # ---------------------------------------------------------------------------------------------- lookup

    def _record(self, session_id: str) -> dict[str, Any]:
        validate_session_id(session_id)
        record = self.store.read(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        return record

    def _state(self, record: dict[str, Any]) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = self.engine.inspect(record["container"])["State"]
        except EngineNotFound:
            return None
        return state

    def _settled_state(self, record: dict[str, Any], wait: float = 3.0) -> dict[str, Any] | None:
        # gVisor's whole sandbox dies when its memory cgroup OOMs; the exec then fails (exit 128, a urpc EOF)
        # before dockerd has seen the container stop. Wait briefly for the engine to catch up, so the OOM is
        # reported as such rather than as a strange exit code.
        deadline = time.monotonic() + wait
        state = self._state(record)
        while state is not None and state.get("Running") and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self._state(record)
        return state

    def _session_from(self, record: dict[str, Any], state: dict[str, Any] | None) -> SandboxSession:
        metadata = {
            "container": record["container"],
            "runtime": record["runtime"],
            "state_dir": str(self.store.session_dir(record["id"])),
            "created": f"{record['created']:.3f}",
        }
        if record.get("gateway"):
            gateway = GatewayHandle(record["gateway"])
            metadata["gateway_pid"] = str(gateway.pid)
            metadata["gateway"] = "running" if gateway.alive() else "down (no egress; restarted on next use)"
        if record.get("gateway_failures"):
            metadata["gateway_failures"] = str(len(record["gateway_failures"]))
        if record["runtime"] == "runsc" and state is not None and state.get("Running") and state.get("Pid"):
            # The host process of the gVisor sandbox: every guest process lives inside it and its children, not
            # as a host process of its own (the escape suite checks they all go with the session).
            metadata["sandbox_pid"] = str(state["Pid"])
        session_state = SandboxState.RUNNING
        if state is not None and state.get("Paused"):
            session_state = SandboxState.SUSPENDED
        elif state is None or not state.get("Running"):
            metadata["health"] = "dead"
            reason = "the container is gone" if state is None else f"the container stopped ({state.get('Status')})"
            if state is not None and state.get("OOMKilled"):
                reason += " after an out-of-memory kill"
            metadata["error"] = f"{reason}; terminate the session to clean up"
        return SandboxSession(
            id=record["id"],
            backend=self.name,
            state=session_state,
            mounts=tuple(
                ResolvedMount(target=m["target"], access=FilesystemAccess(m["access"]), host_path=m["host_path"])
                for m in record["mounts"]
            ),
            metadata=metadata,
        )

    async def get_session(self, session_id: str) -> SandboxSession:
        record = self._record(session_id)
        state = await anyio.to_thread.run_sync(self._state, record)
        return self._session_from(record, state)

    async def list_sessions(self) -> list[SandboxSession]:
        def blocking() -> list[SandboxSession]:
            out = []
            for session_id in self.store.ids():
                record = self.store.read(session_id)
                if record is not None and record.get("backend") == self.name:
                    out.append(self._session_from(record, self._state(record)))
            return out

        return await anyio.to_thread.run_sync(blocking)

    # ------------------------------------------------------------------------------------------------ exec

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        record = self._record(session_id)
        return await anyio.to_thread.run_sync(self._exec_blocking, record, request)

    def _running_state(self, record: dict[str, Any]) -> dict[str, Any]:
        state = self._state(record)
        if state is None:
            if self.store.read(record["id"]) is None:
                raise SessionNotFound(record["id"])
            raise LifecycleError(f"session {record['id']!r} lost its container; terminate it")
        if state.get("Paused"):
            self.engine.unpause(record["container"])  # an exec on a suspended session resumes it
            state = self.engine.inspect(record["container"])["State"]
        if not state.get("Running"):
            oom = " (killed for exceeding its memory limit)" if state.get("OOMKilled") else ""
            raise LifecycleError(f"session {record['id']!r} is not running{oom}; terminate it")
        return state

    def _exec_blocking(self, record: dict[str, Any], request: ExecRequest) -> ExecResult:
        spec = SandboxSpec.parse(record["spec"])
        state = self._running_state(record)
        if record.get("gateway"):
            record = self._ensure_gateway(record)
        proxies = proxy_env() if record.get("gateway") else {}
        env = {**self._base_env(), **proxies, **spec.env, **request.env}
        token = secrets.token_hex(16)
        env["STOCKADE_EXEC_ID"] = token  # marks the exec's processes for the gVisor tree kill
        cwd = request.cwd or GUEST_HOME
        if not cwd.startswith("/"):
            cwd = f"{GUEST_HOME}/{cwd}"
        timeout = request.timeout or spec.limits.wall_time
        limit = spec.limits.output_limit_bytes or self.output_limit_bytes
        host_pid = int(state.get("Pid") or 0)
        ooms_before = oom_kills(host_pid) if host_pid else None
        started = time.monotonic()
        out = self._run(
            record, request.argv, env=env, cwd=cwd,
            stdin=request.stdin.encode() if request.stdin is not None else None,
            deadline=started + timeout.total_seconds() if timeout is not None else None,
            limit=limit, token=token,
        )
        duration = (time.monotonic() - started) * 1000
        if out.start_error is not None:
            raise ExecError(out.start_error)
        oom = False
        after = self._state(record)
        sandbox_failed = out.exit_code is None or (out.exit_code == 128 and b"in sandbox" in out.stderr[-4096:])
        if record["runtime"] == "runsc" and sandbox_failed and after is not None and after.get("Running"):
            after = self._settled_state(record)  # the sandbox may be dying: the engine notices a moment later
        if after is not None and not after.get("Running") and after.get("OOMKilled"):
            oom = True  # gVisor: the whole sandbox went
        elif ooms_before is not None and not out.timed_out:
            now = oom_kills(host_pid)
            oom = now is not None and now > ooms_before
        exit_code = out.exit_code
        if exit_code is None:
            exit_code = 137 if (oom or out.timed_out) else -1
        return ExecResult(
            stdout=out.stdout.decode("utf-8", errors="replace"),
            stderr=out.stderr.decode("utf-8", errors="replace"),
            exit_code=exit_code,
            timed_out=out.timed_out,
            duration_ms=duration,
            oom_killed=oom,
            truncated=out.truncated,
        )

    def _wrap(self, argv: list[str], record: dict[str, Any]) -> list[str]:
        if record["runtime"] == "runsc":
            # No PR_SET_CHILD_SUBREAPER in Debian's runsc (the tree is found by environment), but the seccomp
            # filter that runsc does not give execs (see _seccomp_exec).
            return [SECCOMP_LOADER, SECCOMP_FILTER, "--", *argv] if record.get("seccomp_exec") else argv
        return [record.get("exec_init") or self.init_path, *self.init_args, "--", *argv]

    def _run(
        self,
        record: dict[str, Any],
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        stdin: bytes | None,
        deadline: float | None,
        limit: int,
        token: str,
    ) -> ExecOutcome:
        container = record["container"]
        exec_id = self.engine.exec_create(
            container, self._wrap(argv, record), env=env, cwd=cwd, user=f"{GUEST_UID}:{GUEST_UID}",
            stdin=stdin is not None,
        )

        def on_timeout(info: dict[str, Any]) -> None:
            self._kill_exec(record, info, token)

        try:
            out = self.engine.exec_run(exec_id, stdin=stdin, deadline=deadline, limit=limit, on_timeout=on_timeout)
        finally:
            self._exec_done(exec_id)
        text = out.stdout.decode(errors="replace")
        if out.pid == 0 and out.exit_code in (126, 127) and "exec failed" in text:
            # The runtime could not start the process at all; its message arrives on stdout.
            if "chdir" in text or "working directory" in text:
                out.start_error = f"cannot change to directory {cwd!r}: {text.strip()}"
            elif "executable file not found" in text or "no such file or directory" in text:
                out.start_error = f"command not found: {argv[0]!r}"
            else:
                out.start_error = f"cannot start {argv[0]!r}: {text.strip()}"
        elif record["runtime"] == "runsc":
            if record.get("seccomp_exec"):
                out.start_error = start_error(argv[0], out.exit_code, out.stdout, out.stderr)
        elif (self.init_exec_failure is not None and not out.stdout
              and self.init_exec_failure.fullmatch(out.stderr.decode(errors="replace").strip())):
            out.start_error = f"command not found: {argv[0]!r}"
        return out

    def _kill_exec(self, record: dict[str, Any], info: dict[str, Any], token: str) -> None:
        pid = int(info.get("Pid") or 0)
        if record["runtime"] != "runsc" and pid > 1 and Path(f"/proc/{pid}").exists():
            host_kill_tree(pid)
            return
        killer = self.engine.exec_create(
            record["container"], ["/bin/sh", "-c", GUEST_KILLER, "stockade-kill", token],
            env={"PATH": GUEST_PATH}, cwd="/", user=f"{GUEST_UID}:{GUEST_UID}", stdin=False,
        )
        self.engine.exec_run(
            killer, stdin=None, deadline=time.monotonic() + 20, limit=1 << 16, on_timeout=lambda _info: None
        )

    # -------------------------------------------------------------------------------------------- mounts

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        self._record(session_id)
        raise Unsupported(
            self.name, "attach_filesystem", "containers get their mounts at creation; live mounts are not offered"
        )

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        record = self._record(session_id)
        if not policy.denies_all and (reason := self._egress_blocker) is not None:
            raise Unsupported(self.name, "apply_network_policy", reason)
        return await anyio.to_thread.run_sync(self._apply_policy_blocking, record, policy)

    def _apply_policy_blocking(self, record: dict[str, Any], policy: NetworkPolicy) -> SandboxSession:
        session_id = record["id"]
        state = self._running_state(record)
        with record_lock(self.store.session_dir(session_id)):
            current = self.store.read(session_id)
            if current is None:
                raise SessionNotFound(session_id)
            data = current.get("gateway")
            if data and GatewayHandle(data).alive():
                reply = GatewayHandle(data).control({"op": "policy", "policy": gateway_policy_json(policy)})
                if not reply.get("ok"):
                    error = reply.get("error") or {}
                    raise NetworkPolicyError(f"the gateway refused the policy: {error.get('message', reply)}")
            elif not policy.denies_all:
                # First widening of a deny-all session, or a gateway that died: (re)start it on the new policy.
                if data:
                    current.setdefault("gateway_failures", []).append({"time": time.time(), "pid": data.get("pid")})
                current["gateway"] = self._start_gateway(session_id, int(state["Pid"]), policy).data
            current["network_policy"] = policy.to_json()
            self.store.write(session_id, current)
            return self._session_from(current, state)

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._record(session_id)
        if self._egress_blocker is not None:
            raise Unsupported(self.name, "network_log", self._egress_blocker)
        from ...gateway import audit

        path = self.store.session_dir(session_id) / "gateway" / "audit.jsonl"
        entries: list[dict[str, Any]] = await anyio.to_thread.run_sync(audit.read, path)
        return entries[-limit:] if limit else entries

    def _start_gateway(self, session_id: str, netns_pid: int, policy: NetworkPolicy) -> GatewayHandle:
        """The bwrap backend's gateway (docs/network.md), plumbed into the container's network namespace."""
        handle, proc = start_gateway(
            session_id, self.store.session_dir(session_id), netns_pid, policy,
            resolve=self.resolve, dns_upstream=self.dns_upstream, public_overrides=self.public_overrides,
        )
        # Detached: it exits by itself with the container's init (pidfd); reap it here if it does meanwhile.
        threading.Thread(target=proc.wait, daemon=True).start()
        return handle

    def _ensure_gateway(self, record: dict[str, Any]) -> dict[str, Any]:
        """Fail closed, then recover, as on bwrap: a dead gateway is restarted on the recorded policy and the
        failure recorded (``metadata["gateway_failures"]``)."""
        data = record.get("gateway")
        if not data or GatewayHandle(data).alive():
            return record
        state = self._running_state(record)
        with record_lock(self.store.session_dir(record["id"])):
            current = self.store.read(record["id"])
            if current is None:
                raise SessionNotFound(record["id"])
            data = current.get("gateway")
            if not data or GatewayHandle(data).alive():
                return current
            policy = NetworkPolicy.parse(current["network_policy"])
            current["gateway"] = self._start_gateway(current["id"], int(state["Pid"]), policy).data
            current.setdefault("gateway_failures", []).append({"time": time.time(), "pid": data.get("pid")})
            self.store.write(current["id"], current)
            return current

    # --------------------------------------------------------------------------------- snapshot and resume

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        record = self._record(session_id)
        return await anyio.to_thread.run_sync(self._snapshot_blocking, record)

    def _snapshot_blocking(self, record: dict[str, Any]) -> SandboxSnapshot:
        self._running_state(record)
        session_id = record["id"]
        snapshot_id = f"{session_id[:40]}-{secrets.token_hex(8)}"
        target = self.store.snapshot_dir(snapshot_id)
        target.mkdir(mode=0o700)
        keeps = "processes" if record["runtime"] == "runsc" else "files"
        try:
            if keeps == "processes":
                self._checkpoint(record, target)
            else:
                self._capture_tmp(record, target / "tmp.tar")
                self.engine.pause(record["container"])  # outputs and memory are cut while nothing writes
                try:
                    self._capture_dirs(record, target / "files.tar.gz")
                finally:
                    self.engine.unpause(record["container"])
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        manifest = {
            "snapshot_id": snapshot_id,
            "session_id": session_id,
            "backend": self.name,
            "runtime": record["runtime"],
            "created": time.time(),
            "spec": record["spec"],
            "owned_mounts": record.get("owned_mounts", []),
            "keeps": keeps,
            "sha256": _sha256_file(target / "files.tar.gz"),
        }
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return SandboxSnapshot(
            session_id=session_id,
            backend=self.name,
            snapshot_id=snapshot_id,
            metadata={"path": str(target), "keeps": keeps, "runtime": record["runtime"], "sha256": manifest["sha256"]},
        )

    def _capture_tmp(self, record: dict[str, Any], path: Path) -> None:
        out = self._run(
            record, ["tar", "-C", "/tmp", "-cf", "-", "."], env={"PATH": GUEST_PATH}, cwd="/", stdin=None,
            deadline=time.monotonic() + 300, limit=(64 << 30), token=secrets.token_hex(16),
        )
        if out.start_error is not None or out.exit_code not in (0, 1):  # GNU tar: 1 = a file changed meanwhile
            raise LifecycleError(
                f"capturing /tmp failed (the image needs tar): {out.start_error or out.stderr.decode(errors='replace')}"
            )
        path.write_bytes(bytes(out.stdout))

    def _capture_dirs(self, record: dict[str, Any], archive: Path) -> None:
        sdir = self.store.session_dir(record["id"])
        members = {"outputs": sdir / "outputs", "memory": sdir / "memory"}
        by_target = {m["target"]: m["host_path"] for m in record["mounts"]}
        for index, target in enumerate(record.get("owned_mounts", [])):
            members[f"mounts/{index}"] = Path(by_target[target])
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            for name, path in members.items():
                tar.add(str(path), arcname=name, recursive=True)

    _HOST_FD_CHECK = (
        # gVisor cannot restore a process holding a host file descriptor other than the container's own
        # stdio (pid 1 and its child); an exec's pipes are such descriptors.
        'for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" -le 2 ] && continue; [ "$p" = $$ ] && continue\n'
        '  for f in "$d"/fd/*; do case "$(readlink "$f" 2>/dev/null)" in host:*) '
        'echo "$p $(tr "\\000" " " < "$d/cmdline" 2>/dev/null)"; break;; esac; done\n'
        "done\n"
    )

    def _checkpoint(self, record: dict[str, Any], target: Path) -> None:
        container = record["container"]
        check = self._run(
            record, ["/bin/sh", "-c", self._HOST_FD_CHECK], env={"PATH": GUEST_PATH}, cwd="/", stdin=None,
            deadline=time.monotonic() + 30, limit=1 << 16, token=secrets.token_hex(16),
        )
        holders = [
            line for line in check.stdout.decode(errors="replace").splitlines()
            if line.strip() and "/proc/[0-9]*" not in line
        ]
        # The checker's own subshells show up too; they are gone by now and carry the check's own script.
        holders = [h for h in holders if "readlink" not in h]
        if holders:
            raise LifecycleError(
                "gVisor cannot checkpoint processes that still hold an exec's stdin/stdout/stderr; start "
                "background processes with '</dev/null >FILE 2>&1'. Holding: " + "; ".join(holders[:5])
            )
        name = f"snap-{secrets.token_hex(6)}"
        self.engine.checkpoint(container, name)  # the container stops here, memory saved
        source = self._checkpoint_root(container) / name
        try:
            shutil.copytree(source, target / "checkpoint")
            self._capture_dirs(record, target / "files.tar.gz")
        finally:
            # Continue the session from the state just saved (gVisor cannot checkpoint and keep running).
            self._release_stopped_task(container)
            self._start_from_checkpoint(container, None, name)

    def _release_stopped_task(self, container: str) -> None:
        """Let containerd forget the task a checkpoint stopped, so the same container can start again.

        Checkpointing a container that was itself restored from a checkpoint leaves runsc's state at "paused"
        with its sandbox gone; containerd's (unforced) delete is then refused, the shim keeps the stopped task,
        and the next start of that container id fails with "id already in use". A shim that dies is cleaned up
        by containerd with a forced delete, which is what happens on its own after the first checkpoint.
        """
        if not self.engine.is_local():
            return  # the shim is not ours to see (checkpoints need a local engine anyway)
        state = self._state({"container": container})
        if state is None or state.get("Running"):
            return
        kill_and_wait(helper_processes("containerd-shim", "-id", container))

    def _checkpoint_root(self, container: str) -> Path:
        root = self.engine.info().get("DockerRootDir")
        if not root:
            raise Unsupported(self.name, "snapshot", "the engine does not say where it keeps checkpoints")
        return Path(root) / "containers" / container / "checkpoints"

    def _start_from_checkpoint(self, container: str, source: Path | None, name: str | None = None) -> None:
        if source is not None:
            # The engine restores only from its own per-container checkpoint directory (a custom directory
            # is refused by Docker 20.10), so the snapshot's copy is placed there.
            name = f"restore-{secrets.token_hex(6)}"
            dest = self._checkpoint_root(container) / name
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copytree(source, dest)
        assert name is not None
        for attempt in range(3):
            try:
                self.engine.start(container, checkpoint=name)
                break
            except LifecycleError as exc:
                # Docker leaves the upload of a failed restore in containerd's content store, and containerd
                # may still be cleaning up the task of a shim that just died; a retry succeeds.
                if attempt == 2 or not ("already exists" in str(exc) or "already in use" in str(exc)):
                    raise
                time.sleep(0.2 * (attempt + 1))
        # The engine's copy is no longer needed once the sandbox runs (the snapshot keeps its own).
        self.engine.checkpoint_delete(container, name)

    def _load_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        validate_session_id(snapshot_id, "from_snapshot")
        snap = self.store.snapshot_dir(snapshot_id)
        try:
            manifest: dict[str, Any] = json.loads((snap / "manifest.json").read_text())
        except (OSError, ValueError):
            raise InvalidRequest(f"no snapshot with id {snapshot_id!r}", field="from_snapshot") from None
        if manifest.get("backend") != self.name:
            raise InvalidRequest(f"snapshot {snapshot_id!r} was made by {manifest.get('backend')!r}",
                                 field="from_snapshot")
        if _sha256_file(snap / "files.tar.gz") != manifest["sha256"]:
            raise LifecycleError(f"snapshot {snapshot_id!r} is corrupt (sha256 mismatch)")
        manifest["path"] = str(snap)
        return manifest

    def _restore_dirs(
        self, manifest: dict[str, Any], sdir: Path, mounts: list[dict[str, Any]], owned: list[str]
    ) -> None:
        staging = sdir / "restore"
        try:
            with tarfile.open(Path(manifest["path"]) / "files.tar.gz", "r:gz") as tar:
                tar.extractall(staging, filter=restore_filter)  # noqa: S202 - filtered: see restore_filter
        except (tarfile.TarError, OSError) as exc:
            raise LifecycleError(f"snapshot {manifest['snapshot_id']!r} cannot be restored: {exc}") from exc
        for name in ("outputs", "memory"):
            if (staging / name).is_dir():
                shutil.rmtree(sdir / name)
                (staging / name).rename(sdir / name)
        by_target = {m["Target"]: m for m in mounts}
        for index, target in enumerate(manifest.get("owned_mounts", [])):
            src = staging / "mounts" / str(index)
            mount = by_target.get(target)
            if mount is not None and target in owned and src.is_dir():
                shutil.rmtree(mount["Source"])
                src.rename(mount["Source"])
        shutil.rmtree(staging, ignore_errors=True)
        for name in ("outputs", "memory"):
            chown_tree(sdir / name, GUEST_UID, GUEST_UID)
        for target in owned:
            chown_tree(Path(by_target[target]["Source"]), GUEST_UID, GUEST_UID)
        if manifest["keeps"] == "processes":
            spec = SandboxSpec.parse(manifest["spec"])
            if [m.target for m in spec.mounts] != [t for t in by_target if t not in (MEMORY_MOUNT, OUTPUTS_MOUNT)]:
                raise InvalidRequest(
                    "a gVisor memory snapshot restores only into the same mount targets it was taken with "
                    f"({[m.target for m in spec.mounts]})",
                    field="mounts",
                )

    def _restore_tmp(self, record: dict[str, Any], archive: Path) -> None:
        if not archive.exists():
            return
        out = self._run(
            record, ["tar", "-C", "/tmp", "-xf", "-"], env={"PATH": GUEST_PATH}, cwd="/",
            stdin=archive.read_bytes(), deadline=time.monotonic() + 300, limit=1 << 16,
            token=secrets.token_hex(16),
        )
        if out.start_error is not None or out.exit_code != 0:
            raise LifecycleError(
                f"restoring /tmp failed: {out.start_error or out.stderr.decode(errors='replace').strip()}"
            )

    async def resume(self, session_id: str) -> SandboxSession:
        record = self._record(session_id)

        def blocking() -> SandboxSession:
            state = self._state(record)
            if state is not None and state.get("Paused"):
                self.engine.unpause(record["container"])
                state = self._state(record)
            return self._session_from(record, state)

        return await anyio.to_thread.run_sync(blocking)

    async def suspend(self, session_id: str) -> SandboxSession:
        """Freeze every process of the session (``docker pause``); an extension, undone by :meth:`resume`."""
        record = self._record(session_id)

        def blocking() -> SandboxSession:
            state = self._running_state(record)
            if not state.get("Paused"):
                self.engine.pause(record["container"])
            return self._session_from(record, self._state(record))

        return await anyio.to_thread.run_sync(blocking)

    # ------------------------------------------------------------------------------------------- terminate

    async def terminate(self, session_id: str) -> None:
        validate_session_id(session_id)
        # Claimed atomically: of two concurrent terminates, one does the work and the other is told the
        # session is gone (the engine would refuse the second removal with a confusing error). Claim and
        # removal are one worker-thread call, so a cancelled caller cannot leave it claimed but running.
        if not await anyio.to_thread.run_sync(self._discard, session_id):
            raise SessionNotFound(session_id)

    def _terminate_blocking(self, record: dict[str, Any]) -> None:
        if record.get("gateway"):
            GatewayHandle(record["gateway"]).stop()
        self._remove_container(record["container"])
        self.store.remove_session(record["id"])

    def _remove_container(self, container: str) -> None:
        self.engine.remove(container)  # kills every process and removes anonymous volumes
        # What the engine started for this container on the host and left running (a stuck containerd shim;
        # Podman's exec monitors) goes too, so nothing the session started outlives it.
        if self.engine.is_local():
            kill_and_wait(self._host_helpers(container))

    def _exec_done(self, exec_id: str) -> None:
        """Called once an exec's outcome has been read (Docker's engine needs nothing here)."""

    def _host_helpers(self, container: str) -> list[int]:
        """Host processes the engine runs on behalf of ``container`` (local engine only)."""
        return helper_processes("containerd-shim", "-id", container)

    def gc(self) -> list[str]:
        """Remove what crashed callers left: containers labelled with this state directory but without a
        session record, and records whose container is gone. Returns the session ids reaped."""
        reaped: list[str] = []
        for session_id in self.store.terminating_ids(older_than=60.0):
            # A terminate that died half-way a while ago (its caller was killed): finish it.
            record = self.store.claim(session_id, again=True)
            if record is not None:
                self._terminate_blocking(record)
                reaped.append(session_id)
        for container in self.engine.list_labelled(f"{LABEL_STATE}={self.store.root}"):
            session_id = (container.get("Labels") or {}).get(LABEL_SESSION, "")
            if self.store.read(session_id) is None and not self.store.session_terminating(session_id):
                self._remove_container(container["Id"])
                reaped.append(session_id)
        for session_id in self.store.ids():
            record = self.store.read(session_id)
            if record is not None and record.get("backend") == self.name and self._state(record) is None:
                self._remove_container(record["container"])  # gone from the engine; its helpers may not be
                self.store.remove_session(session_id)
                reaped.append(session_id)
        return reaped


def _bind(source: str, target: str, *, read_only: bool) -> dict[str, Any]:
    return {
        "Type": "bind",
        "Source": source,
        "Target": target,
        "ReadOnly": read_only,
        "BindOptions": {"Propagation": "rprivate"},
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

