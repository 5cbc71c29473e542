"""How a Ray node that hosts stockade sessions is started: the ``ray start`` command line, shared by
``stockade ray up`` and the test cluster.

A node declares how many sessions it takes with the custom resource :data:`SLOT_RESOURCE`; every session holds
one unit for its lifetime (see ``_placement``), so Ray never puts more sessions on a node than it declares.
The node backend's state directory is given to the node's processes through ``STOCKADE_STATE_DIR``: workers
inherit the raylet's environment, so the node agent finds it without any cluster-wide option.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from ...errors import InvalidRequest

__all__ = ["SLOT_RESOURCE", "NodeOptions", "node_argv", "node_env"]

SLOT_RESOURCE = "stockade_slots"
"""The custom resource a node declares (one unit per session it may hold)."""

# Ray refuses an object store below 75 MiB; sessions move only small values through it.
MIN_OBJECT_STORE_BYTES = 78_643_200


@dataclass(frozen=True)
class NodeOptions:
    """What one ``ray start`` declares. ``address`` is the head's ``host:port`` (None starts a head)."""

    slots: int
    address: str | None = None
    node_ip: str | None = None
    port: int = 6379
    num_cpus: int | None = None
    object_store_bytes: int | None = MIN_OBJECT_STORE_BYTES
    temp_dir: str | None = None
    state_dir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    client_server_port: int | None = 10001
    system_config: dict[str, object] = field(default_factory=dict)
    block: bool = False
    fixed_agent_ports: bool = False
    """Give the node's agents fixed ports (52365-52368) instead of letting them pick and announce one through a
    file, which the raylet gives up waiting for on a heavily loaded machine (and fixed ports suit firewalls)."""

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 0:
            raise InvalidRequest(f"must be a whole number >= 0 (got {self.slots!r})", field="slots")
        if self.object_store_bytes is not None and self.object_store_bytes < MIN_OBJECT_STORE_BYTES:
            raise InvalidRequest(f"must be at least {MIN_OBJECT_STORE_BYTES} bytes (Ray's minimum)",
                                 field="object_store_bytes")
        if self.system_config and self.address is not None:
            raise InvalidRequest("is read by the head only; give it when starting the head", field="system_config")


def node_argv(options: NodeOptions, python: str | None = None) -> list[str]:
    """The ``ray start`` command line for ``options`` (run through ``python -m``: no ``ray`` on PATH needed)."""
    argv = [python or sys.executable, "-m", "ray.scripts.scripts", "start"]
    if options.address is None:
        argv += ["--head", f"--port={options.port}", "--include-dashboard=false"]
        if options.client_server_port is not None:
            argv.append(f"--ray-client-server-port={options.client_server_port}")
        if options.system_config:
            argv.append(f"--system-config={json.dumps(options.system_config)}")
    else:
        argv.append(f"--address={options.address}")
    argv.append(f"--resources={json.dumps({SLOT_RESOURCE: options.slots})}")
    argv.append("--disable-usage-stats")
    if options.node_ip:
        argv.append(f"--node-ip-address={options.node_ip}")
    if options.num_cpus is not None:
        argv.append(f"--num-cpus={options.num_cpus}")
    if options.object_store_bytes is not None:
        argv.append(f"--object-store-memory={options.object_store_bytes}")
    if options.temp_dir:
        argv.append(f"--temp-dir={options.temp_dir}")
    if options.labels:
        argv.append(f"--labels={json.dumps(options.labels)}")
    if options.fixed_agent_ports:
        argv += ["--dashboard-agent-listen-port=52365", "--dashboard-agent-grpc-port=52366",
                 "--metrics-export-port=52367", "--runtime-env-agent-port=52368"]
    if options.block:
        argv.append("--block")
    return argv


def node_env(options: NodeOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``ray start``: ``base`` (default: this process's) plus the node's state dir."""
    env = dict(os.environ if base is None else base)
    if options.state_dir:
        env["STOCKADE_STATE_DIR"] = options.state_dir
    # Nothing in a sandbox cluster needs Ray's usage reporting; it would also try to reach the internet.
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's agents and workers are Python processes that start slowly on a busy machine; Ray's default waits
    # (tens of seconds) crash the raylet there. Waiting longer costs nothing on a quiet one.
    env.setdefault("RAY_agent_register_timeout_ms", "180000")
    env.setdefault("RAY_worker_register_timeout_seconds", "180")
    return env
