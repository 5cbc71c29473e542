"""Idle watcher of one bwrap session: freezes it after ``idle_timeout`` without an exec.

Started detached by ``provision`` when the spec has ``limits.idle_timeout`` (and a cgroup freezer exists); it
exits when the session's directory disappears (terminate) or its sandbox dies. Idleness is asked of the agent,
which knows whether an exec is in flight, so a long-running exec is never frozen mid-way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

from ._client import AgentGone, AgentReply, send_request


def main(argv: list[str]) -> int:
    state_root, session_id, idle = Path(argv[0]), argv[1], float(argv[2])
    from ._backend import BwrapBackend

    backend = BwrapBackend(state_root)
    sock = str(backend.store.session_dir(session_id) / "agent.sock")
    while True:
        time.sleep(max(0.05, min(idle / 4, 1.0)))
        record = backend.store.read(session_id)
        if record is None or not backend._alive(record):
            return 0
        if record["state"] != "running":
            continue
        try:
            status = anyio.run(send_request, sock, {"op": "status"})
        except (AgentGone, AgentReply):
            continue
        if status["execs"] == 0 and status["idle_seconds"] >= idle:
            anyio.run(backend.suspend, session_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
