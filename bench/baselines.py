"""Baselines measured in the same run: what the host does without any sandbox, and a one-shot bubblewrap.

- ``fork+exec``: ``/bin/true`` spawned and waited for (the exec round trip's floor), and ``head -c N
  /dev/zero`` read through a pipe (the streaming floor).
- ``bwrap-oneshot``: ``bwrap --unshare-all ... true``, a fresh sandbox per command (provision's reference).
- ``host-tar``: ``tar | gzip -1`` of the same bytes a snapshot captures, and its extraction (snapshot's and
  restore's reference).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .cmdtimer import time_command
from .config import RunConfig
from .results import SystemResult
from .stats import ms, summarise

__all__ = ["BWRAP_ONESHOT", "run_baselines", "write_session_files"]

BWRAP_ONESHOT = [
    "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--cap-drop", "ALL",
    "/usr/bin/true",
]  # fmt: skip


def write_session_files(directory: Path, total: int) -> None:
    """``total`` bytes in two files: half random (incompressible), half zeros, as a session's snapshot holds."""
    half = total // 2
    for name, source, size in (("random.bin", "/dev/urandom", half), ("zero.bin", "/dev/zero", total - half)):
        with open(directory / name, "wb") as out:
            subprocess.run(["head", "-c", str(size), source], stdout=out, check=True)


def _fork_exec(cfg: RunConfig) -> SystemResult:
    sys_ = SystemResult("fork+exec", "baseline", "host fork+exec (no sandbox)")
    sys_.put("exec_true", summarise(ms(time_command(["/bin/true"], cfg.exec_runs, cfg.exec_warmup)), "ms",
                                    cfg.exec_warmup, command="/bin/true"))
    n = cfg.stream_bytes
    seconds = time_command(["head", "-c", str(n), "/dev/zero"], cfg.stream_runs, cfg.stream_warmup, stream=n)
    sys_.put("stream_stdout", summarise([n / 1e6 / s for s in seconds], "MB/s", cfg.stream_warmup, bytes=n,
                                        command=f"head -c {n} /dev/zero | (pipe read by Python)"))
    return sys_


def _bwrap_oneshot(cfg: RunConfig) -> SystemResult:
    sys_ = SystemResult("bwrap-oneshot", "baseline", "one-shot `bwrap ... true`")
    if shutil.which("bwrap") is None:
        sys_.unavailable("bubblewrap is not installed: apt-get install bubblewrap")
        return sys_
    seconds = time_command(BWRAP_ONESHOT, cfg.provision_runs * 3, cfg.provision_warmup)
    sys_.put("exec_true", summarise(ms(seconds), "ms", cfg.provision_warmup,
                                    command="bwrap --unshare-all --ro-bind /usr /usr ... --cap-drop ALL true "
                                            "(BWRAP_ONESHOT in bench/baselines.py)"))
    return sys_


def _host_tar(cfg: RunConfig) -> SystemResult:
    sys_ = SystemResult("host-tar", "baseline", "host `tar | gzip -1` (no sandbox)")
    if shutil.which("tar") is None or shutil.which("gzip") is None:
        sys_.unavailable("tar or gzip is missing")
        return sys_
    with tempfile.TemporaryDirectory(prefix="stockade-bench-tar-") as tmp:
        src, archive, dst = Path(tmp) / "src", Path(tmp) / "a.tar.gz", Path(tmp) / "dst"
        src.mkdir()
        write_session_files(src, cfg.snapshot_bytes)
        snap = ["sh", "-c", f"tar -C {src} -cf - . | gzip -1 > {archive}"]
        restore = ["sh", "-c", f"rm -rf {dst} && mkdir {dst} && gzip -dc {archive} | tar -C {dst} -xf -"]
        extra = {"bytes": cfg.snapshot_bytes, "content": "half random bytes, half zeros"}
        sys_.put("snapshot", summarise(ms(time_command(snap, cfg.snapshot_runs, cfg.snapshot_warmup)), "ms",
                                       cfg.snapshot_warmup, **extra))
        sys_.put("restore", summarise(ms(time_command(restore, cfg.snapshot_runs, cfg.snapshot_warmup)), "ms",
                                      cfg.snapshot_warmup, **extra))
    return sys_


def run_baselines(cfg: RunConfig) -> list[SystemResult]:
    """Every baseline; each is skipped with a reason when its tool is missing."""
    return [_fork_exec(cfg), _bwrap_oneshot(cfg), _host_tar(cfg)]
