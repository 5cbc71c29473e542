"""The ray backend on a real two-node Ray cluster: head and worker each in a network namespace of their own.

One cluster for the whole module (Ray is heavy on a 2-core machine): started once, stopped by PID at the end,
its namespaces and veths deleted, and every sandbox left on a node reaped, whatever the tests did. The test
killing the worker runs last, since the worker does not come back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from stockade import (
    ExecChunk,
    ExecRequest,
    ExecResult,
    InvalidRequest,
    LifecycleError,
    SandboxSpec,
    SessionNotFound,
)
from stockade.conformance import ConformanceOptions
from stockade.conformance.engine import list_cases, run_case, select_cases
from stockade.conformance.escape._canaries import processes_with
from stockade.conformance.pytest_plugin import ESCAPE_OPTIONS, check_result

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'stockade[ray]'")

from stockade.backends.bwrap import probe as bwrap_probe  # noqa: E402
from stockade.backends.ray import RayBackend  # noqa: E402
from stockade.backends.ray._localcluster import LocalCluster  # noqa: E402

_MISSING = [tool for tool in ("ip", "nsenter") if shutil.which(tool) is None]
_BWRAP = bwrap_probe()
pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="a namespaced Ray cluster needs root (netns, veth)"),
    pytest.mark.skipif(bool(_MISSING), reason=f"missing tools: {', '.join(_MISSING)} (apt-get install iproute2 "
                                              "util-linux)"),
    pytest.mark.skipif(_BWRAP is not None, reason=f"the node backend bwrap is unavailable: {_BWRAP}"),
]

HEAD_SLOTS = 4
WORKER_SLOTS = 3
_T = TypeVar("_T")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(slots=(HEAD_SLOTS, WORKER_SLOTS))
    try:
        c.start()
        c.connect_driver()
        c.wait_nodes()
        yield c
    finally:
        ray.shutdown()
        c.stop()
        leftovers = [n.netns for n in c.nodes if n.pids()]
        c.remove_files()
        assert not leftovers, f"processes survived in {leftovers}"


@pytest.fixture(scope="module")
def store(cluster: LocalCluster) -> Path:
    path = cluster.root / "store"
    path.mkdir()
    return path


def backend_for(cluster: LocalCluster, **options: Any) -> RayBackend:
    options.setdefault("probe_interval", 0.5)
    options.setdefault("probe_timeout", 5.0)
    options.setdefault("placement_timeout", 3.0)
    return RayBackend(cluster.gcs_address, **options)


def run(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    async def guarded() -> _T:
        with anyio.fail_after(120):  # a hang guard, not a speed assertion
            return await fn(*args)

    return anyio.run(guarded)


def sh(backend: RayBackend, session_id: str, script: str) -> ExecResult:
    return run(backend.exec, session_id, ExecRequest(command="sh", args=("-c", script)))


def provision(backend: RayBackend, **spec: Any) -> Any:
    return run(backend.provision, SandboxSpec.parse(spec))


def terminate_all(backend: RayBackend, ids: list[str]) -> None:
    for session_id in ids:
        with contextlib.suppress(SessionNotFound):
            run(backend.terminate, session_id)


# ---------------------------------------------------------------------------------------------- placement


def test_capabilities_are_the_intersection_measured_per_node(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    per_node = backend.node_capabilities()
    assert {v.ip for v in backend.nodes()} == {n.ip for n in cluster.nodes}
    assert len(per_node) == 2
    caps = backend.capabilities()
    for flag, value in caps.to_json().items():
        assert value == all(getattr(c, flag) for c in per_node.values()), flag
    assert caps.process_isolation and caps.filesystem_isolation  # bwrap's own, through Ray


def test_sessions_fill_both_nodes_and_slots_bound_them(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    ids: list[str] = []
    try:
        for _ in range(HEAD_SLOTS + WORKER_SLOTS):
            ids.append(provision(backend).id)
        nodes = {run(backend.get_session, sid).metadata["node_ip"] for sid in ids}
        assert nodes == {n.ip for n in cluster.nodes}
        # Every slot is taken: one more session is refused with the reason, never over-packed.
        with pytest.raises(LifecycleError, match="no free stockade_slots slot"):
            provision(backend)
        # Admitted sibling: a freed slot takes the next session.
        run(backend.terminate, ids.pop())
        ids.append(provision(backend).id)
    finally:
        terminate_all(backend, ids)


def test_metadata_names_the_node_and_exec_runs_there(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    worker = cluster.workers[0]
    session = provision(backend, labels={"stockade.ray/node": worker.ip})
    try:
        assert session.backend == "ray"
        assert session.metadata["node_ip"] == worker.ip and len(session.metadata["node"]) == 56
        assert session.metadata["node_backend"] == "bwrap"
        # The node backend's own metadata comes along: its state dir is the worker's.
        assert session.metadata["state_dir"].startswith(str(worker.state_dir))
        token = secrets.token_hex(8)
        result = sh(backend, session.id, f"echo {token} > /mnt/session/outputs/t; cat /mnt/session/outputs/t")
        assert result.stdout.strip() == token
        assert (worker.state_dir / "sessions" / session.id / "outputs" / "t").read_text().strip() == token
    finally:
        run(backend.terminate, session.id)


def test_pin_by_node_id_and_by_label_selector(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    head_id = next(v.node_id for v in backend.nodes() if v.ip == cluster.head.ip)
    ids = []
    try:
        pinned = provision(backend, labels={"stockade.ray/node": head_id})
        ids.append(pinned.id)
        assert pinned.metadata["node"] == head_id
        selected = provision(backend, labels={"stockade.ray/select.stockade-test-node": "worker1"})
        ids.append(selected.id)
        assert selected.metadata["node_ip"] == cluster.workers[0].ip
        excluded = provision(backend, labels={"stockade.ray/select.stockade-test-node": "!worker1"})
        ids.append(excluded.id)
        assert excluded.metadata["node_ip"] == cluster.head.ip
    finally:
        terminate_all(backend, ids)


def test_pin_to_an_unknown_node_is_refused(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    with pytest.raises(LifecycleError, match="no live node"):
        provision(backend, labels={"stockade.ray/node": "10.255.255.254"})
    with pytest.raises(InvalidRequest, match="not a known placement label"):
        provision(backend, labels={"stockade.ray/nodes": cluster.head.ip})
    assert not run(backend.list_sessions)  # neither left a session, a slot or a record behind


def test_spread_keeps_a_group_on_distinct_nodes(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    group = {"stockade.ray/spread": f"g-{secrets.token_hex(4)}"}
    ids = []
    try:
        first, second = provision(backend, labels=group), provision(backend, labels=group)
        ids += [first.id, second.id]
        assert first.metadata["node"] != second.metadata["node"]
        with pytest.raises(LifecycleError, match="already holds a session of the group"):
            provision(backend, labels=group)
        # Admitted siblings: outside the group, sessions share a node freely; a freed node takes the group.
        ids.append(provision(backend, labels={"stockade.ray/node": first.metadata["node"]}).id)
        run(backend.terminate, ids.pop(0))
        ids.append(provision(backend, labels=group).id)
    finally:
        terminate_all(backend, ids)


def test_another_driver_view_finds_sessions_by_id(cluster: LocalCluster) -> None:
    first = backend_for(cluster)
    session = provision(first, labels={"stockade.ray/node": cluster.workers[0].ip})
    try:
        second = backend_for(cluster)  # no cache: it must go through the cluster's session directory
        assert sh(second, session.id, "echo via-directory").stdout == "via-directory\n"
        assert session.id in {s.id for s in run(second.list_sessions)}
    finally:
        run(first.terminate, session.id)
    with pytest.raises(SessionNotFound):
        run(second.terminate, session.id)


def test_exec_stream_is_forwarded(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    session = provision(backend, labels={"stockade.ray/node": cluster.workers[0].ip})

    async def collect() -> list[ExecChunk | ExecResult]:
        out = []
        stream: AsyncIterator[ExecChunk | ExecResult] = backend.exec_stream(
            session.id, ExecRequest(command="sh", args=("-c", "echo one; sleep 0.3; echo two >&2; exit 4"))
        )
        async for item in stream:
            out.append(item)
        return out

    try:
        items = run(collect)
    finally:
        run(backend.terminate, session.id)
    chunks = [i for i in items if isinstance(i, ExecChunk)]
    assert [(c.stream, c.data) for c in chunks] == [("stdout", b"one\n"), ("stderr", b"two\n")]
    assert isinstance(items[-1], ExecResult) and items[-1].exit_code == 4


def test_snapshot_in_shared_store_restores_on_another_node(cluster: LocalCluster, store: Path) -> None:
    backend = backend_for(cluster, snapshot_store=f"file://{store}")  # through fsspec
    source = provision(backend, labels={"stockade.ray/node": cluster.workers[0].ip})
    token = secrets.token_hex(8)
    ids = [source.id]
    try:
        sh(backend, source.id, f"echo {token} > /mnt/session/outputs/canary")
        snap = run(backend.snapshot, source.id)
        assert snap.backend == "ray" and snap.metadata["stored"] == "true"
        assert (store / snap.snapshot_id / "manifest.json").is_file()
        restored = provision(backend, from_snapshot=snap.snapshot_id, labels={"stockade.ray/node": cluster.head.ip})
        ids.append(restored.id)
        assert restored.metadata["node_ip"] == cluster.head.ip
        assert sh(backend, restored.id, "cat /mnt/session/outputs/canary").stdout.strip() == token
    finally:
        terminate_all(backend, ids)


def test_snapshot_without_store_stays_on_its_node(cluster: LocalCluster) -> None:
    backend = backend_for(cluster)
    worker = cluster.workers[0]
    source = provision(backend, labels={"stockade.ray/node": worker.ip})
    ids = [source.id]
    try:
        sh(backend, source.id, "echo local > /mnt/session/outputs/f")
        snap = run(backend.snapshot, source.id)
        assert snap.metadata["stored"] == "false"
        with pytest.raises(LifecycleError, match="placement labels exclude"):
            provision(backend, from_snapshot=snap.snapshot_id, labels={"stockade.ray/node": cluster.head.ip})
        restored = provision(backend, from_snapshot=snap.snapshot_id)  # Ray is told: only where it lives
        ids.append(restored.id)
        assert restored.metadata["node_ip"] == worker.ip
        assert sh(backend, restored.id, "cat /mnt/session/outputs/f").stdout == "local\n"
    finally:
        terminate_all(backend, ids)
    with pytest.raises(InvalidRequest, match="no snapshot"):
        provision(backend, from_snapshot="never-taken-snapshot")


def _on_nodes(cluster: LocalCluster, session_id: str) -> list[str]:
    """Where a session still has a trace on a node: its state directory, or host processes naming it."""
    found = [node.ip for node in cluster.nodes if (node.state_dir / "sessions" / session_id).exists()]
    return found + [f"pid {pid}" for pid in processes_with(session_id)]


def test_a_cancelled_provision_leaves_nothing_on_the_nodes(cluster: LocalCluster) -> None:
    """A provision cancelled at any point (placing it, while the node provisions, as the node answers) leaves no
    sandbox on a node once it has returned, and none turns up later: the node ends what it made for a driver
    that gave up on it. Delays from 0 to past a whole provision, so some land while the node works."""
    backend = backend_for(cluster)

    async def cancelled(session_id: str, delay: float) -> bool:
        with anyio.move_on_after(delay):
            await backend.provision(SandboxSpec(session_id=session_id))
            return False
        return True

    tried: dict[str, bool] = {}
    left: dict[str, list[str]] = {}
    try:
        for step in range(16):
            session_id = f"cancelled-{step}-{secrets.token_hex(4)}"
            tried[session_id] = run(cancelled, session_id, step * 0.025)
            if tried[session_id] and _on_nodes(cluster, session_id):
                left[session_id] = _on_nodes(cluster, session_id)
        # A sandbox the node made after the driver gave up would show up here.
        time.sleep(2)
        left.update({sid: where for sid in tried if tried[sid] and (where := _on_nodes(cluster, sid))})
    finally:
        terminate_all(backend, [sid for sid, was_cancelled in tried.items() if not was_cancelled])
    assert not left, f"cancelled provisions left sandboxes behind: {left}"
    # Admitted sibling: some provisions were cancelled and some finished (so the delays spanned a provision),
    # and the finished ones were real sessions, now ended.
    assert any(tried.values()) and not all(tried.values()), tried
    assert not [sid for sid in tried if _on_nodes(cluster, sid)]


# -------------------------------------------------------------------------------------------- conformance


UPSTREAM_NAME = "api.upstream.test"


@pytest.mark.parametrize("case", list_cases())
def test_conformance_through_ray(cluster: LocalCluster, case: str) -> None:
    # The egress cases' fake upstream listens on the host's end of the cluster bridge, which the nodes (and so
    # their sessions' gateways) reach; the nodes' gateways resolve the test name to it.
    upstream = cluster.host_ip
    options = ConformanceOptions(upstream_name=UPSTREAM_NAME, upstream_address=upstream)
    node_options = {"resolve": {UPSTREAM_NAME: upstream}, "public_overrides": [upstream]}

    async def one() -> Any:
        async with backend_for(cluster, node_backend_options=node_options) as backend:
            return await run_case(backend, case, options)

    check_result(anyio.run(one))


@pytest.mark.parametrize("case", select_cases(ESCAPE_OPTIONS))
def test_escape_through_ray(cluster: LocalCluster, case: str) -> None:
    """The escape suite (docs/escape-suite.md) through Ray: the sessions run under bwrap on the nodes, which
    share this host's file systems and pid namespace, so the host canaries still judge them."""

    async def one() -> Any:
        async with backend_for(cluster) as backend:
            return await run_case(backend, case, ESCAPE_OPTIONS)

    check_result(anyio.run(one))


# --------------------------------------------------------------------------- node death (runs last: kills)


def test_worker_death_fails_its_sessions_and_a_snapshot_restores_on_the_head(
    cluster: LocalCluster, store: Path
) -> None:
    backend = backend_for(cluster, snapshot_store=str(store))
    worker, head = cluster.workers[0], cluster.head
    on_worker = {"stockade.ray/node": worker.ip}
    saved = provision(backend, labels=on_worker)
    unsaved = provision(backend, labels=on_worker)
    survivor = provision(backend, labels={"stockade.ray/node": head.ip})
    token = secrets.token_hex(8)
    try:
        sh(backend, saved.id, f"echo {token} > /mnt/session/outputs/canary; echo {token} > /tmp/canary")
        snap = run(backend.snapshot, saved.id)
        worker_id = saved.metadata["node"]

        cluster.kill_raylet(worker)

        with pytest.raises(LifecycleError) as failed:
            sh(backend, saved.id, "echo still-here")
        message = str(failed.value)
        assert worker_id[:12] in message and worker.ip in message and "lost" in message
        lost = run(backend.get_session, saved.id)
        assert lost.metadata["health"] == "lost" and lost.metadata["node"] == worker_id
        with pytest.raises(LifecycleError, match="is lost"):  # now at once, without asking the dead node
            sh(backend, unsaved.id, "true")
        # Admitted sibling: the head's session never noticed.
        assert sh(backend, survivor.id, "echo fine").stdout == "fine\n"
        # The sandboxes of a machine that died die with it; here they would outlive the raylet (and keep their
        # cgroups, named by session id, which the restored session on this same machine needs).
        assert set(cluster.reap_sessions([worker])) == {saved.id, unsaved.id}

        # resume brings the lost session back under its id, on the head, from its latest stored snapshot.
        back = run(backend.resume, saved.id)
        assert back.id == saved.id and back.metadata["node_ip"] == head.ip and "health" not in back.metadata
        assert sh(backend, saved.id, "cat /mnt/session/outputs/canary /tmp/canary").stdout.split() == [token] * 2
        # provision-from-snapshot works from the store as well.
        again = provision(backend, from_snapshot=snap.snapshot_id)
        assert again.metadata["node_ip"] == head.ip
        assert sh(backend, again.id, "cat /mnt/session/outputs/canary").stdout.strip() == token
        run(backend.terminate, again.id)

        # Without a snapshot there is nothing to bring back: a clear error, and terminate forgets it.
        with pytest.raises(LifecycleError, match="no snapshot"):
            run(backend.resume, unsaved.id)
        run(backend.terminate, unsaved.id)
        with pytest.raises(SessionNotFound):
            run(backend.terminate, unsaved.id)
    finally:
        terminate_all(backend, [saved.id, unsaved.id, survivor.id])
    assert not [s for s in run(backend.list_sessions)]
