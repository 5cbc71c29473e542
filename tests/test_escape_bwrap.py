"""The escape suite on the bwrap backend: one pytest test per ``escape.*`` case (docs/escape-suite.md).

Escapes the suite found and bwrap has not fixed yet are strict xfails: measured on every run, and red the day
the fix lands (then the entry goes). The uid-mapping ones exist only when the tests run as root, where the
guest's uid maps to the host's uid 0.
"""

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from stockade import cli
from stockade.backends.bwrap import BwrapBackend
from stockade.conformance import select_cases
from stockade.conformance.pytest_plugin import ESCAPE_OPTIONS, make_escape_tests

_STATE = Path(tempfile.mkdtemp(prefix="stockade-escape-"))
atexit.register(shutil.rmtree, _STATE, True)  # every case terminates its sessions; this removes the empty store

test_escape = make_escape_tests(lambda: BwrapBackend(_STATE))


def test_doctor_prints_the_escape_suite(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``stockade doctor --suite escapes`` runs the escape cases (and only them) and reports them."""
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(_STATE))
    code = cli.main(["doctor", "--backend", "bwrap", "--suite", "escapes", "--case", "escape.input.", "--json"])
    reports = json.loads(capsys.readouterr().out)
    cases = {c["case"]: c["verdict"] for c in reports[0]["cases"]}
    assert set(cases) == {c for c in select_cases(ESCAPE_OPTIONS) if c.startswith("escape.input.")}
    assert code == 0 and set(cases.values()) == {"conforms"}, cases
