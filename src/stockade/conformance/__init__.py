"""The conformance suite: pytest-free checks that a backend enforces the contract, with verdicts.

``report = await run_conformance(backend)`` runs every case and returns a :class:`Report`; ``stockade doctor``
prints ``report.render_text()``; ``stockade.conformance.pytest_plugin.make_conformance_tests`` turns the cases
into one pytest test each. The escape suite (``stockade.conformance.escape``) is opt-in:
``ConformanceOptions(suites=("escape",))``, ``stockade doctor --suite escapes``, ``make_escape_tests``.
"""

from .context import ConformanceOptions
from .engine import host_info, list_cases, run_case, run_conformance, select_cases, suites
from .report import FAILING, CaseResult, Report, Verdict

__all__ = [
    "FAILING",
    "CaseResult",
    "ConformanceOptions",
    "Report",
    "Verdict",
    "host_info",
    "list_cases",
    "run_case",
    "run_conformance",
    "select_cases",
    "suites",
]
