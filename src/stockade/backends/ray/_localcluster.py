"""A real multi-node Ray cluster on one machine, for tests and benchmarks (needs root).

Ray replaces 127.0.0.1 with the machine's own address, so nodes cannot share loopback. Each node gets a network
namespace of its own, with one end of a veth pair on a bridge in the head's namespace (a private /28); the host
namespace has an end on that bridge too, so that a driver in this process reaches the nodes from any thread (see
:meth:`LocalCluster.connect_driver`). Nothing can leave the machine: the
namespaces have no default route and forward nothing, and the host's end forwards nothing either (IP
forwarding may be on for the rest of the host).

Everything started is found again by namespace (every process whose network namespace is one of ours was
started by us) and killed by PID; then the namespaces (and with them the veths) are deleted. Use it as a
context manager so this happens even when a test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ._nodes import NodeOptions, node_argv, node_env

__all__ = ["LocalCluster", "LocalNode"]

GCS_PORT = 6379


@dataclass
class LocalNode:
    """One node: its namespace, its address on the node link, its state dir, and the ``ray start`` process."""

    name: str
    netns: str
    ip: str
    state_dir: Path
    slots: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """Every process inside this node's network namespace (all of them were started by us)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split() if p.isdigit()]

    def raylet_pid(self) -> int | None:
        return next((pid for pid, argv0 in self._argv0s() if argv0.endswith(b"/raylet")), None)

    def worker_pids(self) -> list[int]:
        """The node's Ray workers (actors and tasks run there); they retitle themselves ``ray::<what>``."""
        return [pid for pid, argv0 in self._argv0s() if argv0.startswith(b"ray::")]

    def _argv0s(self) -> list[tuple[int, bytes]]:
        out = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                out.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]))
        return out


class LocalCluster:
    """``with LocalCluster(slots=(4, 4)) as cluster: cluster.connect_driver(); cluster.wait_nodes()``.

    ``slots`` gives the stockade slots of the head and then of each worker. :attr:`gcs_address` is the address
    for ``open_backend("ray", address=...)`` once this process is a driver.
    """

    def __init__(
        self,
        slots: tuple[int, ...] = (8, 8),
        *,
        root: Path | None = None,
        system_config: dict[str, object] | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        if os.geteuid() != 0:
            raise PermissionError("a namespaced test cluster needs root (network namespaces, veths)")
        if not 2 <= len(slots) <= 6:
            raise ValueError("between 2 and 6 nodes")
        self.tag = secrets.token_hex(3)
        self.root = root or Path(tempfile.mkdtemp(prefix="stk-ray-"))
        self.system_config = system_config or {}
        self.start_timeout = start_timeout
        net = _free_subnet()
        hosts = list(net.hosts())
        self.host_ip = str(hosts[-1])
        self.prefix = net.prefixlen
        self.nodes = [
            LocalNode(
                name="head" if i == 0 else f"worker{i}",
                netns=f"stkray-{self.tag}-{i}",
                ip=str(hosts[i]),
                state_dir=self.root / f"state{i}",
                slots=n,
                labels={"stockade-test-node": "head" if i == 0 else f"worker{i}"},
            )
            for i, n in enumerate(slots)
        ]
        self.host_veth = f"stkr{self.tag}h"
        self._started = False

    @property
    def head(self) -> LocalNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[LocalNode]:
        return self.nodes[1:]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    # ------------------------------------------------------------------------------------------ plumbing

    def _net(self) -> None:
        bridge = f"stkr{self.tag}b"
        run = _run
        for node in self.nodes:
            run("ip", "netns", "add", node.netns)
            self._started = True
            run("ip", "-n", node.netns, "link", "set", "lo", "up")
            # No forwarding inside, no IPv6 (no link-local chatter), and no default route is ever added.
            run("ip", "netns", "exec", node.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
            run("ip", "netns", "exec", node.netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        # The node link: a bridge in the head's namespace with one veth per node (the head's own included).
        head = self.head
        run("ip", "-n", head.netns, "link", "add", bridge, "type", "bridge")
        run("ip", "-n", head.netns, "link", "set", bridge, "up")
        for i, node in enumerate(self.nodes):
            inner, outer = f"stkr{self.tag}n{i}", f"stkr{self.tag}p{i}"
            run("ip", "link", "add", inner, "netns", node.netns, "type", "veth", "peer", "name", outer,
                "netns", head.netns)
            run("ip", "-n", head.netns, "link", "set", outer, "master", bridge, "up")
            run("ip", "-n", node.netns, "addr", "add", f"{node.ip}/{self.prefix}", "dev", inner)
            run("ip", "-n", node.netns, "link", "set", inner, "up")
        # The host joins the same link (its end on the bridge too): sockets a driver here opens from the host
        # namespace reach the nodes. Its end forwards nothing, and no namespace routes through it.
        run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", f"stkr{self.tag}c",
            "netns", head.netns)
        _sysctl(f"net/ipv4/conf/{self.host_veth}/forwarding", "0")
        _sysctl(f"net/ipv6/conf/{self.host_veth}/disable_ipv6", "1")
        run("ip", "addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.host_veth)
        run("ip", "link", "set", self.host_veth, "up")
        run("ip", "-n", head.netns, "link", "set", f"stkr{self.tag}c", "master", bridge, "up")

    def _start_node(self, node: LocalNode, head_address: str | None) -> None:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        options = NodeOptions(
            slots=node.slots,
            address=head_address,
            node_ip=node.ip,
            port=GCS_PORT,
            num_cpus=1,
            temp_dir=str(self.root / f"ray{self.nodes.index(node)}"),
            state_dir=str(node.state_dir),
            labels=node.labels,
            client_server_port=None,
            system_config=self.system_config if head_address is None else {},
            block=True,
            fixed_agent_ports=True,  # each node has a namespace of its own: the ports are free
        )
        node.log = self.root / f"{node.name}.log"
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{node.netns}", "--", *node_argv(options)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=node_env(options),
                start_new_session=True,
                close_fds=True,
            )

    def _wait_port(self, node: LocalNode, ip: str, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"ray start on {node.name} exited: {self._tail(node)}")
            probe = subprocess.run(
                ["nsenter", f"--net=/run/netns/{node.netns}", "--", "python3", "-c",
                 f"import socket; socket.create_connection(({ip!r}, {port}), timeout=1).close()"],
                capture_output=True, check=False,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{node.name} did not listen on {ip}:{port} in {self.start_timeout:.0f}s: "
                           f"{self._tail(node)}")

    def wait_nodes(self, count: int | None = None) -> None:
        """Wait until Ray lists ``count`` (default: all) alive nodes; needs :meth:`connect_driver` first."""
        import ray

        want = len(self.nodes) if count is None else count
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
            if sum(1 for n in nodes if n["Alive"]) >= want:
                return
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray start on {node.name} exited: {self._tail(node)}")
            time.sleep(0.25)
        raise TimeoutError(f"the cluster did not reach {want} nodes in {self.start_timeout:.0f}s")

    def connect_driver(self, namespace: str = "stockade") -> None:
        """Make this process a Ray driver on the head node.

        A driver needs the raylet of its own node address, and Ray's servers in the driver must listen on that
        address. So the calling thread enters the head's network namespace for ``ray.init`` only: the threads
        Ray starts there stay there, and this thread comes back (the host reaches the nodes over the bridge).
        """
        import ctypes

        import ray

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet = 0x40000000
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.head.netns}", os.O_RDONLY)
        try:
            if libc.setns(target, clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), "setns into the head namespace failed")
            try:
                deadline = time.monotonic() + self.start_timeout
                while True:
                    try:
                        ray.init(address=self.gcs_address, _node_ip_address=self.head.ip, namespace=namespace,
                                 logging_level=logging.ERROR, log_to_driver=False, _temp_dir=str(self.root / "ray0"))
                        break
                    except ConnectionError:  # the GCS listens before the head's raylet has registered
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
            finally:
                if libc.setns(home, clone_newnet) != 0:  # pragma: no cover - cannot fail for our own fd
                    raise OSError(ctypes.get_errno(), "setns back to the host namespace failed")
        finally:
            os.close(home)
            os.close(target)

    @staticmethod
    def _tail(node: LocalNode) -> str:
        if node.log is None or not node.log.exists():
            return "(no log)"
        return node.log.read_text(errors="replace")[-2000:]

    # ---------------------------------------------------------------------------------------- lifecycle

    def start(self) -> LocalCluster:
        try:
            self._net()
            self._start_node(self.head, None)
            self._wait_port(self.head, self.head.ip, GCS_PORT)
            for node in self.workers:
                self._start_node(node, self.gcs_address)
        except BaseException:
            self.stop()
            raise
        return self

    def kill_node(self, node: LocalNode) -> None:
        """Kill every process of ``node`` (SIGKILL, by PID): the node dies as a machine would."""
        _kill_all(node)

    def kill_raylet(self, node: LocalNode, *, timeout: float = 30.0) -> int:
        """SIGKILL the node's raylet only; returns its PID once the raylet and the node's Ray workers are gone.

        The workers notice the raylet's death themselves and exit, but only at their next check (about a
        second later): until then an actor there still answers calls. Returning before they are gone would
        let a caller see a node that is dead and one that is not yet, by turns.
        """
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet runs on {node.name}")
        workers = node.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_exists(p) for p in [pid, *workers]):
            if time.monotonic() > deadline:
                left = [p for p in [pid, *workers] if _exists(p)]
                raise RuntimeError(f"{node.name}: processes {left} outlived its raylet by {timeout:g}s")
            time.sleep(0.01)
        return pid

    def reap_sessions(self, nodes: list[LocalNode] | None = None) -> list[str]:
        """Terminate every bwrap session left in the state dirs of ``nodes`` (default: all). A node whose
        raylet was killed leaves its sandboxes running, as a real machine that lost only its raylet would;
        reaping them is what a machine's death does as well. Returns the ids terminated."""
        import concurrent.futures

        import anyio

        from ..bwrap import BwrapBackend

        async def reap(state: Path) -> list[str]:
            backend = BwrapBackend(state)
            done = []
            for session_id in backend.store.ids():
                with contextlib.suppress(Exception):
                    await backend.terminate(session_id)
                    done.append(session_id)
            return done

        reaped: list[str] = []
        for node in self.nodes if nodes is None else nodes:
            if (node.state_dir / "sessions").is_dir():
                # In a thread of its own: the caller may be inside an event loop.
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    reaped += pool.submit(anyio.run, reap, node.state_dir).result()
        return reaped

    def stop(self) -> None:
        """Reap the sessions, kill everything in our namespaces by PID, then delete the namespaces (and with
        them the veths)."""
        with contextlib.suppress(Exception):
            self.reap_sessions()
        for node in reversed(self.nodes):
            _kill_all(node)
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=5)
        if self._started:
            for node in self.nodes:
                subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "delete", self.host_veth], capture_output=True, check=False)

    def remove_files(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_all(node: LocalNode) -> None:
    # Ray processes ignore SIGTERM now and then; two rounds of SIGKILL by PID, since a dying parent may spawn.
    for _ in range(3):
        pids = node.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_exists(p) for p in pids):
            time.sleep(0.05)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" until reaped: count it as gone once its state says so.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _run(*argv: str) -> None:
    out = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip()}")


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /28 in 10.0.0.0/8 that overlaps no route of the host."""
    used = _host_networks()
    for _ in range(200):
        second, third, fourth = secrets.randbelow(200) + 50, secrets.randbelow(256), 16 * secrets.randbelow(16)
        net = ipaddress.IPv4Network(f"10.{second}.{third}.{fourth}/28")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free private subnet for the test cluster")


def _host_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True,
                         check=False)
    nets = []
    for line in out.stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole"):
            parts = line.split()
            word = parts[1] if len(parts) > 1 and word != "default" else ""
        with contextlib.suppress(ValueError):
            if word:
                nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets
