"""Verdicts, per-case results, and the report ``run_conformance`` returns and ``stockade doctor`` prints."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["FAILING", "CaseResult", "Report", "Verdict"]


class Verdict(StrEnum):
    """The outcome of one case.

    ``CONFORMS``: measured and as the contract says. ``ESCAPED``: something the policy forbids happened.
    ``OVERREFUSED``: something the policy grants was refused. ``NOT_MEASURED``: this run could not measure it
    (the detail says what is missing). ``NOT_APPLICABLE``: the backend honestly lacks the feature and the case
    has nothing to check. ``PROBE_BROKEN``: the case could not reach a conclusion (unexpected error, timeout).
    """

    CONFORMS = "conforms"
    ESCAPED = "escaped"
    OVERREFUSED = "overrefused"
    NOT_MEASURED = "not_measured"
    NOT_APPLICABLE = "not_applicable"
    PROBE_BROKEN = "probe_broken"


FAILING: frozenset[Verdict] = frozenset({Verdict.ESCAPED, Verdict.OVERREFUSED, Verdict.PROBE_BROKEN})
"""Verdicts that make a run fail. A broken probe fails too: an unmeasured case must not pass as green."""


@dataclass(frozen=True)
class CaseResult:
    """One case's verdict. ``case`` is the dotted id, ``detail`` says what was observed."""

    case: str
    verdict: Verdict
    detail: str
    duration_ms: float

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "verdict": self.verdict.value,
            "detail": self.detail,
            "duration_ms": round(self.duration_ms, 3),
        }


@dataclass
class Report:
    """The results of one conformance run against one backend on one host."""

    backend: str
    host: dict[str, Any]
    cases: list[CaseResult]

    def summary(self) -> dict[str, int]:
        """Count per verdict value (every verdict present, zeros included) plus ``"total"``."""
        counts = {verdict.value: 0 for verdict in Verdict}
        for result in self.cases:
            counts[result.verdict.value] += 1
        counts["total"] = len(self.cases)
        return counts

    @property
    def failed(self) -> bool:
        """True when any case has a failing verdict (escaped, overrefused, probe_broken)."""
        return any(result.failed for result in self.cases)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "host": dict(self.host),
            "cases": [result.to_json() for result in self.cases],
            "summary": self.summary(),
        }

    def render_text(self, width: int | None = None) -> str:
        """A table for terminals: one line per case; failing cases get their full detail underneath."""
        if width is None:
            width = max(80, shutil.get_terminal_size((120, 24)).columns)
        id_width = max([len(r.case) for r in self.cases] + [4])
        verdict_width = max(len(v.value) for v in Verdict)
        host = ", ".join(f"{k} {self.host[k]}" for k in ("kernel", "uid", "python") if k in self.host)
        lines = [f"stockade conformance: backend {self.backend}" + (f" ({host})" if host else "")]
        lines.append(f"  {'verdict':<{verdict_width}}  {'case':<{id_width}}  {'time':>8}  detail")
        for result in self.cases:
            head = f"  {result.verdict.value:<{verdict_width}}  {result.case:<{id_width}}  "
            head += f"{_ms(result.duration_ms):>8}  "
            room = max(20, width - len(head))
            first = result.detail.splitlines()[0] if result.detail else ""
            lines.append(head + (first if len(first) <= room else first[: room - 3] + "..."))
            if result.failed and (len(first) > room or "\n" in result.detail):
                indent = " " * 6
                for paragraph in result.detail.splitlines():
                    lines.extend(
                        textwrap.wrap(paragraph, width - len(indent), initial_indent=indent,
                                      subsequent_indent=indent) or [indent]
                    )
        counts = self.summary()
        parts = [f"{counts[v.value]} {v.value}" for v in Verdict if counts[v.value]]
        status = "FAILED" if self.failed else "ok"
        lines.append(f"{status}: {counts['total']} cases" + (": " + ", ".join(parts) if parts else ""))
        return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms"
