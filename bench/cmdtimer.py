"""Time whole commands the same way for every baseline and peer (stdlib only).

Used in-process for the host baselines and as ``python -m bench.cmdtimer`` for peers that run inside a
loopback-only network namespace (see ``netjail``), so that the timing method is identical on both sides::

    python -m bench.cmdtimer --runs 20 --warmup 2 -- srt --settings s.json true
    python -m bench.cmdtimer --runs 3 --warmup 1 --stream 100000000 -- head -c 100000000 /dev/zero

Prints one JSON object: ``{"seconds": [...], "bytes": N|null}``. A command that exits non-zero (or, with
``--stream``, delivers another byte count) stops the run with status 1 and its stderr on ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

__all__ = ["CommandFailed", "run_once", "stream_once", "time_command"]

_CHUNK = 1 << 20


class CommandFailed(RuntimeError):
    """The timed command did not do what it should (non-zero exit, short output)."""


def run_once(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from spawn to exit of ``argv`` (output discarded; it must exit 0)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise CommandFailed(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-800:]}")
    return elapsed


def stream_once(argv: list[str], expect: int, env: dict[str, str] | None = None) -> float:
    """Seconds from spawn to exit of ``argv`` while reading all of its stdout (must be ``expect`` bytes)."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    got = 0
    start = time.perf_counter()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while n := os.readv(fd, [view]):
            got += n
        err = proc.stderr.read() if proc.stderr is not None else b""
        code = proc.wait()
    elapsed = time.perf_counter() - start
    if code != 0 or got != expect:
        tail = err.decode(errors="replace")[-800:]
        raise CommandFailed(f"{argv[0]} exited {code} after {got} of {expect} bytes: {tail}")
    return elapsed


def time_command(
    argv: list[str], runs: int, warmup: int, stream: int | None = None, env: dict[str, str] | None = None
) -> list[float]:
    """Seconds per run of ``argv``; ``warmup`` runs first, discarded."""
    out: list[float] = []
    for i in range(warmup + runs):
        elapsed = stream_once(argv, stream, env) if stream is not None else run_once(argv, env)
        if i >= warmup:
            out.append(elapsed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cmdtimer", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--stream", type=int, default=None, help="read this many bytes of stdout per run")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        seconds = time_command(command, args.runs, args.warmup, args.stream)
    except (CommandFailed, OSError) as exc:
        print(f"cmdtimer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": seconds, "bytes": args.stream}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
