"""Docker as users drive it (the ``docker`` CLI) and as a backend drives it (raw Engine API calls).

Three systems, all on the private daemon of ``dockerd`` (runc, ``--network none``, the local busybox image):

- ``docker-run-rm``: ``docker run --rm IMAGE true``, a container per command.
- ``docker-cli``: a long-lived container per session through the CLI: ``docker run -d`` + the first ``docker exec
  true`` (provision), ``docker exec`` (exec, streaming), ``docker commit`` / ``docker run`` from the commit
  (snapshot / restore), ``docker pause`` + ``unpause`` (suspend/resume), ``docker rm -f`` (terminate), and the
  memory of idle containers (their processes plus their containerd shim).
- ``docker-api``: create + start + exec through the Engine API directly (no CLI process per call).
"""

from __future__ import annotations

import subprocess
import time

from ..cmdtimer import time_command
from ..config import RunConfig
from ..procmem import boot_ticks_now
from ..results import SystemResult
from ..scaling import idle_memory
from ..stats import ms, summarise
from .dockerd import IMAGE, PrivateDockerd, docker_cli

__all__ = ["run_docker_peers"]

SNAP_REPO = "stockade-bench/snap"


class _Cli:
    def __init__(self, dockerd: PrivateDockerd) -> None:
        self.dockerd = dockerd
        self.docker = docker_cli()

    def __call__(self, *args: str) -> str:
        proc = subprocess.run([self.docker, *args], env=self.dockerd.env, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed: {proc.stderr.strip()[-400:]}")
        return proc.stdout.strip()

    def argv(self, *args: str) -> list[str]:
        return [self.docker, *args]


def _oneshot(cfg: RunConfig, cli: _Cli) -> SystemResult:
    system = SystemResult("docker-run-rm", "peer", "`docker run --rm IMAGE true` (runc)")
    argv = cli.argv("run", "--rm", "--network", "none", IMAGE, "true")
    seconds = time_command(argv, cfg.provision_runs, cfg.provision_warmup, env=cli.dockerd.env)
    system.put("exec_true", summarise(ms(seconds), "ms", cfg.provision_warmup, command=" ".join(argv[1:])))
    return system


def _guard(system: SystemResult, metric: str, step: object) -> None:
    try:
        step()  # type: ignore[operator]
    except Exception as exc:
        system.skip(metric, f"failed: {type(exc).__name__}: {exc}")


def _cli_sessions(cfg: RunConfig, cli: _Cli) -> SystemResult:
    system = SystemResult("docker-cli", "peer", "Docker CLI: `docker run -d` + `docker exec` (runc)")
    pool: list[str] = []
    created: list[str] = []

    def run_d(image: str = IMAGE) -> str:
        cid = cli("run", "-d", "--network", "none", image)
        created.append(cid)
        return cid

    def provision() -> None:
        samples = []
        for i in range(cfg.provision_warmup + cfg.provision_runs):
            start = time.perf_counter()
            cid = run_d()
            cli("exec", cid, "true")
            if i >= cfg.provision_warmup:
                samples.append(time.perf_counter() - start)
            pool.append(cid)
        system.put("provision_ready", summarise(ms(samples), "ms", cfg.provision_warmup,
                                                command="docker run -d; docker exec ID true"))

    def exec_true() -> None:
        argv = cli.argv("exec", pool[0], "true")
        seconds = time_command(argv, cfg.exec_runs, cfg.exec_warmup, env=cli.dockerd.env)
        system.put("exec_true", summarise(ms(seconds), "ms", cfg.exec_warmup, command="docker exec ID true"))

    def stream() -> None:
        n = cfg.stream_bytes
        argv = cli.argv("exec", pool[0], "head", "-c", str(n), "/dev/zero")
        seconds = time_command(argv, cfg.stream_runs, cfg.stream_warmup, stream=n, env=cli.dockerd.env)
        system.put("stream_stdout", summarise([n / 1e6 / s for s in seconds], "MB/s", cfg.stream_warmup, bytes=n,
                                              command=f"docker exec ID head -c {n} /dev/zero"))

    def snapshot_restore() -> None:
        total = cfg.snapshot_bytes
        half = total // 2
        cid = run_d()
        cli("exec", cid, "sh", "-c", f"head -c {half} /dev/urandom > /root/random.bin && "
                                     f"head -c {total - half} /dev/zero > /tmp/zero.bin")
        extra = {"bytes": total, "content": f"{half} random bytes and {total - half} zeros in the container's "
                                            "writable layer"}
        samples, tags = [], []
        for i in range(cfg.snapshot_warmup + cfg.snapshot_runs):
            tag = f"{SNAP_REPO}:{i}"
            start = time.perf_counter()
            cli("commit", cid, tag)
            if i >= cfg.snapshot_warmup:
                samples.append(time.perf_counter() - start)
            tags.append(tag)
        system.put("snapshot", summarise(ms(samples), "ms", cfg.snapshot_warmup, command="docker commit", **extra))
        samples = []
        for i in range(cfg.snapshot_warmup + cfg.snapshot_runs):
            start = time.perf_counter()
            restored = run_d(tags[-1])
            size = cli("exec", restored, "stat", "-c", "%s", "/root/random.bin")
            elapsed = time.perf_counter() - start
            cli("rm", "-f", restored)
            if size != str(half):
                raise RuntimeError(f"restored container has {size} bytes in /root/random.bin, not {half}")
            if i >= cfg.snapshot_warmup:
                samples.append(elapsed)
        system.put("restore", summarise(ms(samples), "ms", cfg.snapshot_warmup, verified=True,
                                        command="docker run -d COMMIT; docker exec ID stat", **extra))
        cli("rm", "-f", cid)
        cli("rmi", *tags)

    def suspend_resume() -> None:
        pairs, downs, ups = [], [], []
        for i in range(cfg.suspend_warmup + cfg.suspend_runs):
            start = time.perf_counter()
            cli("pause", pool[0])
            mid = time.perf_counter()
            cli("unpause", pool[0])
            end = time.perf_counter()
            if i >= cfg.suspend_warmup:
                pairs.append(end - start)
                downs.append(mid - start)
                ups.append(end - mid)
        system.put("suspend_resume", summarise(ms(pairs), "ms", cfg.suspend_warmup, command="docker pause; unpause"))
        system.put("suspend", summarise(ms(downs), "ms", cfg.suspend_warmup))
        system.put("resume", summarise(ms(ups), "ms", cfg.suspend_warmup))

    def terminate() -> None:
        samples = []
        for i, cid in enumerate(list(pool)):
            start = time.perf_counter()
            cli("rm", "-f", cid)
            if i >= cfg.provision_warmup:
                samples.append(time.perf_counter() - start)
            pool.remove(cid)
        system.put("terminate", summarise(ms(samples), "ms", cfg.provision_warmup, command="docker rm -f"))

    def memory() -> None:
        n = cfg.peer_memory_sessions
        since = boot_ticks_now()
        ids = [run_d() for _ in range(n)]
        for cid in ids:
            cli("exec", cid, "true")
        time.sleep(1.0 if cfg.mode == "full" else 0.2)
        pids = [int(cli("inspect", "-f", "{{.State.Pid}}", cid)) for cid in ids]
        mem = idle_memory(pids, since)
        summary = summarise(mem["pss_mib"], "MiB", 0, sessions=n, rss_p50=mem["rss_p50_mib"],
                            uss_p50=mem["uss_p50_mib"], cgroup_p50=mem["cgroup_p50_mib"],
                            processes=mem["processes_per_session"])
        summary["sessions_per_gib"] = 1024 / summary["p50"] if summary["p50"] else None
        system.put("idle_memory", summary)
        cli("rm", "-f", *ids)

    try:
        _guard(system, "provision_ready", provision)
        if pool:
            _guard(system, "exec_true", exec_true)
            _guard(system, "stream_stdout", stream)
            _guard(system, "suspend_resume", suspend_resume)
            _guard(system, "terminate", terminate)
        _guard(system, "snapshot", snapshot_restore)
        _guard(system, "idle_memory", memory)
    finally:
        leftovers = [c for c in created if c]
        if leftovers:
            subprocess.run([cli.docker, "rm", "-f", *leftovers], env=cli.dockerd.env, capture_output=True)
    return system


def _api_sessions(cfg: RunConfig, dockerd: PrivateDockerd) -> SystemResult:
    system = SystemResult("docker-api", "peer", "Docker Engine API: create + start + exec (runc, no CLI)")
    api = dockerd.api
    pool: list[str] = []
    try:
        samples = []
        for i in range(cfg.provision_warmup + cfg.provision_runs):
            start = time.perf_counter()
            cid = api.run(IMAGE)
            pool.append(cid)
            code, _ = api.exec(cid, ["true"])
            if code != 0:
                raise RuntimeError(f"`true` exited {code}")
            if i >= cfg.provision_warmup:
                samples.append(time.perf_counter() - start)
        system.put("provision_ready", summarise(ms(samples), "ms", cfg.provision_warmup,
                                                command="POST /containers/create, /start, /exec, /exec/ID/start"))
        samples = []
        for i in range(cfg.exec_warmup + cfg.exec_runs):
            start = time.perf_counter()
            code, _ = api.exec(pool[0], ["true"])
            if i >= cfg.exec_warmup:
                samples.append(time.perf_counter() - start)
        system.put("exec_true", summarise(ms(samples), "ms", cfg.exec_warmup,
                                          command="POST /containers/ID/exec, /exec/ID/start; GET /exec/ID/json"))
        samples = []
        for i, cid in enumerate(list(pool)):
            start = time.perf_counter()
            api.remove(cid)
            if i >= cfg.provision_warmup:
                samples.append(time.perf_counter() - start)
            pool.remove(cid)
        system.put("terminate", summarise(ms(samples), "ms", cfg.provision_warmup,
                                          command="DELETE /containers/ID?force=1"))
    except Exception as exc:
        system.skip("docker-api", f"failed: {type(exc).__name__}: {exc}")
    finally:
        for cid in pool:
            try:
                api.remove(cid)
            except Exception as exc:
                print(f"bench: could not remove container {cid[:12]}: {exc}")
    return system


def run_docker_peers(cfg: RunConfig, dockerd: PrivateDockerd) -> list[SystemResult]:
    cli = _Cli(dockerd)
    out = [_oneshot(cfg, cli), _cli_sessions(cfg, cli), _api_sessions(cfg, dockerd)]
    for system in out:
        system.info["dockerd"] = dockerd.version
        system.info["runtime"] = "runc"
        system.info["image"] = f"{IMAGE} (busybox-static, imported locally)"
    return out
