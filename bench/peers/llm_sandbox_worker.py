"""Runs under the llm-sandbox venv's Python (see ``llm_sandbox_peer``): times llm-sandbox's Docker sessions.

    DOCKER_HOST=unix:///.../docker.sock VENV/bin/python llm_sandbox_worker.py '{"image": ..., "runs": ...}'

Prints one JSON object of samples in seconds. Sessions are opened as a user would, with the local busybox
image, ``skip_environment_setup`` (the image has no Python to build a venv with, and nothing may be
downloaded) and ``network_mode: none``. Stdlib plus llm-sandbox only: this file is not part of the
benchmark's own environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import time
from typing import Any


def main() -> int:
    params = json.loads(sys.argv[1])
    llm_sandbox: Any = importlib.import_module("llm_sandbox")
    image, warmup, runs = params["image"], params["warmup"], params["runs"]
    exec_warmup, exec_runs, stream_bytes = params["exec_warmup"], params["exec_runs"], params["stream_bytes"]
    out: dict[str, Any] = {"version": importlib.metadata.version("llm-sandbox")}
    sessions: list[Any] = []

    def new_session() -> Any:
        session = llm_sandbox.SandboxSession(
            backend="docker", image=image, lang="python", skip_environment_setup=True, keep_template=True,
            runtime_configs={"network_mode": "none"}, verbose=False)
        session.open()
        sessions.append(session)
        return session

    def run(session: Any, command: str) -> Any:
        result = session.execute_command(command)
        if result.exit_code != 0:
            raise RuntimeError(f"{command!r} exited {result.exit_code}: {result.stderr[-300:]}")
        return result

    try:
        samples = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            run(new_session(), "true")
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        out["provision_ready"] = samples
        first = sessions[0]
        samples = []
        for i in range(exec_warmup + exec_runs):
            start = time.perf_counter()
            run(first, "true")
            if i >= exec_warmup:
                samples.append(time.perf_counter() - start)
        out["exec_true"] = samples
        # Streamed as llm-sandbox streams: an on_stdout callback switches its exec to docker-py's frame
        # generator (without one, docker-py joins the frames with `bytes +=`, quadratic in the size).
        samples = []
        for i in range(1 + params["stream_runs"]):
            got = 0

            def count(chunk: str) -> None:
                nonlocal got
                got += len(chunk)

            start = time.perf_counter()
            result = first.execute_command(f"head -c {stream_bytes} /dev/zero", on_stdout=count)
            elapsed = time.perf_counter() - start
            if result.exit_code != 0 or got != stream_bytes or len(result.stdout) != stream_bytes:
                raise RuntimeError(f"streamed {got} and kept {len(result.stdout)} of {stream_bytes} bytes "
                                   f"(exit {result.exit_code})")
            if i >= 1:
                samples.append(elapsed)
        out["stream_stdout"] = samples
        samples = []
        for i, session in enumerate(list(sessions)):
            start = time.perf_counter()
            session.close()
            sessions.remove(session)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        out["terminate"] = samples
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for session in sessions:
            try:
                session.close()
            except Exception as exc:
                out.setdefault("cleanup_errors", []).append(repr(exc))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
