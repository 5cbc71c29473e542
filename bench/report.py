"""``benchmarks.md``: the tables, the plots, the command and the conditions of one run, as Markdown."""

from __future__ import annotations

from typing import Any

from .plots import FIGURES, title
from .results import METRICS

__all__ = ["render"]

Systems = dict[str, dict[str, Any]]
STATUS = {"met": "**met**", "not met": "**not met**", "not measured": "not measured"}


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _metric_rows(systems: Systems, metric: str) -> list[list[str]]:
    rows: list[tuple[float, list[str]]] = []
    for name, system in systems.items():
        summary = system["metrics"].get(metric)
        if summary is None:
            continue
        ratio = summary.get("ratio")
        ratio_text = f"{ratio['value']:.2f}x {ratio['baseline']}" if ratio else ""
        note = summary.get("command") or summary.get("content") or ""
        rows.append((summary["p50"], [f"`{name}`", system["label"], _num(summary["p50"], summary["unit"]),
                                      _num(summary["p95"], summary["unit"]), f"{summary['n']} ({summary['warmup']})",
                                      ratio_text, str(note)]))
    higher = METRICS[metric].higher_is_better if metric in METRICS else False
    return [row for _, row in sorted(rows, key=lambda r: r[0], reverse=higher)]


def _section(systems: Systems, metric: str, heading: str, figure: str | None, image_dir: str,
             config: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    out = [f"### {heading}", ""]
    out += extra or []
    rows = _metric_rows(systems, metric)
    if rows:
        out += _table(["system", "what", "p50", "p95", "n (warm-up)", "ratio", "command / content"], rows)
    else:
        out.append("Not measured in this run.")
    out.append("")
    if figure:
        out += [f"![{title(figure, config)}]({image_dir}/{figure}.png)", ""]
    return out


def _conditions(result: dict[str, Any]) -> list[str]:
    host = result["host"]
    rows = [
        ["OS", str(host.get("os"))], ["kernel", str(host.get("kernel"))], ["CPU", str(host.get("cpu_model"))],
        ["cores", str(host.get("cpus"))], ["memory", f"{host.get('memory_gib')} GiB"],
        ["virtualisation", str(host.get("virtualisation"))], ["Python", str(host.get("python"))],
        ["user", "root" if host.get("euid") == 0 else f"uid {host.get('euid')}"],
        ["bubblewrap", str(host.get("bwrap"))],
        ["other load when the run started", f"{host.get('background_cpu_busy', 0) * 100:.0f}% of all CPUs busy "
                                            f"(sampled while the benchmark slept)"],
        ["load average at start / end", f"{host.get('loadavg_start')} / {host.get('loadavg_end')}"],
        ["duration of the run", f"{result['duration_s']:.0f} s"],
    ]
    for name in ("docker-cli", "srt", "llm-sandbox"):
        info = result["systems"].get(name, {}).get("info", {})
        version = info.get("dockerd") or info.get("version")
        if version:
            rows.append([f"{name} version", str(version) + (f" (node {info['node']})" if info.get("node") else "")])
    if host.get("runsc"):
        rows.append(["runsc (gVisor) version", str(host["runsc"])])
    cluster = result["systems"].get("ray", {}).get("info", {}).get("ray_cluster")
    if cluster:
        nodes = ", ".join(f"{ip}: {slots} slots" for ip, slots in cluster["nodes"].items())
        rows.append(["Ray cluster", f"Ray {cluster['ray']}, {len(cluster['nodes'])} nodes on this machine ({nodes}), "
                                    f"started in {cluster['cluster_start_s']:.0f} s"])
    return _table(["", ""], rows)


def _scaling(systems: Systems) -> list[str]:
    rows = []
    for name, system in systems.items():
        for lv in system["info"].get("scaling") or []:
            mem = lv.get("memory") or {}
            pss = sorted(mem.get("pss_mib") or [])
            rows.append([f"`{name}`", str(lv["sessions"]), _num(lv["provision"]["p50"], "ms"),
                         _num(lv["provision"]["p95"], "ms"), _num(lv["provision_wall_ms"], "ms"),
                         _num(lv["exec"]["p50"], "ms"), _num(lv["exec"]["p95"], "ms"), _num(lv["exec_per_second"]),
                         _num(pss[len(pss) // 2], "MiB") if pss else "-", _num(mem.get("rss_p50_mib"), "MiB"),
                         _num(lv["terminate"]["p50"], "ms"), _num(lv["terminate_wall_ms"], "ms")])
    if not rows:
        return ["Not measured in this run.", ""]
    head = ["backend", "sessions", "provision p50", "provision p95", "all provisioned", "exec p50", "exec p95",
            "execs/s", "PSS p50", "RSS p50", "terminate p50", "all terminated"]
    return [*_table(head, rows), ""]


def _placement(systems: Systems) -> list[str]:
    lines = []
    for name, system in systems.items():
        for lv in system["info"].get("scaling") or []:
            if lv.get("per_node"):
                spread = ", ".join(f"{count} on {ip}" for ip, count in sorted(lv["per_node"].items()))
                lines.append(f"- `{name}`, {lv['sessions']} sessions: {spread}.")
    return [*lines, ""] if lines else []


def _gateway(systems: Systems, image_dir: str) -> list[str]:
    gw = systems.get("gateway")
    if gw is None or not gw["available"]:
        reason = gw["reason"] if gw else "not selected"
        return [f"Not measured: {reason}", ""]
    m, info = gw["metrics"], gw["info"]
    out = []
    if "connect_direct" in m:
        rows = [[way, _num(m[f"connect_{way}"]["p50"], "ms"), _num(m[f"connect_{way}"]["p95"], "ms"),
                 _num(info["added_connect_ms"].get(way), "ms") if way != "direct" else "baseline"]
                for way in ("direct", "http", "socks5")]
        out += [*_table(["connection setup", "p50", "p95", "added (p50)"], rows), ""]
    if "stream_direct" in m:
        rows = [[way, _num(m[f"stream_{way}"]["p50"], "MB/s"), _num(m[f"stream_{way}"]["min"], "MB/s")]
                for way in ("direct", "http")]
        out += _table(["one stream", "p50", "slowest run"], rows)
        out += ["", f"Ratio through the gateway: {info['stream_ratio'] * 100:.0f}% of direct "
                    f"({m['stream_direct']['bytes'] / 1e6:.0f} MB per run).", ""]
    conc = info.get("concurrent")
    if conc:
        setup = conc.get("setup") or {}
        out += [f"Concurrency: {conc['connections']} tunnels opened at once, {conc['errors']} errors, "
                f"{conc['open_in_gateway_at_peak']} relaying in the gateway at the peak, all open after "
                f"{_num(conc['all_open_wall_ms'], 'ms')} (setup p50 {_num(setup.get('p50'), 'ms')}, p95 "
                f"{_num(setup.get('p95'), 'ms')}); gateway RSS at the peak "
                f"{_num(conc['gateway_rss_at_peak_mib'], 'MiB')}.", ""]
    for key, when in (("memory_idle", "idle, after start"), ("memory_after_load", "idle again, after the load")):
        mem = info.get(key)
        if mem:
            out.append(f"- Gateway memory {when}: RSS {_num(mem['rss_mib'], 'MiB')}, PSS "
                       f"{_num(mem['pss_mib'], 'MiB')}, private {_num(mem['uss_mib'], 'MiB')}.")
    out += ["", f"![{FIGURES['gateway_latency']}]({image_dir}/gateway_latency.png)",
            f"![{FIGURES['gateway_throughput']}]({image_dir}/gateway_throughput.png)", ""]
    return out


def _skipped(systems: Systems) -> list[str]:
    rows = []
    for name, system in systems.items():
        if not system["available"]:
            rows.append([f"`{name}`", "everything", str(system["reason"])])
            continue
        for metric, reason in system["skipped"].items():
            rows.append([f"`{name}`", metric, reason])
    return _table(["system", "metric", "why"], rows) if rows else ["Everything selected was measured."]


METHOD = """\
- Every figure is a median (p50) and a 95th percentile (nearest rank) over the runs listed as `n`; the warm-up
  runs in brackets ran first and were thrown away. Ratios divide medians measured in this same run.
- Times are wall-clock (`time.perf_counter`) around the whole operation as a caller sees it: the Python API for
  stockade backends and llm-sandbox, a spawned command for the CLI tools (`bench.cmdtimer`, the same code for
  every command-line system), raw HTTP on the daemon's unix socket for `docker-api`.
- **provision -> ready** runs until a first `true` succeeds in the new session. **exec** is `true` in an
  existing session. **streaming** reads `head -c 100000000 /dev/zero` as it arrives (llm-sandbox through
  an `on_stdout` callback, its streaming mode).
  **snapshot** captures 100 MB of session files (50 MB random bytes, incompressible, and 50 MB of zeros);
  **restore** provisions a new session from it and waits until the random file is back at full size.
  **suspend/resume** is one suspend plus one resume of a session. **terminate** is until the call returns.
- **Memory snapshot** (backends whose snapshots keep memory: the docker backend under gVisor): a session holds
  50 MB of random bytes in its `/dev/shm` (a tmpfs of gVisor's own kernel, so only the memory image brings them
  back); the snapshot is timed, then a new session is provisioned from it until the 50 MB are back. Each round
  starts from a fresh session (provisioned and filled untimed).
- **Rows**: `docker` is the docker backend with runc and `docker-runsc` the same backend with `runtime="runsc"`
  (Debian's gVisor, registered in the private dockerd's runtimes with `--network=none --oci-seccomp`), both on
  the benchmark's private dockerd. `ray` runs on a two-node Ray cluster the benchmark starts on this machine
  (each node a `ray start` in a network namespace of its own, bridged on a private /28, no route out; bwrap as
  the node backend; slots for the largest scaling level), so its figures are Ray's overhead on one host, without
  a real network between driver and nodes; its memory per session counts the sandbox's processes, not the
  node's shared Ray agent. `landlock`'s memory per session is its supervisor process and what runs under it.
- **Host memory per idle session**: all sessions of the largest scaling level are left idle, then the PSS of each
  session's processes is summed from `/proc/<pid>/smaps_rollup` (every process of the session's own cgroup, the
  descendants of its pid, and the ancestors created for it alone: bubblewrap's monitor, a container's shim).
  PSS shares common pages (the interpreter, libc) among the processes that map them, so it is what a session
  adds to the host when many run; RSS, which counts shared pages once per process, is given for comparison.
  Sessions per GiB = 1024 / PSS p50.
- **Scaling**: N sessions are provisioned at once, `true` runs in all of them at once for a few rounds, then all
  are terminated at once.
- **Gateway**: `python -m stockade.gateway` with its HTTP-proxy and SOCKS5 listeners on 127.0.0.1 and a fake
  upstream on 127.0.0.2 (`bench.upstream`), reached by name through the gateway's static resolver. The direct
  baseline is the same client talking to the same upstream without the gateway; direct and gateway samples are
  interleaved. Connection setup = connect + tunnel set-up + one echoed byte.
- Peers and loopback: srt runs with an empty `allowedDomains` list; the private dockerd (`--bridge=none
  --iptables=false --ip-masq=false`, its own data and exec roots in a temporary directory) runs containers with
  `--network none` from a busybox-static image imported locally (nothing is pulled). srt, dockerd and the
  llm-sandbox worker each run inside a network namespace that has only `lo`, so no peer can send a packet off
  the host whatever it does on start. The dockerd is stopped by its pid at the end.
"""


def render(result: dict[str, Any], image_dir: str) -> str:
    """The whole page; ``image_dir`` is where the PNGs are, relative to the page."""
    systems: Systems = result["systems"]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by the benchmark runner (bench/report.py). Do not edit: rerun the command below. -->",
        "",
        f"Generated {result['generated']} by:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        "This machine is shared: other sessions were running tests at the same time, so every figure carries "
        "noise (the load at the start is under *Machine and conditions*). Rerun the command on your own machine "
        "to get yours; the install scripts for the peers are in `bench/` (`bench/install_peers.sh` installs "
        "all of them).",
        "",
        "## Targets from the backend issues",
        "",
    ]
    rows = [[f"#{t['issue']}", f"`{t['system']}`", t["target"], t["measured"] or "-", STATUS[t["status"]],
             t["note"]] for t in result["targets"]]
    out += [*_table(["issue", "system", "target", "measured", "status", "note"], rows), ""]
    out += ["## Machine and conditions", "", *_conditions(result), ""]
    out += ["## Results", ""]
    cfg = result["config"]
    stream_mb, snap_mb = cfg["stream_bytes"] / 1e6, cfg["snapshot_bytes"] / 1e6
    out += _section(systems, "provision_ready", "Provision -> ready", "provision_ready", image_dir, cfg,
                    ["One-shot systems (a new sandbox per command) have no separate provision step; the figure "
                     "shows their whole start-up next to the sessions' provisioning, and their numbers are in the "
                     "exec table.", ""])
    out += _section(systems, "exec_true", "Exec round trip of `true`", "exec_true", image_dir, cfg)
    out += _section(systems, "stream_stdout", f"Streaming {stream_mb:g} MB of stdout", "stream_stdout", image_dir,
                    cfg)
    out += _section(systems, "snapshot", f"Snapshot of {snap_mb:g} MB of session files", None, image_dir, cfg)
    out += _section(systems, "restore", "Restore from that snapshot", "snapshot_restore", image_dir, cfg)
    mem_mb = cfg.get("memory_snapshot_bytes", 0) / 1e6
    out += _section(systems, "memory_snapshot", f"Snapshot of a session holding {mem_mb:g} MB in memory (gVisor)",
                    None, image_dir, cfg)
    out += _section(systems, "memory_restore", "Restore from that snapshot, memory included", None, image_dir, cfg)
    out += _section(systems, "suspend_resume", "Suspend + resume", "suspend_resume", image_dir, cfg)
    out += _section(systems, "terminate", "Terminate", "terminate", image_dir, cfg)
    out += _section(systems, "idle_memory", "Host memory per idle session", "idle_memory", image_dir, cfg,
                    _memory_lines(systems))
    levels = ", ".join(str(n) for n in cfg["scaling_levels"])
    out += [f"### Scaling: {levels} sessions at once", "", *_scaling(systems), *_placement(systems)]
    out += [f"![{FIGURES['scaling']}]({image_dir}/scaling.png)", ""]
    out += ["### Egress gateway", "", *_gateway(systems, image_dir)]
    out += ["## Not measured, and why", "", *_skipped(systems), ""]
    out += ["## How it is measured", "", METHOD]
    out += ["## Reproduce", "", "```sh",
            "bench/install_peers.sh   # as root: docker.io + runsc + busybox-static, srt (npm), llm-sandbox (venv)",
            "pip install -e '.[bench,ray]' # matplotlib; Ray for the `ray` row",
            result["command"],
            "```", "",
            "The last command wrote this page and `docs/benchmarks/` (plots and `results.json`). The smoke run "
            "that CI does (tests/test_bench_quick.py) is `python -m bench --quick --backend bwrap --peers none "
            "--out DIR`.", ""]
    return "\n".join(out)


def _memory_lines(systems: Systems) -> list[str]:
    lines = []
    for name, system in systems.items():
        summary = system["metrics"].get("idle_memory")
        if summary is None:
            continue
        spg = summary.get("sessions_per_gib")
        cgroup = summary.get("cgroup_p50")
        lines.append(f"- `{name}`: {summary['sessions']} idle sessions; PSS p50 {_num(summary['p50'], 'MiB')} "
                     f"(max {_num(summary['max'], 'MiB')}), RSS p50 {_num(summary.get('rss_p50'), 'MiB')}, private "
                     f"{_num(summary.get('uss_p50'), 'MiB')}"
                     + (f", cgroup charge p50 {_num(cgroup, 'MiB')}" if cgroup is not None else "")
                     + f"; about {_num(spg)} sessions per GiB. Processes per session: "
                     f"{', '.join(summary.get('processes') or []) or '-'}.")
    return [*lines, ""] if lines else []
