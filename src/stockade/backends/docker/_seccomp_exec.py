"""The seccomp loader that wraps every exec under gVisor, and the filter it loads.

Debian's runsc (20221219) applies the container's OCI seccomp profile to the container's first process and its
descendants only: a ``docker exec``'d command starts outside that tree and ran unfiltered (``Seccomp: 0``), so
``unshare``, ``mknod`` of devices and nested user namespaces reached the Sentry (escape.proc.blocked_syscalls).
Each exec is therefore started through ``seccomp_exec.c``: a small static program (it needs nothing from the
image) that loads the same rules as classic BPF (:func:`stockade.linux.seccomp.compile_bpf`, the program bwrap
loads) and then execs the command. It fails closed: without its filter the command does not run.

The program is compiled on this host once per source version, with the C compiler in ``$CC`` (default ``cc``)
and a static C library (Debian: ``gcc`` and ``libc6-dev``), into the backend's state directory.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from ...errors import BackendUnavailable
from ...linux import seccomp
from ._store import install_file

__all__ = ["FILTER", "LOADER", "loader_and_filter", "start_error"]

SOURCE = Path(__file__).with_name("seccomp_exec.c")
LOADER = "/sbin/stockade-seccomp-exec"
"""Where the loader is bound in the container (read-only)."""
FILTER = "/sbin/stockade-seccomp.bpf"
"""Where its filter is bound (read-only)."""
_FAILURE = 125
_PREFIX = "stockade-seccomp-exec: "
"""The loader's exit status when it could not load the filter (the command did not run)."""


def loader_and_filter(root: Path) -> tuple[Path, Path]:
    """The host paths of the loader (mode 0555) and of the filter (0444) under ``root``, built if missing."""
    source = SOURCE.read_bytes()
    program = seccomp.compile_bpf(seccomp.default_profile("inet"))
    loader = root / f"seccomp-exec-{hashlib.sha256(source).hexdigest()[:16]}"
    bpf = root / f"seccomp-{hashlib.sha256(program).hexdigest()[:16]}.bpf"
    if not _is_file(loader, 0o555):
        _compile(loader)
    if not _is_file(bpf, 0o444):
        install_file(bpf, program, 0o444)
    return loader, bpf


def start_error(argv0: str, code: int | None, stdout: bytes | bytearray, stderr: bytes | bytearray) -> str | None:
    """Why the command of an exec never started, when the loader said so (and only it spoke), else None."""
    text = stderr.decode(errors="replace").strip()
    if stdout or code not in (_FAILURE, 126, 127) or "\n" in text or not text.startswith(_PREFIX):
        return None
    if code == 127 and text == f"{_PREFIX}cannot run {argv0}: No such file or directory":
        return f"command not found: {argv0!r}"
    if code == _FAILURE:
        return f"the sandbox's seccomp filter could not be loaded, so the command was not run: {text}"
    return f"cannot start {argv0!r}: {text.removeprefix(_PREFIX)}"


def _is_file(path: Path, mode: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return (st.st_mode & 0o7777) == mode and st.st_size > 0


def _compile(dest: Path) -> None:
    cc = os.environ.get("CC") or "cc"
    compiler = shutil.which(cc)
    why = "gVisor sessions wrap every exec in a static seccomp loader that is compiled on this host"
    if compiler is None:
        raise BackendUnavailable(
            "docker", f"{why}, and no C compiler was found ({cc!r}); install one (Debian: apt-get install gcc "
            "libc6-dev) or set CC"
        )
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        proc = subprocess.run(
            [compiler, "-static", "-Os", "-s", "-o", str(tmp), str(SOURCE)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if proc.returncode != 0:
            raise BackendUnavailable(
                "docker", f"{why}, and {compiler} could not build it (a static C library is needed too; Debian: "
                f"libc6-dev): {proc.stderr.strip()[-2000:]}"
            )
        tmp.chmod(0o555)  # gVisor's loader reads the binary as the caller: execute-only would not run
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
