"""Runs cases against a backend and turns what happened into verdicts.

Cases run one at a time (each provisions real sandboxes) under a per-case timeout. The engine, not the case,
has the last word on a verdict: a case that returns nothing, raises unexpectedly, runs out of time, or claims
``conforms`` without a single backend call is ``probe_broken``, so nothing goes green without being measured.
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from ..backend import SandboxBackend
from ..errors import InvalidRequest
from . import cases as _cases  # noqa: F401 - registers the cases
from . import escape as _escape  # noqa: F401 - registers the opt-in escape suite
from .context import (
    CaseContext,
    CaseDef,
    ConformanceOptions,
    Finding,
    Stop,
    opt_in_suites,
    probe_broken,
    registered_cases,
)
from .report import CaseResult, Report, Verdict

__all__ = [
    "ConformanceOptions",
    "host_info",
    "list_cases",
    "run_case",
    "run_conformance",
    "select_cases",
    "suites",
]


def _suite_of(case_id: str) -> str:
    return case_id.split(".", 1)[0]


def _opt_in_names() -> set[str]:
    return {suite.name for suite in opt_in_suites()}


def list_cases() -> list[str]:
    """Every case id (dotted, ``suite.name``) of the default suites, in run order (opt-in suites excluded)."""
    opt_in = _opt_in_names()
    return [c.id for c in registered_cases() if _suite_of(c.id) not in opt_in]


def suites(include_opt_in: bool = False) -> list[str]:
    """The top-level suite names, in run order; the opt-in ones (``escape``) only with ``include_opt_in``."""
    opt_in = _opt_in_names()
    seen: dict[str, None] = {}
    for case_def in registered_cases():
        suite = _suite_of(case_def.id)
        if include_opt_in or suite not in opt_in:
            seen.setdefault(suite, None)
    return list(seen)


def _prefixes(names: tuple[str, ...]) -> list[str]:
    """Suite names as id prefixes: aliases resolved, each checked to select at least one case."""
    aliases = {alias: suite.name for suite in opt_in_suites() for alias in suite.aliases}
    ids = [c.id for c in registered_cases()]
    prefixes, unknown = [], []
    for name in names:
        prefix = aliases.get(name, name)
        if any(i == prefix or i.startswith(prefix + ".") for i in ids):
            prefixes.append(prefix)
        else:
            unknown.append(name)
    if unknown:
        known = suites(include_opt_in=True) + sorted(aliases)
        raise InvalidRequest(f"unknown suites {sorted(unknown)}; known: {', '.join(known)}", field="suites")
    return prefixes


def _select(options: ConformanceOptions) -> list[CaseDef]:
    prefixes = _prefixes(options.suites) if options.suites is not None else None
    opt_in = _opt_in_names()
    selected = []
    for case_def in registered_cases():
        if prefixes is None:
            if _suite_of(case_def.id) in opt_in:
                continue
        elif not any(case_def.id == p or case_def.id.startswith(p + ".") for p in prefixes):
            continue
        if options.case_filter and options.case_filter not in case_def.id:
            continue
        selected.append(case_def)
    return selected


def select_cases(options: ConformanceOptions | None = None) -> list[str]:
    """The ids ``run_conformance`` would run with ``options``, in run order (raises InvalidRequest for unknown
    suite names)."""
    return [c.id for c in _select(options or ConformanceOptions())]


async def run_conformance(backend: SandboxBackend, options: ConformanceOptions | None = None) -> Report:
    """Run the selected cases against ``backend`` one after another and report every verdict.

    Never raises for a misbehaving backend (that is what verdicts are for); raises ``InvalidRequest`` for
    unknown suite names.
    """
    options = options or ConformanceOptions()
    results = [await _run(backend, case_def, options) for case_def in _select(options)]
    return Report(backend=backend.name, host=host_info(), cases=results)


async def run_case(
    backend: SandboxBackend, case_id: str, options: ConformanceOptions | None = None
) -> CaseResult:
    """Run the one case ``case_id`` (exact id; the options' filters do not apply)."""
    for case_def in registered_cases():
        if case_def.id == case_id:
            return await _run(backend, case_def, options or ConformanceOptions())
    raise InvalidRequest(f"unknown conformance case {case_id!r}", field="case")


async def _run(backend: SandboxBackend, case_def: CaseDef, options: ConformanceOptions) -> CaseResult:
    ctx = CaseContext(backend, options, case_def.id)
    finding = probe_broken("case produced no verdict")
    started = time.perf_counter()
    try:
        with anyio.move_on_after(options.timeout) as scope:
            try:
                finding = await case_def.fn(ctx)
            except Stop as stop:
                finding = stop.finding
            except Exception as exc:
                finding = probe_broken(f"unexpected {type(exc).__name__} in the probe: {exc}")
        if scope.cancelled_caught:
            finding = probe_broken(f"case timed out (after {options.timeout:g} s)")
    finally:
        problems = await ctx.cleanup()
    finding = _vet(finding, ctx)
    detail = finding.detail
    if problems:
        detail += " [cleanup: " + "; ".join(problems) + "]"
    verdict = finding.verdict
    # A case that could not remove what it made did not keep its own rule; do not let it pass.
    if verdict is Verdict.CONFORMS and any("vanished" not in p for p in problems):
        verdict = Verdict.PROBE_BROKEN
    return CaseResult(case_def.id, verdict, detail, (time.perf_counter() - started) * 1000)


def _vet(finding: object, ctx: CaseContext) -> Finding:
    if not isinstance(finding, Finding):
        return probe_broken(f"case returned {finding!r} instead of a verdict")
    if finding.verdict is Verdict.CONFORMS and ctx.calls == 0:
        return probe_broken(f"case concluded 'conforms' without calling the backend: {finding.detail}")
    return finding


# ------------------------------------------------------------------------------------------------- host


def host_info() -> dict[str, Any]:
    """What a report needs to be read later: kernel, user, Python, distribution, cgroup layout."""
    uname = platform.uname()
    info: dict[str, Any] = {
        "kernel": uname.release,
        "machine": uname.machine,
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "user": _user(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "distribution": _distribution(),
        "cgroup": _cgroup_layout(),
    }
    return info


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers with an arbitrary uid)
        return None


def _distribution() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    return None


def _cgroup_layout() -> Any:
    # Imported lazily and defensively: the cgroup helpers are optional and maintained elsewhere, and a report
    # must still come out when they are missing or fail.
    try:
        cgroups = importlib.import_module("stockade.linux.cgroups")
    except ImportError:
        return None
    try:
        layout = cgroups.detect_layout()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return _jsonable(layout)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return _jsonable(to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)
