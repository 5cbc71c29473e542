"""Anthropic's sandbox-runtime (``srt``, npm ``@anthropic-ai/sandbox-runtime``) running the same commands.

srt wraps one command per invocation (bubblewrap on Linux): there are no sessions, so its exec figure is the
whole start-up of a sandbox, and provision, snapshot, suspend, terminate and idle memory do not apply.

What srt does when it starts (read in its ``dist/`` and seen with ``srt -d``): it starts an HTTP+SOCKS proxy on
localhost and ``socat`` bridges from unix sockets to it, then runs the command under ``bwrap --unshare-net``
with a seccomp filter against unix sockets; the proxy connects only to hosts in ``network.allowedDomains``.
Here that list is empty (nothing is admitted), and srt runs inside a loopback-only network namespace
(``netjail``), so even a change in what it does on start cannot send a packet off the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..netjail import jailed
from ..netjail import probe as netjail_probe
from ..results import SystemResult
from ..stats import ms, summarise
from . import peers_dir

__all__ = ["find_srt", "run_srt"]

SETTINGS: dict[str, dict[str, list[str]]] = {
    "network": {"allowedDomains": [], "deniedDomains": []},
    "filesystem": {"denyRead": [], "allowRead": [], "allowWrite": [], "denyWrite": []},
}
_NOT_SESSIONS = "srt has no sessions: each command gets a new sandbox (see exec_true for its start-up)"


def find_srt() -> str | None:
    """``$SRT``, the copy bench/install_srt.sh installed, or ``srt`` on PATH."""
    candidates = [os.environ.get("SRT", ""), str(peers_dir() / "srt" / "node_modules" / ".bin" / "srt"),
                  shutil.which("srt") or ""]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _timer(argv: list[str], runs: int, warmup: int, cwd: str, stream: int | None = None) -> list[float]:
    """``bench.cmdtimer`` in the loopback-only namespace, timing ``argv`` there."""
    root = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "bench.cmdtimer", "--runs", str(runs), "--warmup", str(warmup)]
    if stream is not None:
        cmd += ["--stream", str(stream)]
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run(jailed([*cmd, "--", *argv]), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-600:] or f"cmdtimer exited {proc.returncode}")
    seconds: list[float] = json.loads(proc.stdout)["seconds"]
    return seconds


def run_srt(cfg: RunConfig) -> SystemResult:
    system = SystemResult("srt", "peer", "Anthropic sandbox-runtime `srt` (one sandbox per command)")
    srt = find_srt()
    if srt is None:
        system.unavailable("srt is not installed: run bench/install_srt.sh")
        return system
    why = netjail_probe()
    if why is not None:
        system.unavailable(f"cannot confine srt to loopback: {why}")
        return system
    version = subprocess.run([srt, "--version"], capture_output=True, text=True)
    system.info["version"] = version.stdout.strip() or version.stderr.strip()[-200:]
    node = subprocess.run(["node", "--version"], capture_output=True, text=True) if shutil.which("node") else None
    system.info["node"] = node.stdout.strip() if node is not None else None
    system.info["settings"] = SETTINGS
    system.info["network"] = "empty allowedDomains; run in a network namespace with only lo"
    with tempfile.TemporaryDirectory(prefix="stockade-bench-srt-") as cwd:
        settings = Path(cwd) / "srt-settings.json"
        settings.write_text(json.dumps(SETTINGS))
        base = [srt, "--settings", str(settings)]
        try:
            _timer([*base, "true"], 1, 0, cwd)
        except RuntimeError as exc:
            system.unavailable(f"srt does not run here: {exc}")
            return system
        runs = max(cfg.provision_runs, cfg.exec_runs // 4)
        try:
            seconds = _timer([*base, "true"], runs, cfg.provision_warmup, cwd)
            system.put("exec_true", summarise(ms(seconds), "ms", cfg.provision_warmup, command="srt true"))
        except RuntimeError as exc:
            system.skip("exec_true", f"failed: {exc}")
        n = cfg.stream_bytes
        try:
            seconds = _timer([*base, "-c", f"head -c {n} /dev/zero"], cfg.stream_runs, cfg.stream_warmup, cwd, n)
            command = f"srt -c 'head -c {n} /dev/zero' (srt's start-up included)"
            system.put("stream_stdout", summarise([n / 1e6 / s for s in seconds], "MB/s", cfg.stream_warmup,
                                                  bytes=n, command=command))
        except RuntimeError as exc:
            system.skip("stream_stdout", f"failed: {exc}")
    for metric in ("provision_ready", "snapshot", "suspend_resume", "terminate", "idle_memory"):
        system.skipped[metric] = _NOT_SESSIONS
    return system
