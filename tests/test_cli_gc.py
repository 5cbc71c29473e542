"""``stockade gc``: a session whose sandbox is gone is reaped; a live one beside it is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stockade import ExecRequest, SandboxSpec
from stockade.backends.bwrap import BwrapBackend, probe
from stockade.cli import EXIT_OK, EXIT_STOCKADE_ERROR, main

REASON = probe()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"bwrap backend unavailable: {REASON}")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "state"
    yield root
    backend = BwrapBackend(root)
    for session_id in backend.store.ids():  # a failed test must not leave sandboxes behind
        anyio.run(backend.terminate, session_id)


def _create_elsewhere(state: Path) -> str:
    """Provision a session from another process, which then exits (as a CLI or agent process would)."""
    creator = textwrap.dedent(f"""
        import anyio
        from stockade import SandboxSpec
        from stockade.backends.bwrap import BwrapBackend
        async def main():
            print((await BwrapBackend({str(state)!r}).provision(SandboxSpec())).id)
        anyio.run(main)
    """)
    out = subprocess.run([sys.executable, "-c", creator], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    return out.stdout.strip()


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


def _gc(state: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    status = main(["gc", "--backend", "bwrap", "--state-dir", str(state), *extra])
    return status, capsys.readouterr().out


def test_gc_reaps_a_session_whose_sandbox_is_gone_and_leaves_a_live_one(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead, live = _create_elsewhere(state), _create_elsewhere(state)
    backend = BwrapBackend(state)
    record = backend.store.read(dead)
    assert record is not None
    cgroup_paths = [Path(p) for p in (record.get("cgroup") or {}).get("paths", [])]
    # Kill the sandbox's processes by pid: its supervisor (bwrap) and the agent, pid 1 of its namespace.
    for pid in (record["bwrap_pid"], record["init_pid"]):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(record["init_pid"]):
        assert time.monotonic() < deadline, "the killed sandbox is still running"
        time.sleep(0.02)
    assert anyio.run(backend.get_session, dead).metadata.get("health") == "dead"

    status, out = _gc(state, capsys, "--json")
    assert status == EXIT_OK
    assert json.loads(out) == {"backend": "bwrap", "reaped": [dead]}
    assert not backend.store.session_dir(dead).exists()
    for path in cgroup_paths:
        assert not path.exists()
    # The live sibling is untouched and still runs commands.
    assert backend.store.ids() == [live]
    result = anyio.run(backend.exec, live, ExecRequest(command="sh", args=("-c", "echo still-here")))
    assert result.stdout == "still-here\n"
    assert anyio.run(backend.get_session, live).metadata.get("health") is None

    status, out = _gc(state, capsys)  # nothing left to reap: the live one stays
    assert (status, out) == (EXIT_OK, "no dead sessions of bwrap\n")
    assert backend.store.ids() == [live]


def test_gc_text_output_names_what_it_reaped(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = BwrapBackend(state)
    session = anyio.run(backend.provision, SandboxSpec())
    record = backend.store.read(session.id)
    assert record is not None
    os.kill(record["init_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(record["init_pid"]):
        assert time.monotonic() < deadline, "the killed sandbox is still running"
        time.sleep(0.02)
    status, out = _gc(state, capsys)
    assert status == EXIT_OK
    assert out == f"reaped 1 dead session(s) of bwrap:\n{session.id}\n"
    assert backend.store.ids() == []


def test_gc_with_an_unknown_backend_is_a_stockade_error(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["gc", "--backend", "no-such-backend"])
    assert status == EXIT_STOCKADE_ERROR
    assert "no-such-backend" in capsys.readouterr().err
