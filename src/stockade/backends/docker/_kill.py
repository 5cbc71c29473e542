"""Killing the whole process tree of one exec when its timeout fires.

The engine can only signal a container as a whole, so each exec carries its own handle:

- **runc** (host pids visible): every exec runs under the engine's init binary (tini, ``docker-init -s``)
  registered as a child subreaper, so orphans and double-forked daemons of the exec stay below it. On timeout
  the host stops that wrapper, kills its descendants until none is left (their orphans keep landing on the
  stopped wrapper), then kills the wrapper. Runs on the host: it works even when the exec exhausted the
  container's pids limit, where a helper exec could not start.
- **gVisor** (processes live inside the Sentry; the 2022 runsc has no ``PR_SET_CHILD_SUBREAPER``): a helper
  exec runs :data:`GUEST_KILLER` in the container. It kills, round after round, every process whose
  environment holds the exec's ``STOCKADE_EXEC_ID`` and every descendant of those. Known gap: a process that
  both leaves the tree (double fork) *and* replaces its environment escapes the timeout (it still dies with the
  session).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

__all__ = ["GUEST_KILLER", "host_kill_tree"]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":
            continue  # already dead; its parent reaps it
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int) -> list[int]:
    tree = _children_map()
    found: list[int] = []
    frontier = [root]
    while frontier:
        nxt = [kid for pid in frontier for kid in tree.get(pid, [])]
        found += nxt
        frontier = nxt
    return found


def _start_time(pid: int) -> bytes | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19]


def host_kill_tree(wrapper_pid: int, expected_start: bytes | None = None, timeout: float = 10.0) -> None:
    """Stop ``wrapper_pid`` (a subreaper), kill all its descendants until none is left, then kill it."""
    if wrapper_pid <= 1 or (expected_start is not None and _start_time(wrapper_pid) != expected_start):
        return
    with contextlib.suppress(ProcessLookupError):
        # Stopped, it cannot exit and hand its orphans to the container's init, yet still adopts them.
        os.kill(wrapper_pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _descendants(wrapper_pid)
        if not kids:
            break
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):
        os.kill(wrapper_pid, signal.SIGKILL)


# POSIX sh plus grep, sed and cat (busybox and Debian have them). $1 is the exec id (hex, so a safe regex);
# not grep -F: busybox's fixed-string search stops at the first NUL of an environ file.
GUEST_KILLER = r"""
t="STOCKADE_EXEC_ID=$1"; me=$$; rounds=0
while [ $rounds -lt 200 ]; do
  rounds=$((rounds+1))
  set -- $(grep -l "$t" /proc/[0-9]*/environ 2>/dev/null | sed 's,^/proc/,,; s,/environ$,,')
  marked=" $* "
  grew=1
  while [ $grew = 1 ]; do
    grew=0
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      case "$marked" in *" $p "*) continue;; esac
      line=$(cat "$d/stat" 2>/dev/null) || continue
      rest=${line##*) }
      set -- $rest
      [ "$1" = Z ] && continue
      case "$marked" in *" $2 "*) marked="$marked$p "; grew=1;; esac
    done
  done
  victims=""
  for p in $marked; do [ "$p" = "$me" ] || victims="$victims $p"; done
  [ -z "$victims" ] && exit 0
  kill -9 $victims 2>/dev/null
done
exit 1
"""
