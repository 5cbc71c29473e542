"""Unit tests of the landlock session supervisor's event handling (``_supervisor.py``), without a session.

One ``select()`` batch can hold events for fds that an earlier handler of the same batch closed, and the fd
number may already belong to a new exec (the crash fixed in bwrap's agent with ``_current()``): the
supervisor's handlers act only on fds their object still owns. (Connections are safe by construction: a
closed ``socket.socket`` no longer refers to any fd number.)
"""

from __future__ import annotations

import contextlib
import os
import selectors
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.backends.landlock import _supervisor as sup


class _Conn:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes]] = []
        self.finished: list[tuple[bytes, dict[str, Any]]] = []

    def frame(self, kind: bytes, payload: bytes) -> None:
        self.frames.append((kind, payload))

    def finish(self, kind: bytes, obj: dict[str, Any]) -> None:
        self.finished.append((kind, obj))


class _Sup:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.execs: set[sup.Exec] = set()
        self.last_activity = 0.0


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pipe(opened: list[int]) -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    opened += [w]  # read ends are closed by the code under test, or below
    return r, w


def _exec(owner: _Sup, conn: _Conn, **fds: int) -> sup.Exec:
    ex = sup.Exec.__new__(sup.Exec)  # the real constructor needs a zygote; these handlers do not
    ex.sup = owner  # type: ignore[assignment]
    ex.conn = conn  # type: ignore[assignment]
    ex.limit = 1 << 20
    ex.sent = {"o": 0, "e": 0}
    ex.truncated = ex.done = ex.timed_out = False
    ex.status = None
    ex.status_buf = b""
    ex.runner = 0
    ex.started = 0.0
    ex.deadline = None
    ex.stdin_data = b""
    ex.stdout_r = fds.get("stdout_r", -1)
    ex.stderr_r = fds.get("stderr_r", -1)
    ex.status_r = fds.get("status_r", -1)
    ex.stdin_w = fds.get("stdin_w", -1)
    owner.execs.add(ex)
    return ex


def test_stale_output_event_does_not_read_a_reused_fd(pipes: list[int]) -> None:
    owner, old_conn, new_conn = _Sup(), _Conn(), _Conn()
    finished = _exec(owner, old_conn)  # its pipes are closed (-1): the fd number now belongs to the new exec
    r, w = _pipe(pipes)
    pipes.append(r)
    current = _exec(owner, new_conn, stdout_r=r)
    os.write(w, b"new exec output")
    finished.on_output(r, "o")  # the stale event of the same batch
    finished.on_status()
    finished.on_stdin()
    assert old_conn.frames == [] and old_conn.finished == []
    current.on_output(r, "o")  # the new exec still gets every byte
    assert new_conn.frames == [(b"o", b"new exec output")]


def test_exec_finishes_on_the_runner_report_without_waiting_for_its_exit(pipes: list[int]) -> None:
    owner, conn = _Sup(), _Conn()
    out_r, out_w = _pipe(pipes)
    err_r, _err_w = _pipe(pipes)
    status_r, status_w = _pipe(pipes)
    ex = _exec(owner, conn, stdout_r=out_r, stderr_r=err_r, status_r=status_r)
    os.write(out_w, b"hello")
    # The runner reported and is still tearing itself down: status_w stays open, so no end-of-file yet.
    os.write(status_w, b"R 4242\nX 3\n")
    ex.on_status()
    assert conn.frames == [(b"o", b"hello")]
    assert [(kind, obj["exit_code"], obj["timed_out"]) for kind, obj in conn.finished] == [(b"r", 3, False)]
    assert ex.done and ex.runner == 4242 and ex not in owner.execs
    assert (ex.stdout_r, ex.stderr_r, ex.status_r) == (-1, -1, -1)
