"""llm-sandbox (PyPI) on the same private dockerd, run from its own venv (bench/install_llm_sandbox.sh).

Its Docker sessions are a container per session driven through docker-py: ``SandboxSession(...).open()`` plus
the first ``execute_command("true")`` (provision), ``execute_command`` (exec), ``execute_command(...,
on_stdout=...)`` (stream: with a callback llm-sandbox reads docker-py's frames as they arrive), ``close()``
(terminate: stop, wait, remove). The worker runs inside a loopback-only network namespace; the daemon has no
network either.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..config import RunConfig
from ..netjail import jailed
from ..results import SystemResult
from ..stats import ms, summarise
from . import peers_dir
from .dockerd import IMAGE, PrivateDockerd

__all__ = ["find_python", "run_llm_sandbox"]

WORKER = Path(__file__).with_name("llm_sandbox_worker.py")


def find_python() -> str | None:
    """The venv interpreter bench/install_llm_sandbox.sh made (``$LLM_SANDBOX_PYTHON`` overrides)."""
    candidates = [os.environ.get("LLM_SANDBOX_PYTHON", ""), str(peers_dir() / "llm-sandbox" / "bin" / "python")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def run_llm_sandbox(cfg: RunConfig, dockerd: PrivateDockerd | None) -> SystemResult:
    system = SystemResult("llm-sandbox", "peer", "llm-sandbox `SandboxSession` (Docker backend, runc)")
    python = find_python()
    if python is None:
        system.unavailable("llm-sandbox is not installed: run bench/install_llm_sandbox.sh")
        return system
    if dockerd is None:
        system.unavailable("needs the private dockerd (see the docker peer's reason)")
        return system
    stream_n = cfg.stream_bytes
    params = {
        "image": IMAGE, "warmup": cfg.provision_warmup, "runs": max(3, cfg.provision_runs // 3),
        "exec_warmup": cfg.exec_warmup, "exec_runs": max(5, cfg.exec_runs // 2),
        "stream_bytes": stream_n, "stream_runs": max(1, cfg.stream_runs - 2),
    }  # fmt: skip
    # -I: the worker's own directory must not shadow the llm_sandbox package.
    proc = subprocess.run(jailed([python, "-I", str(WORKER), json.dumps(params)]), env=dockerd.env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0 or not proc.stdout.strip():
        system.unavailable(f"the llm-sandbox worker failed: {proc.stderr.strip()[-600:]}")
        return system
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    system.info["version"] = out.get("version")
    system.info["session"] = ("SandboxSession(backend='docker', image=IMAGE, lang='python', "
                              "skip_environment_setup=True, runtime_configs={'network_mode': 'none'})")
    if out.get("error"):
        system.skip("llm-sandbox", out["error"])
    warm = cfg.provision_warmup
    if out.get("provision_ready"):
        system.put("provision_ready", summarise(ms(out["provision_ready"]), "ms", warm,
                                                command="SandboxSession(...).open(); execute_command('true')"))
    if out.get("exec_true"):
        system.put("exec_true", summarise(ms(out["exec_true"]), "ms", cfg.exec_warmup,
                                          command="execute_command('true')"))
    if out.get("stream_stdout"):
        n = stream_n
        system.put("stream_stdout", summarise([n / 1e6 / s for s in out["stream_stdout"]], "MB/s", 1, bytes=n,
                                              command=f"execute_command('head -c {n} /dev/zero', on_stdout=...)"))
    if out.get("terminate"):
        system.put("terminate", summarise(ms(out["terminate"]), "ms", warm, command="close()"))
    for metric in ("snapshot", "suspend_resume", "idle_memory"):
        system.skipped.setdefault(metric, "not measured for llm-sandbox (its containers are those of `docker-cli`)")
    return system
