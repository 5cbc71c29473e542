"""One PNG per figure (matplotlib, no display needed): bars are medians, whiskers reach the p95."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from .results import METRICS

__all__ = ["FIGURES", "draw_all", "title"]

Systems = dict[str, dict[str, Any]]
Row = tuple[str, float, float, str]  # label, p50, p95, kind

COLOURS = {"backend": "#1f77b4", "baseline": "#7f7f7f", "peer": "#ff7f0e", "oneshot": "#d62728"}
LEGEND = {"backend": "stockade", "baseline": "baseline (no sandbox / bare tool)", "peer": "peer",
          "oneshot": "a new sandbox per command"}
ONESHOT = {"bwrap-oneshot", "docker-run-rm", "srt"}

FIGURES: dict[str, str] = {
    "provision_ready": "Provision -> ready (p50, whisker p95)",
    "exec_true": "Exec round trip of `true` (p50, whisker p95)",
    "stream_stdout": "Streaming {stream_mb:g} MB of stdout",
    "snapshot_restore": "Snapshot and restore of {snapshot_mb:g} MB of session files",
    "suspend_resume": "Suspend + resume",
    "terminate": "Terminate",
    "idle_memory": "Host memory per idle session",
    "scaling": "Scaling: N sessions at once",
    "gateway_latency": "Gateway: connection setup",
    "gateway_throughput": "Gateway: one stream's throughput",
}


def _kind(name: str, system: dict[str, Any]) -> str:
    return "oneshot" if name in ONESHOT else str(system["kind"])


def _rows(systems: Systems, metric: str, *, oneshots_for: str | None = None, size: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for name, system in systems.items():
        summary = system["metrics"].get(metric)
        if summary is not None and (oneshots_for is None or name not in ONESHOT):
            # A system measured at another size than the figure's title says is labelled with its own.
            label = name
            if size is not None and summary.get("bytes", size) != size:
                label = f"{name} ({summary['bytes'] / 1e6:g} MB)"
            rows.append((label, summary["p50"], summary["p95"], _kind(name, system)))
    if oneshots_for is not None:
        for name in sorted(ONESHOT):
            summary = systems.get(name, {}).get("metrics", {}).get(oneshots_for)
            if summary is not None:
                rows.append((f"{name} (one-shot)", summary["p50"], summary["p95"], "oneshot"))
    return rows


def _bars(ax: Axes, rows: list[Row], unit: str, *, log: bool = False, higher_is_better: bool = False,
          extra_legend: list[Any] | None = None) -> None:
    if not rows:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    rows = sorted(rows, key=lambda r: r[1], reverse=higher_is_better)
    labels = [r[0] for r in rows]
    p50 = [r[1] for r in rows]
    # Throughputs have no "p95 slower" whisker that means the same thing; show the spread only for times.
    err = [[0.0] * len(rows), [max(0.0, r[2] - r[1]) for r in rows]]
    y = list(range(len(rows)))
    ax.barh(y, p50, xerr=None if higher_is_better else err, color=[COLOURS[r[3]] for r in rows], capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit + (" (log scale)" if log else ""))
    if log:
        ax.set_xscale("log")
    for i, row in enumerate(rows):
        # The label goes past the whisker, where nothing covers it.
        ax.annotate(f" {row[1]:.3g}", (row[1] if higher_is_better else max(row[1], row[2]), i), va="center",
                    fontsize=8)
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    kinds = sorted({r[3] for r in rows})
    handles: list[Any] = [Patch(color=COLOURS[k], label=LEGEND[k]) for k in kinds]
    handles += extra_legend or []
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _figure(rows_count: int, panels: int = 1) -> tuple[Any, list[Axes]]:
    fig, axes = plt.subplots(1, panels, figsize=(10 if panels == 1 else 5.5 * panels, 1.3 + 0.42 * max(rows_count, 3)),
                             squeeze=False)
    return fig, list(axes[0])


_SIZES: dict[str, float] = {"stream_mb": 100.0, "snapshot_mb": 100.0}


def title(figure: str, config: dict[str, Any] | None = None) -> str:
    """The figure's title with the sizes of the run filled in."""
    sizes = dict(_SIZES)
    if config:
        sizes = {"stream_mb": config["stream_bytes"] / 1e6, "snapshot_mb": config["snapshot_bytes"] / 1e6}
    return FIGURES[figure].format(**sizes)


def _save(fig: Any, title: str, path: Path) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _simple(systems: Systems, metric: str, out: Path, config: dict[str, Any] | None,
            oneshots: str | None = None) -> None:
    info = METRICS[metric]
    size = (config or {}).get("stream_bytes") if metric == "stream_stdout" else None
    rows = _rows(systems, metric, oneshots_for=oneshots, size=size)
    fig, (ax,) = _figure(len(rows))
    values = [r[1] for r in rows]
    log = bool(values) and max(values) / max(min(values), 1e-9) > 30
    _bars(ax, rows, info.unit, log=log, higher_is_better=info.higher_is_better)
    _save(fig, title(metric, config), out / f"{metric}.png")


def _snapshot(systems: Systems, out: Path, config: dict[str, Any] | None) -> None:
    snap, restore = _rows(systems, "snapshot"), _rows(systems, "restore")
    fig, axes = _figure(max(len(snap), len(restore)), 2)
    _bars(axes[0], snap, "ms (snapshot)")
    _bars(axes[1], restore, "ms (restore until readable)")
    _save(fig, title("snapshot_restore", config), out / "snapshot_restore.png")


def _memory(systems: Systems, out: Path) -> None:
    rows: list[Row] = []
    rss: dict[str, float] = {}
    for name, system in systems.items():
        summary = system["metrics"].get("idle_memory")
        if summary is not None:
            label = f"{name} ({summary['sessions']} sessions)"
            rows.append((label, summary["p50"], summary["p95"], _kind(name, system)))
            rss[label] = summary.get("rss_p50") or 0.0
    fig, (ax,) = _figure(len(rows))
    _bars(ax, rows, "MiB per session", extra_legend=[Patch(fill=False, edgecolor="black", label="RSS p50")])
    if rows:
        ordered = sorted(rows, key=lambda r: r[1])
        ax.barh(range(len(ordered)), [rss[r[0]] for r in ordered], fill=False, edgecolor="black", linewidth=0.6)
    _save(fig, FIGURES["idle_memory"], out / "idle_memory.png")


def _scaling(systems: Systems, out: Path) -> None:
    curves = {name: s["info"]["scaling"] for name, s in systems.items() if s["info"].get("scaling")}
    fig, axes = _figure(6, 3)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, levels) in enumerate(curves.items()):
        colour = palette[i % len(palette)]  # one colour per backend: solid p50 / PSS, dashed p95 / RSS
        n = [lv["sessions"] for lv in levels]
        for ax, key in ((axes[0], "provision"), (axes[1], "exec")):
            ax.plot(n, [lv[key]["p50"] for lv in levels], marker="o", color=colour, label=f"{name} p50")
            ax.plot(n, [lv[key]["p95"] for lv in levels], marker="x", linestyle="--", color=colour,
                    label=f"{name} p95")
        mem = [(lv["sessions"], lv["memory"]) for lv in levels if lv.get("memory")]
        if mem:
            pss = [sorted(m["pss_mib"])[len(m["pss_mib"]) // 2] for _, m in mem]
            axes[2].plot([k for k, _ in mem], pss, marker="o", color=colour, label=f"{name} PSS p50")
            axes[2].plot([k for k, _ in mem], [m["rss_p50_mib"] for _, m in mem], marker="x", linestyle="--",
                         color=colour, label=f"{name} RSS p50")
    for ax in axes[:2]:
        ax.set_yscale("log")
    titles = ("provision -> ready, each (ms)", "exec `true`, all at once (ms)", "idle memory per session (MiB)")
    levels = sorted({lv["sessions"] for curve in curves.values() for lv in curve})
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        if levels:
            ax.set_xticks(levels, [str(n) for n in levels])
            ax.minorticks_off()
        ax.set_xlabel("sessions at once")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    if not curves:
        axes[1].text(0.5, 0.5, "not measured in this run", ha="center", transform=axes[1].transAxes)
    _save(fig, FIGURES["scaling"], out / "scaling.png")


def _gateway(systems: Systems, out: Path) -> None:
    gw = systems.get("gateway", {}).get("metrics", {})

    def kind(way: str) -> str:
        return "baseline" if way == "direct" else "backend"

    rows = [(way, gw[f"connect_{way}"]["p50"], gw[f"connect_{way}"]["p95"], kind(way))
            for way in ("direct", "http", "socks5") if f"connect_{way}" in gw]
    fig, (ax,) = _figure(len(rows))
    _bars(ax, rows, "ms (connect + tunnel + first echoed byte)")
    _save(fig, FIGURES["gateway_latency"], out / "gateway_latency.png")
    rows = [(way, gw[f"stream_{way}"]["p50"], gw[f"stream_{way}"]["p95"], kind(way))
            for way in ("direct", "http") if f"stream_{way}" in gw]
    fig, (ax,) = _figure(len(rows))
    _bars(ax, rows, "MB/s (one TCP stream)", higher_is_better=True)
    _save(fig, FIGURES["gateway_throughput"], out / "gateway_throughput.png")


def draw_all(systems: Systems, out: Path, config: dict[str, Any] | None = None) -> list[str]:
    """Write every figure into ``out`` (sizes in titles from the run's ``config``); returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    _simple(systems, "provision_ready", out, config, oneshots="exec_true")
    _simple(systems, "exec_true", out, config)
    _simple(systems, "stream_stdout", out, config)
    _snapshot(systems, out, config)
    _simple(systems, "suspend_resume", out, config)
    _simple(systems, "terminate", out, config)
    _memory(systems, out)
    _scaling(systems, out)
    _gateway(systems, out)
    return [f"{name}.png" for name in FIGURES]
