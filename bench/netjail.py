"""Run a peer inside a fresh network namespace that has only ``lo``: it cannot reach anything but loopback.

Peers are third-party programs; their own settings already keep them off the network (srt with an empty
``allowedDomains``, containers with ``--network none``), and this makes that a kernel guarantee instead of a
promise: whatever a peer tries on start (update checks, telemetry, image pulls), no packet leaves the host.
The private dockerd runs in such a namespace too (see ``peers.dockerd``).
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["jailed", "probe"]

_SCRIPT = 'ip link set lo up && exec "$@"'


def jailed(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it runs in a new network namespace with loopback up."""
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    return [*unshare, "--", "sh", "-c", _SCRIPT, "netjail", *argv]


def probe() -> str | None:
    """None when ``jailed`` works here, else why not."""
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} is missing: apt-get install {package}"
    proc = subprocess.run(jailed(["true"]), capture_output=True, timeout=30)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.decode(errors='replace').strip()[-300:]}"
    return None
