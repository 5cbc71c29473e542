"""The benchmark runner keeps working: its quick mode on bwrap and the baselines, and the pieces it judges by.

No thresholds: speed is reported by ``python -m bench``, never asserted here. What is checked is that every
figure the run promises is either measured or skipped with a reason, that the JSON has its documented shape,
and that the report and the plots are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a tool of the repository, not part of the installed package

from bench.stats import percentile, summarise  # noqa: E402
from bench.targets import TARGETS, evaluate  # noqa: E402

pytestmark = pytest.mark.timeout(240)

BWRAP_METRICS = ("provision_ready", "exec_true", "stream_stdout", "snapshot", "restore", "suspend_resume",
                 "terminate", "idle_memory")
SUMMARY_KEYS = {"unit", "p50", "p95", "mean", "min", "max", "n", "warmup"}


def _bwrap_reason() -> str | None:
    from stockade.backends.bwrap import probe

    return probe()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    reason = _bwrap_reason()
    if reason is not None:
        pytest.skip(f"bwrap cannot run here: {reason}")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--backend", "bwrap", "--peers", "none", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def _check_summary(summary: dict[str, Any]) -> None:
    assert set(summary) >= SUMMARY_KEYS
    assert summary["n"] >= 1
    assert summary["min"] <= summary["p50"] <= summary["p95"] <= summary["max"]
    assert summary["min"] >= 0


def test_quick_run_shape(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    assert result["schema"] == "stockade-bench/1"
    assert result["mode"] == "quick"
    assert result["command"].startswith("python -m bench --quick")
    assert {"kernel", "cpus", "memory_gib", "background_cpu_busy", "loadavg_start"} <= set(result["host"])
    systems = result["systems"]
    assert {"fork+exec", "bwrap-oneshot", "host-tar", "bwrap", "gateway"} <= set(systems)
    assert not {"srt", "docker-cli", "llm-sandbox"} & set(systems)  # --peers none
    for name, system in systems.items():
        assert system["kind"] in ("backend", "baseline", "peer"), name
        assert system["available"] or system["reason"], name
        for summary in system["metrics"].values():
            _check_summary(summary)
        for metric, why in system["skipped"].items():
            assert why and not why.startswith("failed:"), f"{name} {metric}: {why}"
    for name in ("fork+exec", "bwrap-oneshot"):
        assert "exec_true" in systems[name]["metrics"]


def test_quick_run_measures_or_explains_every_bwrap_figure(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    bwrap = result["systems"]["bwrap"]
    assert bwrap["available"], bwrap["reason"]
    for metric in BWRAP_METRICS:
        assert metric in bwrap["metrics"] or bwrap["skipped"].get(metric), metric
    # Core figures need nothing but bubblewrap: always measured.
    for metric in ("provision_ready", "exec_true", "terminate", "stream_stdout"):
        assert metric in bwrap["metrics"], bwrap["skipped"].get(metric)
    assert bwrap["metrics"]["exec_true"]["ratio"]["baseline"] == "fork+exec exec_true"
    assert bwrap["metrics"]["stream_stdout"]["bytes"] == result["config"]["stream_bytes"]
    if os.geteuid() == 0:  # snapshots and suspend need the cgroup freezer, which root has here
        for metric in ("snapshot", "restore", "suspend_resume", "idle_memory"):
            assert metric in bwrap["metrics"], bwrap["skipped"].get(metric)
        assert bwrap["metrics"]["restore"]["verified"] is True
        memory = bwrap["metrics"]["idle_memory"]
        assert memory["sessions"] == max(result["config"]["scaling_levels"])
        assert memory["rss_p50"] >= memory["p50"] > 0  # PSS never exceeds RSS
    levels = [lv["sessions"] for lv in bwrap["info"]["scaling"]]
    assert levels == list(result["config"]["scaling_levels"])


def test_quick_run_gateway(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    gw = result["systems"]["gateway"]
    assert gw["available"], gw["reason"]
    assert not gw["skipped"], gw["skipped"]
    for metric in ("connect_direct", "connect_http", "connect_socks5", "stream_direct", "stream_http"):
        _check_summary(gw["metrics"][metric])
    conc = gw["info"]["concurrent"]
    assert conc["connections"] == result["config"]["gateway_concurrent"]
    assert conc["errors"] == 0, conc["first_errors"]
    assert gw["info"]["memory_idle"]["rss_mib"] > 0


def test_quick_run_targets_and_report(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick_run
    assert [(t["issue"], t["target"]) for t in result["targets"]] == [(t.issue, t.text) for t in TARGETS]
    for target in result["targets"]:
        assert target["status"] in ("met", "not met", "not measured")
        assert target["measured"] if target["status"] != "not measured" else target["note"]
    # A quick run is too small to judge the 100 MB and 200-session targets: said, not guessed.
    by_text = {t["target"]: t for t in result["targets"]}
    assert by_text["snapshot of 100 MB of session files <= 1 s"]["status"] == "not measured"
    assert by_text["200 idle sessions at once, <= 8 MiB host memory each"]["status"] == "not measured"
    page = (out / "benchmarks.md").read_text()
    assert result["command"] in page
    assert "## Targets from the backend issues" in page
    images = [line.split("](", 1)[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
    assert len(images) >= 10
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def test_docs_refused_for_quick_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--docs"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "too small" in proc.stderr


def test_percentile_and_summary() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile(list(map(float, range(1, 101))), 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0
    summary = summarise([1.0, 2.0, 3.0, 100.0], "ms", 2)
    assert (summary["p50"], summary["p95"], summary["n"], summary["warmup"]) == (2.5, 100.0, 4, 2)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def _system(metrics: dict[str, dict[str, Any]], available: bool = True) -> dict[str, Any]:
    return {"kind": "backend", "label": "", "available": available, "reason": None if available else "gone",
            "info": {}, "metrics": metrics, "skipped": {}}


def test_targets_met_not_met_and_not_measured() -> None:
    def fig(p50: float, **extra: Any) -> dict[str, Any]:
        return {"p50": p50, "p95": p50, "max": p50, **extra}

    fast = {"fork+exec": _system({"exec_true": fig(1.0)}),
            "bwrap": _system({"provision_ready": fig(20.0), "exec_true": fig(1.4), "terminate": fig(25.0),
                              "snapshot": fig(900.0, bytes=2_000_000)})}
    verdicts = {(v["system"], v["target"]): v for v in evaluate(fast)}
    assert verdicts[("bwrap", "provision -> ready p50 <= 30 ms")]["status"] == "met"
    assert verdicts[("bwrap", "exec round trip of `true` p50 <= 1.5x fork+exec of /bin/true")]["status"] == "met"
    assert verdicts[("bwrap", "terminate <= 20 ms")]["status"] == "not met"
    snap = verdicts[("bwrap", "snapshot of 100 MB of session files <= 1 s")]
    assert snap["status"] == "not measured" and "2 MB" in snap["note"]
    assert verdicts[("bwrap", "suspend/resume <= 50 ms")]["status"] == "not measured"
    slow = {"fork+exec": _system({"exec_true": fig(1.0)}), "bwrap": _system({"exec_true": fig(1.6)})}
    verdict = next(v for v in evaluate(slow) if "1.5x" in v["target"])
    assert verdict["status"] == "not met" and verdict["measured"].startswith("1.60x")
    gone = {"bwrap": _system({}, available=False)}
    verdict = next(v for v in evaluate(gone) if v["target"].startswith("provision"))
    assert verdict["status"] == "not measured" and "gone" in verdict["note"]
