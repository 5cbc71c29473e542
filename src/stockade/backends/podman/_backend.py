"""The ``podman`` backend: :class:`~stockade.backends.docker.DockerBackend` over Podman's Docker-compatible API.

Where it differs from the docker backend: the engine's init (catatonit, Debian package ``catatonit``) is
mounted at ``/run/podman-init`` and wraps each exec (it makes itself a child subreaper when it is not pid 1), and
only runc is offered: Podman's checkpoints need CRIU, which does not work on every kernel, so snapshots keep
files only (``memory_snapshot`` is false). The seccomp profile is handed over as a file in the state directory
(Podman reads ``seccomp=`` as a path). With a local service, the host's ``conmon`` monitors of each exec are
ended once its exit code is read, and any left for the container at ``terminate`` / ``gc``. Read-only
directories are sealed only as root (the backend mounts the overlay on the host; Podman ignores inline volume
options).
"""

from __future__ import annotations

import re

from ..docker._backend import DockerBackend, _probe
from ..docker._engine import default_base_url
from ..docker._host import helper_processes, kill_and_wait
from ..docker._seccomp import profile_json
from ..docker._store import install_file

__all__ = ["PodmanBackend", "probe"]


def probe() -> str | None:
    """None when the Podman service at the default address answers, else how to start it."""
    reason = _probe("podman", default_base_url("podman"))
    if reason is not None:
        reason += " (run: podman system service --time=0 unix:///run/podman/podman.sock)"
    return reason


class PodmanBackend(DockerBackend):
    """Sessions as Podman containers; the options are the docker backend's (``runtime`` must be runc)."""

    name = "podman"
    engine_name = "podman"
    init_path = "/run/podman-init"
    init_args = ()
    init_exec_failure = re.compile(r"ERROR \(catatonit:\d+\): failed to exec pid1: No such file or directory")
    # With a read-only root, Podman adds writable tmpfs mounts of its own on /run and /var/tmp (mode 1777 where
    # the image has it, no size limit: a disk fill past tmp_mb), and its compatible API has no switch to leave
    # them out. Tiny root-owned ones in their place keep the guest's writable space to /tmp.
    engine_tmpfs = {path: "rw,nosuid,nodev,noexec,size=64k,mode=0755" for path in ("/run", "/var/tmp")}

    def _seccomp_option(self) -> str:
        # Podman's compatible API reads the option as a file name, not as the profile itself.
        path = self.store.root / "seccomp.json"
        text = profile_json("inet")
        if not path.exists() or path.read_text() != text:
            # Atomic and with a temporary name of its own: concurrent provisions of one process write it too.
            install_file(path, text.encode(), 0o644)
        return f"seccomp={path}"

    def _exec_done(self, exec_id: str) -> None:
        # Each exec's two conmon processes wait containers.conf's exit_command_delay (default 300 s, to keep the
        # exec inspectable as Docker does) before running their exit command; at 0 the exec is forgotten
        # before its exit code can be read. The exit code is read by now, so they are ended here (conmon names
        # the exec with -u); the exec's leftovers go with the container.
        if self.engine.is_local():
            kill_and_wait(helper_processes("conmon", "-u", exec_id))

    def _host_helpers(self, container: str) -> list[int]:
        # Whatever conmon is still there once the container is removed (an exec whose caller died before
        # _exec_done); conmon names its container with -c.
        return helper_processes("conmon", "-c", container)
