"""``python -m bench``: run the benchmarks, write results.json, the plots and benchmarks.md.

    python -m bench --docs                     # the full run; regenerates docs/benchmarks.md and its plots
    python -m bench --quick --backend bwrap --peers none --out /tmp/b    # the smoke run CI does

Every registered stockade backend is measured unless ``--backend`` names some, and so are the variants in
``VARIANTS`` (``docker-runsc``: the docker backend under gVisor); baselines always run; peers
(``docker``, ``srt``, ``llm-sandbox``) run when installed (bench/install_peers.sh) and are skipped with the
reason otherwise. Nothing is asserted: the targets of the backend issues are reported as met / not met / not
measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from .backends import registered_backends, run_backend
from .baselines import run_baselines
from .config import FULL, QUICK, RunConfig
from .fixtures import REMOTE_INNER, docker_backend_options, ray_cluster, remote_service
from .gateway import run_gateway
from .host import background_load, describe_host, loadavg
from .results import SCHEMA, SystemResult
from .targets import evaluate

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("docker", "srt", "llm-sandbox")
# Rows that run a registered backend with other options: row name -> (backend, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"docker-runsc": ("docker", {"runtime": "runsc"})}
# Sessions the suite holds at once besides the scaling levels (the provision pool, the stream and snapshot
# sessions): the Ray cluster gets slots for the largest of the two, and this many more.
RAY_SPARE_SLOTS = 8
# metric -> (baseline system, its metric): the same-run reference each figure is divided by.
RATIOS = {
    "exec_true": ("fork+exec", "exec_true"),
    "provision_ready": ("bwrap-oneshot", "exec_true"),
    "stream_stdout": ("fork+exec", "stream_stdout"),
    "snapshot": ("host-tar", "snapshot"),
    "restore": ("host-tar", "restore"),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few runs of everything at small sizes (smoke test)")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME",
                        help="measure only this backend or variant (docker-runsc); repeatable; 'none' for none")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to run, or 'none' (default: {','.join(PEERS)})")
    parser.add_argument("--no-gateway", action="store_true", help="skip the egress gateway measurements")
    parser.add_argument("--levels", default=None, help="scaling levels, e.g. 1,10,50,200 ('' for none)")
    parser.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                        help="a constructor option for a backend (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.json, benchmarks.md and benchmarks/*.png "
                             "(default: bench/results/<mode>)")
    parser.add_argument("--docs", action="store_true",
                        help="also publish into docs/benchmarks.md and docs/benchmarks/ (full runs only)")
    args = parser.parse_args(argv)
    if args.docs and args.quick:
        parser.error("--docs publishes figures; a --quick run is too small for that")
    return args


def _options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"bench: --option wants BACKEND.KEY=VALUE, got {pair!r}")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(backend, {})[name] = parsed
    return out


class _Engine:
    """The private dockerd shared by the ``docker`` backend and the docker peers, started only when needed."""

    def __init__(self) -> None:
        self.dockerd: Any = None
        self.reason: str | None = None
        self._saved: str | None = None

    def start(self) -> None:
        from .peers.dockerd import PrivateDockerd, probe

        self.reason = probe()
        if self.reason is not None:
            return
        print("bench: starting a private dockerd", flush=True)
        dockerd = PrivateDockerd()
        try:
            dockerd.start()
        except (OSError, RuntimeError) as exc:
            dockerd.stop()
            self.reason = f"the private dockerd did not start: {exc}"
            return
        self.dockerd = dockerd
        # The docker backend's probe looks at DOCKER_HOST: point it at ours for the run.
        self._saved = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = dockerd.env["DOCKER_HOST"]

    def stop(self) -> None:
        if self.dockerd is None:
            return
        if self._saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = self._saved
        self.dockerd.stop()
        self.dockerd = None


async def _measure(args: argparse.Namespace, cfg: RunConfig, workdir: Path) -> dict[str, SystemResult]:
    systems: dict[str, SystemResult] = {}

    def add(system: SystemResult) -> None:
        systems[system.name] = system

    peers = set() if args.peers.strip() in ("", "none") else {p.strip() for p in args.peers.split(",")}
    unknown = peers - set(PEERS)
    if unknown:
        raise SystemExit(f"bench: unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    wanted = None if args.backend is None else set(args.backend) - {"none"}
    options = _options(args.option)
    engine = _Engine()
    docker_backend = any((wanted is None or row in wanted) and row not in options
                         for row in ("docker", *(v for v, (b, _) in VARIANTS.items() if b == "docker")))
    try:
        if peers & {"docker", "llm-sandbox"} or docker_backend:
            engine.start()
        print("bench: baselines", flush=True)
        for system in run_baselines(cfg):
            add(system)
        registered = registered_backends()
        for name, reason in registered:
            if wanted is not None and name not in wanted:
                continue
            print(f"bench: backend {name}", flush=True)
            if reason is not None:
                system = SystemResult(name, "backend", f"stockade `{name}`")
                system.unavailable(reason)
                add(system)
                continue
            add(await _run_one_backend(name, cfg, workdir, options.get(name), engine))
        for variant, (name, extra) in VARIANTS.items():
            if wanted is not None and variant not in wanted:
                continue
            print(f"bench: backend {variant}", flush=True)
            add(await _run_variant(variant, name, extra, cfg, workdir, options.get(variant), engine))
        for name in sorted((wanted or set()) - {n for n, _ in registered} - set(VARIANTS)):
            system = SystemResult(name, "backend", f"stockade `{name}`")
            system.unavailable("no backend of that name is registered")
            add(system)
        if not args.no_gateway:
            print("bench: gateway", flush=True)
            add(await run_gateway(cfg, workdir))
        for system in _run_peers(peers, cfg, engine):
            add(system)
    finally:
        engine.stop()
    return systems


async def _run_one_backend(name: str, cfg: RunConfig, workdir: Path, options: dict[str, Any] | None,
                           engine: _Engine) -> SystemResult:
    """One backend; ``remote`` and ``docker`` get what they need (a service, the private engine) unless the
    caller gave them options of their own."""
    scaling = bool(cfg.scaling_levels)
    if options is not None or name not in ("remote", "docker", "ray"):
        return await run_backend(name, cfg, workdir, options or {}, scaling=scaling)
    if name == "ray":
        return await _run_ray(cfg, workdir)
    if name == "docker":
        if engine.dockerd is None:
            system = SystemResult(name, "backend", f"stockade `{name}`")
            system.unavailable(f"needs the benchmark's private dockerd: {engine.reason}")
            return system
        try:
            opts = docker_backend_options(engine.dockerd)
        except RuntimeError as exc:
            system = SystemResult(name, "backend", f"stockade `{name}`")
            system.unavailable(str(exc))
            return system
        system = await run_backend(name, cfg, workdir, opts, scaling=scaling)
        system.label = "stockade `docker` (runc, on the benchmark's private dockerd)"
        return system
    if os.environ.get("STOCKADE_URL"):
        return await run_backend(name, cfg, workdir, {}, scaling=scaling)
    try:
        with remote_service(workdir) as opts:
            system = await run_backend(name, cfg, workdir, opts, scaling=scaling)
    except RuntimeError as exc:
        system = SystemResult(name, "backend", f"stockade `{name}`")
        system.unavailable(str(exc))
        return system
    system.label = f"stockade `remote` (unix socket, `stockade serve --backend {REMOTE_INNER}`)"
    system.info["inner_backend"] = REMOTE_INNER
    return system


async def _run_ray(cfg: RunConfig, workdir: Path) -> SystemResult:
    """``ray`` on the cluster at ``$STOCKADE_RAY_ADDRESS`` / ``$RAY_ADDRESS`` when one is set, else on a
    two-node cluster the benchmark starts and stops (``fixtures.ray_cluster``)."""
    scaling = bool(cfg.scaling_levels)
    if os.environ.get("STOCKADE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"):
        return await run_backend("ray", cfg, workdir, {}, scaling=scaling)
    slots = max((*cfg.scaling_levels, cfg.provision_warmup + cfg.provision_runs)) + RAY_SPARE_SLOTS
    print(f"bench: starting a two-node Ray cluster ({slots} slots)", flush=True)
    try:
        with ray_cluster(slots) as opts:
            info = opts.pop("info")
            system = await run_backend("ray", cfg, workdir, opts, scaling=scaling)
    except RuntimeError as exc:
        system = SystemResult("ray", "backend", "stockade `ray`")
        system.unavailable(str(exc))
        return system
    system.label = "stockade `ray` (two nodes on this machine, bwrap on each)"
    system.info["ray_cluster"] = info
    return system


async def _run_variant(variant: str, name: str, extra: dict[str, Any], cfg: RunConfig, workdir: Path,
                       options: dict[str, Any] | None, engine: _Engine) -> SystemResult:
    """A row that is a registered backend with other options (``VARIANTS``); the docker ones run on the
    private engine unless ``--option`` gave them options of their own."""
    scaling = bool(cfg.scaling_levels)
    label = f"stockade `{name}` ({', '.join(f'{k}={v}' for k, v in extra.items())})"
    if options is None and name == "docker":
        if engine.dockerd is None:
            system = SystemResult(variant, "backend", label)
            system.unavailable(f"needs the benchmark's private dockerd: {engine.reason}")
            return system
        try:
            options = docker_backend_options(engine.dockerd, **extra)
        except RuntimeError as exc:
            system = SystemResult(variant, "backend", label)
            system.unavailable(str(exc))
            return system
        label = f"stockade `{name}` ({', '.join(f'{v}' for v in extra.values())}, on the benchmark's private dockerd)"
    system = await run_backend(name, cfg, workdir, {**extra, **(options or {})}, scaling=scaling,
                               system_name=variant)
    system.label = label
    system.info["options"] = extra
    return system


def _run_peers(peers: set[str], cfg: RunConfig, engine: _Engine) -> list[SystemResult]:
    out: list[SystemResult] = []
    if "srt" in peers:
        from .peers.srt import run_srt

        print("bench: peer srt", flush=True)
        out.append(run_srt(cfg))
    if "docker" in peers:
        if engine.dockerd is not None:
            from .peers.docker_peer import run_docker_peers

            print("bench: peer docker", flush=True)
            out += run_docker_peers(cfg, engine.dockerd)
        else:
            for name in ("docker-run-rm", "docker-cli", "docker-api"):
                system = SystemResult(name, "peer", f"Docker ({name})")
                system.unavailable(str(engine.reason))
                out.append(system)
    if "llm-sandbox" in peers:
        from .peers.llm_sandbox_peer import run_llm_sandbox

        print("bench: peer llm-sandbox", flush=True)
        out.append(run_llm_sandbox(cfg, engine.dockerd))
    return out


def _add_ratios(systems: dict[str, dict[str, Any]]) -> None:
    for name, system in systems.items():
        for metric, summary in system["metrics"].items():
            ref_name, ref_metric = RATIOS.get(metric, ("", ""))
            ref = systems.get(ref_name, {}).get("metrics", {}).get(ref_metric)
            if ref is None or name == ref_name or not ref["p50"]:
                continue
            summary["ratio"] = {"baseline": f"{ref_name} {ref_metric}", "value": summary["p50"] / ref["p50"]}


def _write(result: dict[str, Any], out: Path) -> None:
    from .plots import draw_all
    from .report import render

    images = out / "benchmarks"
    draw_all(result["systems"], images, result["config"])
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "benchmarks.md").write_text(render(result, "benchmarks"))


def _publish(out: Path) -> None:
    docs = ROOT / "docs"
    target = docs / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    for png in (out / "benchmarks").glob("*.png"):
        shutil.copy2(png, target / png.name)
    shutil.copy2(out / "results.json", target / "results.json")
    shutil.copy2(out / "benchmarks.md", docs / "benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = QUICK if args.quick else FULL
    if args.levels is not None:
        cfg = cfg.with_levels(tuple(int(x) for x in args.levels.split(",") if x.strip()))
    command = "python -m bench" + ("" if not (argv if argv is not None else sys.argv[1:]) else " " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    out = args.out or ROOT / "bench" / "results" / cfg.mode
    out.mkdir(parents=True, exist_ok=True)
    host = describe_host()
    host["background_cpu_busy"] = background_load(0.2 if args.quick else 2.0)
    host["loadavg_start"] = loadavg()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    # Searchable (not listable) by others: backends that run commands under a per-session uid (landlock as
    # root) need to reach their state directory below it.
    workdir.chmod(0o711)
    try:
        systems = anyio.run(_measure, args, cfg, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    host["loadavg_end"] = loadavg()
    as_json = {name: s.to_json() for name, s in systems.items()}
    _add_ratios(as_json)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "mode": cfg.mode,
        "config": cfg.to_json(),
        "duration_s": time.monotonic() - started,
        "host": host,
        "systems": as_json,
        "targets": evaluate(as_json),
    }
    _write(result, out)
    if args.docs:
        _publish(out)
    _print_summary(result, out)
    return 0


def _print_summary(result: dict[str, Any], out: Path) -> None:
    print(f"\nbench: {result['mode']} run in {result['duration_s']:.0f} s; results in {out}")
    for name, system in result["systems"].items():
        if not system["available"]:
            print(f"  {name:16} skipped: {system['reason']}")
            continue
        figures = ", ".join(f"{metric} {s['p50']:.3g} {s['unit']}" for metric, s in system["metrics"].items())
        print(f"  {name:16} {figures}")
    for target in result["targets"]:
        print(f"  [{target['status']:12}] #{target['issue']} {target['system']}: {target['target']}"
              f"{' -- ' + target['measured'] if target['measured'] else ''}")
