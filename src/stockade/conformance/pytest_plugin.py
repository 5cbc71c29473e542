"""pytest integration: one test per conformance case, for any backend, in a few lines.

A backend's test module::

    from stockade import open_backend
    from stockade.conformance.pytest_plugin import make_conformance_tests

    test_conformance = make_conformance_tests(lambda: open_backend("bwrap"))

``conforms`` and ``not_applicable`` pass, ``not_measured`` skips with the reason, any failing verdict fails
with the detail; a factory raising ``BackendUnavailable`` skips with its reason. Registered as the
``pytest11`` entry point ``stockade`` but defines no hooks or fixtures: loading it changes nothing elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import anyio
import pytest

from ..backend import SandboxBackend
from ..errors import BackendUnavailable
from .context import ConformanceOptions
from .engine import list_cases, run_case
from .report import FAILING, CaseResult, Verdict

__all__ = ["check_result", "make_conformance_tests", "verdict_outcome"]

Outcome = Literal["pass", "skip", "fail"]


def verdict_outcome(result: CaseResult) -> tuple[Outcome, str]:
    """What a verdict means to pytest, and the message to show."""
    message = f"{result.case}: {result.verdict.value}: {result.detail}"
    if result.verdict in FAILING:
        return "fail", message
    if result.verdict is Verdict.NOT_MEASURED:
        return "skip", message
    # Both remaining verdicts pass; listing them keeps a newly added verdict from passing by default.
    if result.verdict in (Verdict.CONFORMS, Verdict.NOT_APPLICABLE):
        return "pass", message
    return "fail", f"{message} (verdict unknown to the pytest plugin)"


def check_result(result: CaseResult) -> None:
    """Turn a case result into a pytest outcome (returns on pass, else skips or fails the test)."""
    outcome, message = verdict_outcome(result)
    if outcome == "skip":
        pytest.skip(message)
    elif outcome == "fail":
        pytest.fail(message, pytrace=False)


def make_conformance_tests(
    backend_factory: Callable[[], SandboxBackend],
    options: ConformanceOptions | None = None,
) -> Callable[[str], None]:
    """A pytest test function parametrized over every case id; each call runs that case on a fresh backend."""

    async def run_one(case_id: str) -> CaseResult:
        try:
            backend = backend_factory()
        except BackendUnavailable as exc:
            pytest.skip(f"backend unavailable: {exc.reason}")
        async with backend:
            return await run_case(backend, case_id, options)

    @pytest.mark.parametrize("conformance_case", list_cases())
    def test_conformance(conformance_case: str) -> None:
        check_result(anyio.run(run_one, conformance_case))

    return test_conformance
