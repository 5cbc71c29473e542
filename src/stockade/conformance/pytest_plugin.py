"""pytest integration: one test per conformance case, for any backend, in a few lines.

A backend's test module::

    from stockade import open_backend
    from stockade.conformance.pytest_plugin import make_conformance_tests

    test_conformance = make_conformance_tests(lambda: open_backend("bwrap"))

``conforms`` and ``not_applicable`` pass, ``not_measured`` skips with the reason, any failing verdict fails
with the detail; a factory raising ``BackendUnavailable`` skips with its reason. Registered as the
``pytest11`` entry point ``stockade`` but defines no hooks or fixtures: loading it changes nothing elsewhere.

The opt-in escape suite, in one line per backend (``tests/test_escape_<name>.py``)::

    test_escape = make_escape_tests(lambda: open_backend("bwrap"))

``known_failures`` maps a case id to the reason it is known to fail on that backend (an escape with a fix
pending): the test is then a strict xfail, so it turns red as soon as the fix lands and the entry must go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import anyio
import pytest

from ..backend import SandboxBackend
from ..errors import BackendUnavailable
from .context import ConformanceOptions
from .engine import run_case, select_cases
from .report import FAILING, CaseResult, Verdict

__all__ = ["ESCAPE_OPTIONS", "check_result", "make_conformance_tests", "make_escape_tests", "verdict_outcome"]

ESCAPE_OPTIONS = ConformanceOptions(suites=("escape",))
"""The options that select the escape suite (and nothing else)."""

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


def _params(options: ConformanceOptions | None, known_failures: Mapping[str, str] | None) -> list[Any]:
    ids = select_cases(options)
    known = dict(known_failures or {})
    stale = sorted(set(known) - set(ids))
    if stale:
        raise ValueError(f"known_failures names cases that are not selected: {stale}")
    if not known:
        return ids
    return [
        pytest.param(case_id, marks=pytest.mark.xfail(strict=True, reason=known[case_id]))
        if case_id in known
        else case_id
        for case_id in ids
    ]


def make_conformance_tests(
    backend_factory: Callable[[], SandboxBackend],
    options: ConformanceOptions | None = None,
    known_failures: Mapping[str, str] | None = None,
) -> Callable[[str], None]:
    """A pytest test function parametrized over every selected case id (the default suites unless ``options``
    name others); each call runs that case on a fresh backend. ``known_failures``: case id -> reason, run as
    strict xfails."""

    async def run_one(case_id: str) -> CaseResult:
        try:
            backend = backend_factory()
        except BackendUnavailable as exc:
            pytest.skip(f"backend unavailable: {exc.reason}")
        async with backend:
            return await run_case(backend, case_id, options)

    @pytest.mark.parametrize("conformance_case", _params(options, known_failures))
    def test_conformance(conformance_case: str) -> None:
        check_result(anyio.run(run_one, conformance_case))

    return test_conformance


def make_escape_tests(
    backend_factory: Callable[[], SandboxBackend],
    options: ConformanceOptions | None = None,
    known_failures: Mapping[str, str] | None = None,
) -> Callable[[str], None]:
    """:func:`make_conformance_tests` for the escape suite: ``options`` default to :data:`ESCAPE_OPTIONS`
    (give your own to add an upstream; its ``suites`` must still select escape cases)."""
    return make_conformance_tests(backend_factory, options or ESCAPE_OPTIONS, known_failures)
