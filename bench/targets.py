"""The speed and density targets written in the backend issues, checked against a run's figures.

Each target says *met*, *not met* or *not measured* (with the reason: the backend is not there, the metric was
skipped, or the run was too small, e.g. a quick run has fewer than 200 sessions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "Target", "evaluate"]

Systems = dict[str, dict[str, Any]]
Verdict = tuple[str, str, str]  # status, what was measured, note
MB = 1_000_000


class _Missing(Exception):
    """A figure a target needs is not in the results; the message says why."""


def _system(systems: Systems, name: str) -> dict[str, Any]:
    system = systems.get(name)
    if system is None:
        raise _Missing(f"no `{name}` in this run (not registered, or not selected)")
    if not system["available"]:
        raise _Missing(f"`{name}` unavailable: {system['reason']}")
    return system


def _metric(systems: Systems, name: str, metric: str) -> dict[str, Any]:
    system = _system(systems, name)
    if metric not in system["metrics"]:
        reason = system["skipped"].get(metric, "not part of this run")
        raise _Missing(f"`{name}` {metric}: {reason}")
    summary: dict[str, Any] = system["metrics"][metric]
    return summary


def _verdict(ok: bool, measured: str, note: str = "") -> Verdict:
    return ("met" if ok else "not met", measured, note)


@dataclass(frozen=True)
class Target:
    issue: int
    system: str
    text: str
    check: Callable[[Systems], Verdict]


def _p50_at_most(name: str, metric: str, limit: float, unit: str = "ms",
                 need: Callable[[dict[str, Any]], str | None] | None = None) -> Callable[[Systems], Verdict]:
    def check(systems: Systems) -> Verdict:
        summary = _metric(systems, name, metric)
        if need is not None and (why := need(summary)) is not None:
            raise _Missing(why)
        return _verdict(summary["p50"] <= limit, f"p50 {summary['p50']:.3g} {unit} (p95 {summary['p95']:.3g})")
    return check


def _ratio_at_most(name: str, metric: str, base: str, base_metric: str, limit: float,
                   base_label: str) -> Callable[[Systems], Verdict]:
    def check(systems: Systems) -> Verdict:
        value, ref = _metric(systems, name, metric), _metric(systems, base, base_metric)
        r = value["p50"] / ref["p50"]
        return _verdict(r <= limit, f"{r:.2f}x ({value['p50']:.3g} ms vs {ref['p50']:.3g} ms {base_label})")
    return check


def _snapshot_100mb(summary: dict[str, Any]) -> str | None:
    size = summary.get("bytes", 0)
    return None if size >= 100 * MB else f"this run captured {size / MB:g} MB, not 100 MB (quick run?)"


def _idle_200(systems: Systems) -> Verdict:
    summary = _metric(systems, "bwrap", "idle_memory")
    if summary.get("sessions", 0) < 200:
        raise _Missing(f"this run held {summary.get('sessions')} sessions at once, not 200 (quick run?)")
    return _verdict(summary["max"] <= 8.0, f"max {summary['max']:.2f} MiB, p50 {summary['p50']:.2f} MiB PSS at "
                                           f"{summary['sessions']} sessions", "judged on the largest session")


def _gateway(systems: Systems) -> dict[str, Any]:
    system = _system(systems, "gateway")
    if "gateway" in system["skipped"]:
        raise _Missing(f"gateway run failed: {system['skipped']['gateway']}")
    return system


def _gw_latency(systems: Systems) -> Verdict:
    system = _gateway(systems)
    added = system["info"]["added_connect_ms"]
    return _verdict(added["http"] <= 2.0, f"+{added['http']:.2f} ms (HTTP CONNECT), +{added['socks5']:.2f} ms (SOCKS5)",
                    "p50 of connect + tunnel + first echoed byte, minus the direct p50")


def _gw_stream(systems: Systems) -> Verdict:
    system = _gateway(systems)
    r = system["info"]["stream_ratio"]
    return _verdict(r >= 0.45, f"{r * 100:.0f}% ({system['metrics']['stream_http']['p50']:.0f} vs "
                               f"{system['metrics']['stream_direct']['p50']:.0f} MB/s direct)")


def _gw_concurrent(systems: Systems) -> Verdict:
    conc = _gateway(systems)["info"].get("concurrent") or {}
    if conc.get("connections", 0) < 1000:
        raise _Missing(f"this run opened {conc.get('connections')} connections, not 1000 (quick run?)")
    return _verdict(conc["errors"] == 0, f"{conc['connections']} tunnels, {conc['errors']} errors, "
                                         f"{conc['open_in_gateway_at_peak']} open in the gateway at once")


def _gw_memory(systems: Systems) -> Verdict:
    mem = _gateway(systems)["info"]["memory_idle"]
    return _verdict(mem["rss_mib"] <= 30.0, f"RSS {mem['rss_mib']:.1f} MiB (PSS {mem['pss_mib']:.1f} MiB)",
                    "judged on RSS, the larger figure")


def _remote_exec(systems: Systems) -> Verdict:
    remote = _metric(systems, "remote", "exec_true")
    inner_name = _system(systems, "remote")["info"].get("inner_backend", "bwrap")
    inner = _metric(systems, inner_name, "exec_true")
    over = remote["p50"] - inner["p50"]
    return _verdict(over <= 5.0, f"{over:+.2f} ms over `{inner_name}` ({remote['p50']:.3g} vs {inner['p50']:.3g} ms)")


def _over_node_backend(metric: str, limit: float) -> Callable[[Systems], Verdict]:
    """``ray``'s p50 minus the p50 of its node backend (``bwrap``, measured in the same run on the same host)."""
    def check(systems: Systems) -> Verdict:
        ray = _system(systems, "ray")
        node = ray["info"].get("ray_cluster", {}).get("node_backend", "bwrap")
        value, ref = _metric(systems, "ray", metric), _metric(systems, node, metric)
        over = value["p50"] - ref["p50"]
        return _verdict(over <= limit, f"{over:+.3g} ms over `{node}` ({value['p50']:.3g} vs {ref['p50']:.3g} ms)",
                        f"`{node}` as the run's own row: the same backend on the same host, outside Ray")
    return check


def _ray_spread(systems: Systems) -> Verdict:
    ray = _system(systems, "ray")
    levels = [lv for lv in ray["info"].get("scaling") or [] if lv.get("per_node")]
    top = max(levels, key=lambda lv: lv["sessions"], default=None)
    if top is None or top["sessions"] < 200:
        failed = next((why for m, why in ray["skipped"].items() if m.startswith("scaling_")), None)
        raise _Missing(f"scaling failed: {failed}" if failed else
                       f"this run placed {top['sessions'] if top else 0} sessions at once through Ray, not 200 "
                       "(quick run?)")
    slots = ray["info"].get("ray_cluster", {}).get("nodes") or {}
    per_node = top["per_node"]
    within = all(count <= slots.get(ip, 0) for ip, count in per_node.items())
    shown = ", ".join(f"{count} on {ip} ({slots.get(ip, '?')} slots)" for ip, count in sorted(per_node.items()))
    return _verdict(len(per_node) == 2 and within, f"{top['sessions']} sessions: {shown}")


def _gvisor_checkpoint(systems: Systems) -> Verdict:
    snap, restore = _metric(systems, "docker-runsc", "memory_snapshot"), _metric(systems, "docker-runsc",
                                                                                   "memory_restore")
    if snap.get("bytes", 0) < 50 * MB:
        raise _Missing(f"this run's session held {snap.get('bytes', 0) / MB:g} MB, not 50 MB (quick run?)")
    return _verdict(max(snap["p50"], restore["p50"]) <= 1000.0,
                    f"checkpoint p50 {snap['p50']:.3g} ms, restore p50 {restore['p50']:.3g} ms "
                    f"({snap['bytes'] / MB:g} MB in the sandbox's memory)", "each judged on its own")


def _never(reason: str) -> Callable[[Systems], Verdict]:
    def check(_systems: Systems) -> Verdict:
        raise _Missing(reason)
    return check


TARGETS: list[Target] = [
    Target(3, "bwrap", "provision -> ready p50 <= 30 ms", _p50_at_most("bwrap", "provision_ready", 30.0)),
    Target(3, "bwrap", "exec round trip of `true` p50 <= 1.5x fork+exec of /bin/true",
           _ratio_at_most("bwrap", "exec_true", "fork+exec", "exec_true", 1.5, "fork+exec")),
    Target(3, "bwrap", "terminate <= 20 ms", _p50_at_most("bwrap", "terminate", 20.0)),
    Target(3, "bwrap", "suspend/resume <= 50 ms", _p50_at_most("bwrap", "suspend_resume", 50.0)),
    Target(3, "bwrap", "snapshot of 100 MB of session files <= 1 s",
           _p50_at_most("bwrap", "snapshot", 1000.0, need=_snapshot_100mb)),
    Target(3, "bwrap", "200 idle sessions at once, <= 8 MiB host memory each", _idle_200),
    Target(4, "gateway", "added connection-setup latency p50 <= 2 ms", _gw_latency),
    Target(4, "gateway", "one stream >= 45% of a direct loopback connection's throughput", _gw_stream),
    Target(4, "gateway", "1000 concurrent connections through one gateway without errors", _gw_concurrent),
    Target(4, "gateway", "gateway memory <= 30 MiB per session at idle", _gw_memory),
    Target(5, "landlock", "exec overhead p50 <= 2x fork+exec of /bin/true",
           _ratio_at_most("landlock", "exec_true", "fork+exec", "exec_true", 2.0, "fork+exec")),
    Target(6, "remote", "exec round trip through the service p50 <= 5 ms over the backend's own", _remote_exec),
    Target(6, "remote", "100 concurrent clients x 100 execs, no error, no mixed output",
           _never("the benchmark has no multi-client load for the service yet")),
    Target(7, "docker", "provision -> ready within 10% of the raw engine calls (`docker run -d` + first exec)",
           _ratio_at_most("docker", "provision_ready", "docker-api", "provision_ready", 1.10, "raw API")),
    Target(7, "docker", "exec round trip within 10% of the raw engine call (`docker exec`)",
           _ratio_at_most("docker", "exec_true", "docker-api", "exec_true", 1.10, "raw API")),
    Target(7, "docker-runsc", "provision -> ready within 10% of the raw engine calls, under gVisor",
           _never("the docker peers (the raw engine calls) run runc only; there is no raw-API baseline under runsc")),
    Target(7, "docker-runsc", "exec round trip within 10% of the raw engine call, under gVisor",
           _never("the docker peers (the raw engine calls) run runc only; there is no raw-API baseline under runsc")),
    Target(7, "docker-runsc", "gVisor checkpoint and restore <= 1 s for a session holding 50 MB", _gvisor_checkpoint),
    Target(8, "ray", "provision through Ray within 100 ms of the node backend's own (warm actors)",
           _over_node_backend("provision_ready", 100.0)),
    Target(8, "ray", "exec round trip overhead <= 3 ms over the node backend", _over_node_backend("exec_true", 3.0)),
    Target(8, "ray", "200 sessions spread over two nodes by slots", _ray_spread),
]


def evaluate(systems: Systems) -> list[dict[str, Any]]:
    """Every target with its status, the figure it was judged on, and a note."""
    out = []
    for target in TARGETS:
        try:
            status, measured, note = target.check(systems)
        except _Missing as missing:
            status, measured, note = "not measured", "", str(missing)
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            status, measured, note = "not measured", "", f"figures incomplete ({type(exc).__name__}: {exc})"
        out.append({"issue": target.issue, "system": target.system, "target": target.text, "status": status,
                    "measured": measured, "note": note})
    return out
