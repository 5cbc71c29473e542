"""The ``ray`` backend: sessions placed by Ray across a cluster, each enforced by the node's local backend.

Where it differs from the contract's documentation (``stockade.backend``):

- Placement: every session is a one-bundle placement group holding one ``stockade_slots`` unit, so Ray never
  puts more sessions on a node than the node declares (``ray start --resources '{"stockade_slots": N}'``). A
  spec that finds no free slot within ``placement_timeout`` raises ``LifecycleError``. Labels under
  ``stockade.ray/`` pin or spread sessions (see ``_placement``); other labels pass through.
- Mount sources (``FilesystemMount.source``) are paths on the node that runs the session.
- A node that dies (or stops answering for ``probe_timeout``) turns each call on its sessions into a
  ``LifecycleError`` naming the node, within about ``probe_interval + probe_timeout`` at most, and its sessions
  are marked lost (``metadata["health"] == "lost"``). ``resume`` brings a lost session back, under the same id,
  on another node from its latest snapshot, when that snapshot is in the shared ``snapshot_store``;
  ``terminate`` forgets it.
- Capabilities are the intersection of what the node backends measured when their node joined; a node whose
  backend cannot run is kept out of placement.
- A provision that is cancelled or fails after the node was asked has the node abandon that attempt (end what
  it made or will make) before it raises; bounded by ``ABANDON_TIMEOUT``.
- Sessions outlive the driver: a detached actor on the head node records them, so another process finds a
  session by id. The Ray connection is process-wide and is left open by ``aclose`` (``ray.shutdown()`` ends it).
- The driver must run on a node of the cluster (``address="auto"`` or ``"host:port"``). ``ray://`` (Ray
  Client) addresses are passed to Ray unchanged but are untested: Ray Client's per-connection server failed
  to start on the test machine (ray-project/ray#63202).
- Ray's async integration is asyncio's; under another anyio backend, waits run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import ray
import ray.exceptions
import sniffio
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ...backend import ExecChunk, SandboxBackend
from ...errors import BackendUnavailable, InvalidRequest, LifecycleError, SessionNotFound, error_from_json
from ...models import (
    ExecRequest,
    ExecResult,
    FilesystemMount,
    NetworkPolicy,
    SandboxCapabilities,
    SandboxSession,
    SandboxSnapshot,
    SandboxSpec,
    SandboxState,
    validate_session_id,
)
from .._cancel_safe import run_to_end
from ._agent import NodeAgent, agent_name
from ._directory import DIRECTORY_NAME, Directory
from ._nodes import SLOT_RESOURCE
from ._placement import NodeView, allowed_nodes, label_selector, parse_placement, without_gone_pins
from ._snapstore import SnapshotStore

__all__ = ["RayBackend", "probe"]

_T = TypeVar("_T")

HEAD_RESOURCE = "node:__internal_head__"
# How long a provision the caller gave up on waits for its node to end what it made (it usually takes as long
# as the rest of a node provision, ~0.2 s).
ABANDON_TIMEOUT = 30.0
_CAPABILITY_FLAGS = tuple(SandboxCapabilities.model_fields)


def probe() -> str | None:
    """Ray is importable (connecting is ``RayBackend``'s job: it needs an address)."""
    return None


class NodeGone(Exception):
    """A call could not reach the node agent because the node (or its agent) is gone."""


class RayBackend(SandboxBackend):
    """Sessions placed over a Ray cluster. Options:

    ``address``: the cluster (``"auto"``, ``"host:port"``; default ``$STOCKADE_RAY_ADDRESS``, ``$RAY_ADDRESS``,
    then ``"auto"``). ``node_backend`` / ``node_backend_options``: the backend each node enforces with.
    ``namespace``: the Ray namespace of stockade's actors. ``snapshot_store``: a directory every node shares,
    or an fsspec URL (None: snapshots stay on the node that took them). ``placement_timeout``: seconds to wait
    for a free slot. ``probe_interval`` / ``probe_timeout``: how often a pending call checks that its node
    still answers, and how long that check may take. ``join_timeout``: seconds for a new node's agent to
    start. ``init_options``: extra keyword arguments for ``ray.init``.
    """

    name = "ray"
    default_candidate = False

    def __init__(
        self,
        address: str | None = None,
        *,
        node_backend: str = "bwrap",
        node_backend_options: dict[str, Any] | None = None,
        namespace: str = "stockade",
        snapshot_store: str | None = None,
        placement_timeout: float = 30.0,
        probe_interval: float = 2.0,
        probe_timeout: float = 10.0,
        join_timeout: float = 60.0,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        for field, value in (("placement_timeout", placement_timeout), ("probe_interval", probe_interval),
                             ("probe_timeout", probe_timeout), ("join_timeout", join_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidRequest(f"must be a positive number of seconds (got {value!r})", field=field)
        if not isinstance(node_backend, str) or not node_backend or node_backend == self.name:
            raise InvalidRequest(f"must name a local backend such as 'bwrap' (got {node_backend!r})",
                                 field="node_backend")
        self.address = address or os.environ.get("STOCKADE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or "auto"
        self.node_backend = node_backend
        self.node_backend_options = dict(node_backend_options or {})
        self.namespace = namespace
        self.store = SnapshotStore(snapshot_store) if snapshot_store is not None else None
        self.placement_timeout = float(placement_timeout)
        self.probe_interval = float(probe_interval)
        self.probe_timeout = float(probe_timeout)
        self.join_timeout = float(join_timeout)
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeView] = {}
        self._caps: dict[str, dict[str, Any]] = {}
        self._agents: dict[str, Any] = {}
        self._foreign_agents: dict[str, Any] = {}
        self._dead: set[str] = set()
        self._records: dict[str, dict[str, Any]] = {}
        self._group_locks: dict[str, anyio.Lock] = {}
        self._refreshed = 0.0
        self._directory_handle: Any = None
        self._connect(dict(init_options or {}))
        self._refresh_blocking(force=True)
        try:  # created on first use (~1 s); later calls are bounded by probe_timeout, so wait for it here
            ray.get(self._directory().ping.remote(), timeout=self.join_timeout)
        except ray.exceptions.RayError as exc:
            raise BackendUnavailable(self.name, f"the session directory actor did not start: {exc}") from exc

    # ------------------------------------------------------------------------------------------ connection

    def _connect(self, init_options: dict[str, Any]) -> None:
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            wanted = self.address
            if wanted not in ("auto", current) and not wanted.startswith("ray://"):
                raise InvalidRequest(
                    f"this process is already connected to the Ray cluster at {current}, not {wanted}",
                    field="address",
                )
            return
        options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                                   "namespace": self.namespace}
        options.update(init_options)
        try:
            # Always with an address: ray.init() without one would start a private local cluster instead.
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BackendUnavailable(
                self.name, f"cannot connect to the Ray cluster at {self.address!r}: {exc} "
                "(start one with `stockade ray up --head --slots N`, then pass address=...)"
            ) from exc

    def _directory(self) -> Any:
        if self._directory_handle is None:
            head = next((n["NodeID"] for n in _ray_nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]), None)
            options: dict[str, Any] = {
                "name": DIRECTORY_NAME,
                "namespace": self.namespace,
                "lifetime": "detached",
                "get_if_exists": True,
            }
            if head is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
            self._directory_handle = Directory.options(**options).remote()
        return self._directory_handle

    def _agent(self, node_id: str) -> Any:
        """This driver's agent on ``node_id`` (created when the node joins)."""
        agent = self._agents.get(node_id)
        if agent is None:
            agent = NodeAgent.options(
                name=agent_name(self.node_backend, self.node_backend_options, node_id),
                namespace=self.namespace,
                lifetime="detached",
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.node_backend, self.node_backend_options)
            self._agents[node_id] = agent
        return agent

    def _session_agent(self, record: dict[str, Any]) -> Any:
        """The agent that made the session (another driver's, with other options, perhaps)."""
        name = record.get("agent") or agent_name(self.node_backend, self.node_backend_options, record["node_id"])
        if name == agent_name(self.node_backend, self.node_backend_options, record["node_id"]):
            return self._agent(record["node_id"])
        agent = self._foreign_agents.get(name)
        if agent is None:
            try:
                agent = ray.get_actor(name, namespace=self.namespace)
            except ValueError as exc:  # a detached actor that no longer exists: its node went away
                raise NodeGone(f"its node agent {name} no longer exists") from exc
            self._foreign_agents[name] = agent
        return agent

    # ----------------------------------------------------------------------------------------------- nodes

    def _refresh_blocking(self, force: bool = False) -> None:
        """Learn which nodes take sessions; measure the capabilities of each new one (its join)."""
        if not force and time.monotonic() - self._refreshed < 1.0:
            return
        with self._lock:
            seen: dict[str, NodeView] = {}
            joining: dict[str, tuple[Any, Any]] = {}
            for node in _ray_nodes():
                slots = float(node.get("Resources", {}).get(SLOT_RESOURCE, 0.0))
                node_id = node["NodeID"]
                # A node found gone stays gone (Ray never reuses a node id), even while Ray still lists it.
                if not node["Alive"] or slots <= 0 or node_id in self._dead:
                    continue
                seen[node_id] = NodeView(node_id, node["NodeManagerAddress"], True, slots,
                                         dict(node.get("Labels") or {}))
                if node_id not in self._caps:
                    joining[node_id] = (self._agent(node_id), None)
            refs = {nid: agent.info.remote() for nid, (agent, _) in joining.items()}
            if refs:
                ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.join_timeout)
                for node_id, ref in refs.items():
                    info: dict[str, Any]
                    if ref in ready:
                        try:
                            info = ray.get(ref)
                        except ray.exceptions.RayError as exc:
                            info = {"capabilities": {}, "problem": f"node agent failed to start: {exc}"}
                    else:
                        info = {"capabilities": {}, "problem": f"node agent did not start in {self.join_timeout}s"}
                        self._agents.pop(node_id, None)
                    if info.get("problem") is None or ref in ready:
                        self._caps[node_id] = info
            for node_id, view in seen.items():
                info = self._caps.get(node_id, {"problem": "not measured yet"})
                if info.get("problem"):
                    seen[node_id] = NodeView(view.node_id, view.ip, True, view.slots, view.labels, False,
                                             str(info["problem"]))
            gone = [nid for nid in self._nodes if nid not in seen]
            self._nodes = seen
            self._refreshed = time.monotonic()
        for node_id in gone:
            self._forget_node_blocking(node_id, "the node left the Ray cluster")

    def _forget_node_blocking(self, node_id: str, reason: str) -> list[str]:
        """Mark the sessions of a dead node lost and give their slots back (Ray would move the groups)."""
        self._dead.add(node_id)
        self._agents.pop(node_id, None)
        for name in [n for n in self._foreign_agents if n.endswith(node_id)]:
            self._foreign_agents.pop(name, None)
        self._caps.pop(node_id, None)
        self._nodes.pop(node_id, None)
        try:
            lost: list[str] = ray.get(self._directory().mark_node_lost.remote(node_id, reason),
                                      timeout=self.probe_timeout)
        except ray.exceptions.RayError:
            return []
        for session_id in lost:
            record = self._records.pop(session_id, None) or {}
            with contextlib.suppress(Exception):
                record = ray.get(self._directory().get.remote(session_id), timeout=self.probe_timeout) or record
            self._remove_group(record.get("pg"))
        return lost

    @staticmethod
    def _remove_group(pg_hex: str | None) -> None:
        if not pg_hex:
            return
        from ray._raylet import PlacementGroupID

        with contextlib.suppress(Exception):  # already removed, or its creator is gone: nothing to give back
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_hex)))

    def nodes(self) -> list[NodeView]:
        """The live nodes that declare slots, as last seen (``usable`` False: its node backend failed)."""
        self._refresh_blocking(force=True)
        return list(self._nodes.values())

    def node_capabilities(self) -> dict[str, SandboxCapabilities]:
        """Each usable node's capabilities, as measured when it joined."""
        return {
            nid: SandboxCapabilities.parse(self._caps[nid]["capabilities"])
            for nid, view in self._nodes.items()
            if view.usable and nid in self._caps
        }

    def capabilities(self) -> SandboxCapabilities:
        per_node = list(self.node_capabilities().values())
        # With no node, nothing is enforced, and no property is claimed either: the model's defaults would
        # claim the private_* ones (true where a peer never sent them).
        return SandboxCapabilities(**{
            flag: bool(per_node) and all(getattr(c, flag) for c in per_node) for flag in _CAPABILITY_FLAGS
        })

    # ----------------------------------------------------------------------------------------- waiting

    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    async def _watch(self, ref: Any, agent: Any, node_id: str, what: str) -> Any:
        """The value of ``ref``; while it is pending, check every ``probe_interval`` that its node answers."""
        asyncio_mode = sniffio.current_async_library() == "asyncio"
        future = asyncio.wrap_future(ref.future()) if asyncio_mode else None
        try:
            while True:
                if future is not None:
                    done, _ = await asyncio.wait({future}, timeout=self.probe_interval)
                    if done:
                        return future.result()
                else:
                    ready, _ = await self._blocking(lambda: ray.wait([ref], timeout=self.probe_interval))
                    if ready:
                        return await self._blocking(ray.get, ref)
                problem = await self._node_problem(agent)
                if problem is not None:
                    raise NodeGone(f"{what} got no answer and {problem}")
        except ray.exceptions.RayActorError as exc:
            problem = await self._node_problem(agent)
            if problem is None:
                raise LifecycleError(
                    f"{what} on node {self._node_name(node_id)} failed but the node answers again; retry "
                    f"({type(exc).__name__})"
                ) from exc
            raise NodeGone(f"{what} failed ({type(exc).__name__}) and {problem}") from exc
        except ray.exceptions.RayError as exc:
            raise LifecycleError(f"{what} on node {self._node_name(node_id)} failed in Ray: {exc}") from exc
        finally:
            if future is not None and not future.done():
                # Its late failure (the node is gone) is nobody's news: retrieve it so asyncio stays quiet.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    async def _node_problem(self, agent: Any) -> str | None:
        """None when the node's agent answers a ping within ``probe_timeout``, else what is wrong."""
        ref = agent.ping.remote()
        try:
            with anyio.fail_after(self.probe_timeout):
                if sniffio.current_async_library() == "asyncio":
                    reply = await asyncio.wrap_future(ref.future())
                else:
                    reply = await self._blocking(ray.get, ref)
        except TimeoutError:
            return f"the node agent did not answer a ping within {self.probe_timeout:g}s"
        except ray.exceptions.RayActorError as exc:
            return f"the node agent is gone ({type(exc).__name__})"
        if isinstance(reply, dict) and reply.get("gone"):
            return f"the node is going away: {reply['gone']}"
        return None

    def _node_name(self, node_id: str) -> str:
        view = self._nodes.get(node_id)
        if view is not None:
            return view.short
        record_ip = next((r.get("node_ip") for r in self._records.values() if r.get("node_id") == node_id), None)
        return f"{node_id[:12]} ({record_ip})" if record_ip else node_id[:12]

    async def _call(self, record: dict[str, Any], method: str, *args: Any) -> Any:
        """Call ``method`` on the agent of the session's node; return its ``ok`` value or raise its error."""
        node_id = record["node_id"]
        try:
            agent = self._session_agent(record)
            ref = getattr(agent, method).remote(*args)
            reply = await self._watch(ref, agent, node_id, method)
            if "gone" in reply:
                raise NodeGone(f"{method} was refused: the node is going away: {reply['gone']}")
        except NodeGone as exc:
            raise await self._lost(record, str(exc)) from exc
        if "error" in reply:
            raise error_from_json(reply["error"])
        return reply.get("ok")

    async def _lost(self, record: dict[str, Any], why: str) -> LifecycleError:
        node_id = record["node_id"]
        name = self._node_name(node_id)
        reason = f"node {name} is gone: {why}"
        await self._blocking(self._forget_node_blocking, node_id, reason)
        return LifecycleError(self._lost_message(record["id"], reason))

    def _lost_message(self, session_id: str, reason: str) -> str:
        fix = ("resume() restores it on another node from its latest snapshot in the store, or terminate() it"
               if self.store is not None else
               "terminate() it (a snapshot store would let resume() restore it on another node)")
        return f"session {session_id!r} is lost: {reason}; {fix}"

    # ------------------------------------------------------------------------------------------ records

    async def _record(self, session_id: str, *, allow_lost: bool = False) -> dict[str, Any]:
        validate_session_id(session_id)
        record = self._records.get(session_id)
        if record is None:
            record = await self._dir("get", session_id)
            if record is None:
                raise SessionNotFound(session_id)
            if not record.get("lost"):
                self._records[session_id] = record
        if record.get("lost") and not allow_lost:
            raise LifecycleError(self._lost_message(session_id, str(record["lost"])))
        if not record.get("node_id"):
            raise LifecycleError(f"session {session_id!r} is still being placed")
        return record

    async def _dir(self, method: str, *args: Any) -> Any:
        ref = getattr(self._directory(), method).remote(*args)
        try:
            with anyio.fail_after(self.probe_timeout + self.probe_interval):
                if sniffio.current_async_library() == "asyncio":
                    return await asyncio.wrap_future(ref.future())
                return await self._blocking(ray.get, ref)
        except TimeoutError as exc:
            raise LifecycleError(f"the session directory on the head node did not answer {method}") from exc
        except ray.exceptions.RayError as exc:
            raise LifecycleError(f"the session directory on the head node failed: {exc}") from exc

    async def _session_op(self, session_id: str, method: str, *args: Any) -> Any:
        """Forward a per-session call; a stale cached record (moved by another driver) is re-read once."""
        record = await self._record(session_id)
        try:
            return await self._call(record, method, session_id, *args)
        except SessionNotFound:
            self._records.pop(session_id, None)
            fresh = await self._record(session_id)
            if fresh.get("node_id") == record.get("node_id"):
                raise
            return await self._call(fresh, method, session_id, *args)

    def _session(self, data: dict[str, Any], record: dict[str, Any]) -> SandboxSession:
        metadata = dict(data.get("metadata") or {})
        metadata.update(self._node_metadata(record))
        return SandboxSession(
            id=data["id"],
            backend=self.name,
            state=SandboxState(data["state"]),
            mounts=tuple(data.get("mounts") or ()),
            metadata=metadata,
        )

    def _node_metadata(self, record: dict[str, Any]) -> dict[str, str]:
        metadata = {
            "node": record["node_id"],
            "node_ip": record.get("node_ip") or "",
            "node_backend": self.node_backend,
        }
        if record.get("lost"):
            metadata["health"] = "lost"
            metadata["error"] = self._lost_message(record["id"], str(record["lost"]))
        return metadata

    def _lost_session(self, record: dict[str, Any]) -> SandboxSession:
        return SandboxSession(id=record["id"], backend=self.name, state=SandboxState.RUNNING,
                              metadata=self._node_metadata(record))

    # --------------------------------------------------------------------------------------- provision

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        await self._blocking(self._refresh_blocking)
        if not self.node_capabilities():
            # Said plainly: with no node, every capability is false and refuse_gaps would blame the spec.
            problems = "; ".join(f"{n.short}: {n.problem}" for n in self._nodes.values() if n.problem)
            raise LifecycleError(
                f"no live node of the Ray cluster at {self.address} hosts sessions (start one with "
                f"`stockade ray up --slots N`){'; ' + problems if problems else ''}"
            )
        self.refuse_gaps(spec)
        request = parse_placement(spec.labels)
        session_id = spec.session_id or secrets.token_hex(16)
        return await self._place_and_provision(spec, session_id, request, replace=False, avoid=())

    async def _snapshot_node(self, snapshot_id: str) -> str | None:
        """The node a snapshot must be restored on (None: any node, it is in the shared store)."""
        if self.store is not None and await self._blocking(self.store.exists, snapshot_id):
            return None
        record = await self._dir("get_snapshot", snapshot_id)
        if record is None:
            raise InvalidRequest(f"no snapshot with id {snapshot_id!r} in this cluster"
                                 + (f" or in {self.store.location}" if self.store else ""), field="from_snapshot")
        node_id = str(record["node_id"])
        if node_id not in self._nodes:
            raise LifecycleError(
                f"snapshot {snapshot_id!r} exists only on node {node_id[:12]}, which is gone; "
                "configure a shared snapshot_store so snapshots outlive their node"
            )
        return node_id

    def _lock_for(self, group: str | None) -> anyio.Lock | contextlib.nullcontext[None]:
        if group is None:
            return contextlib.nullcontext()
        # Serialises a spread group's placements in this driver, so two cannot pick the same node at once.
        return self._group_locks.setdefault(group, anyio.Lock())

    async def _place_and_provision(
        self, spec: SandboxSpec, session_id: str, request: Any, *, replace: bool, avoid: tuple[str, ...]
    ) -> SandboxSession:
        snapshot_node = await self._snapshot_node(spec.from_snapshot) if spec.from_snapshot else None
        record: dict[str, Any] = {
            "id": session_id,
            "node_id": None,
            "spec": spec.model_copy(update={"session_id": session_id}).to_json(),
            "spread": request.spread,
            "created": time.time(),
            "attempt": secrets.token_hex(8),  # which provision made the node's session (see _agent)
        }
        pg_hex: str | None = None
        async with self._lock_for(request.spread):
            group_nodes = await self._dir("group_nodes", request.spread) if request.spread else []
            allowed = allowed_nodes(request, self._nodes, group_nodes, avoid)
            if snapshot_node is not None:
                allowed = (set(self._nodes) if allowed is None else allowed) & {snapshot_node}
                if not allowed:
                    raise LifecycleError(f"snapshot {spec.from_snapshot!r} is only on node "
                                         f"{self._node_name(snapshot_node)}, which the placement labels exclude")
            if not await self._dir("reserve", session_id, record, replace):
                raise InvalidRequest(f"a session with id {session_id!r} already exists", field="session_id")
            try:
                pg_hex, node_id = await self._place(session_id, label_selector(request, allowed))
                record.update(node_id=node_id, node_ip=self._nodes[node_id].ip if node_id in self._nodes else "",
                              pg=pg_hex, agent=agent_name(self.node_backend, self.node_backend_options, node_id))
                await self._dir("update", session_id, record)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._blocking(self._remove_group, pg_hex)
                    with contextlib.suppress(Exception):
                        await self._dir("remove", session_id, record["attempt"])
                raise
        try:
            node_spec = spec.model_copy(update={"session_id": session_id})
            store = self.store.location if self.store is not None else None
            data = await self._call(record, "provision", node_spec.to_json(), store, record["attempt"])
            current = await self._dir("get", session_id)
            if current is None or current.get("terminating") or current.get("attempt") != record["attempt"]:
                raise LifecycleError(f"session {session_id!r} was terminated while it was being provisioned")
        except BaseException:
            # The node may still be making the session (Ray does not stop an actor task in time), or have made
            # it: either way nobody was handed it, so the node ends it.
            with anyio.CancelScope(shield=True):
                await self._abandon(record)
                await self._blocking(self._remove_group, pg_hex)
                with contextlib.suppress(Exception):
                    await self._dir("remove", session_id, record["attempt"])
            raise
        self._records[session_id] = record
        return self._session(data, record)

    async def _abandon(self, record: dict[str, Any]) -> None:
        """Have the node end whatever provision attempt ``record["attempt"]`` made or will make; bounded, since
        a node that does not answer is being lost anyway (and then takes its sandboxes with it)."""
        with anyio.move_on_after(ABANDON_TIMEOUT), contextlib.suppress(Exception):
            await self._call(record, "abandon", record["id"], record["attempt"])

    async def _place(self, session_id: str, selector: dict[str, str]) -> tuple[str, str]:
        """Create the session's placement group and wait for Ray to place it; returns (group id, node id)."""
        try:
            pg = placement_group(
                [{SLOT_RESOURCE: 1.0}],
                name=f"stockade-session-{session_id}",
                lifetime="detached",
                bundle_label_selector=[selector] if selector else None,
            )
        except ValueError as exc:
            raise InvalidRequest(f"Ray refused the placement: {exc}", field="labels") from exc
        pg_hex = pg.id.hex()
        try:
            ref = pg.ready()
            if sniffio.current_async_library() == "asyncio":
                done, _ = await asyncio.wait({asyncio.wrap_future(ref.future())}, timeout=self.placement_timeout)
                placed = bool(done)
            else:
                ready, _ = await self._blocking(lambda: ray.wait([ref], timeout=self.placement_timeout))
                placed = bool(ready)
            if not placed:
                raise LifecycleError(await self._blocking(self._no_slot_message, selector))
            table = await self._blocking(placement_group_table, pg)
            node_id = str(table["bundles_to_node_id"][0])
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._blocking(self._remove_group, pg_hex)
            raise
        return pg_hex, node_id

    def _no_slot_message(self, selector: dict[str, str]) -> str:
        total = sum(n.slots for n in self._nodes.values())
        free = float(ray.available_resources().get(SLOT_RESOURCE, 0.0))  # type: ignore[no-untyped-call]
        where = f" among the nodes matching {selector}" if selector else ""
        return (f"no free {SLOT_RESOURCE} slot{where} within {self.placement_timeout:g}s "
                f"({free:g} of {total:g} free in the cluster); terminate sessions or add nodes")

    # -------------------------------------------------------------------------------------- forwarding

    async def exec(self, session_id: str, request: ExecRequest) -> ExecResult:
        return ExecResult.parse(await self._session_op(session_id, "exec", request.to_json()))

    async def exec_stream(self, session_id: str, request: ExecRequest) -> AsyncIterator[ExecChunk | ExecResult]:
        record = await self._record(session_id)
        node_id = record["node_id"]
        try:
            agent = self._session_agent(record)
            generator = agent.exec_stream.remote(session_id, request.to_json())
            while True:
                step = await self._watch_step(generator, agent, node_id)
                if step is None:
                    return
                if "gone" in step:
                    raise NodeGone(f"exec_stream was refused: the node is going away: {step['gone']}")
                if "error" in step:
                    raise error_from_json(step["error"])
                if "chunk" in step:
                    yield ExecChunk(step["chunk"], step["data"])
                else:
                    yield ExecResult.parse(step["ok"])
        except NodeGone as exc:
            raise await self._lost(record, str(exc)) from exc

    async def _watch_step(self, generator: Any, agent: Any, node_id: str) -> dict[str, Any] | None:
        """The next item of a streaming call, or None at its end (with the same liveness checks)."""

        def next_ref() -> Any:
            try:
                return next(generator)
            except StopIteration:
                return None

        while True:
            ready, _ = await self._blocking(lambda: ray.wait([generator], timeout=self.probe_interval))
            if ready:
                break
            problem = await self._node_problem(agent)
            if problem is not None:
                with contextlib.suppress(Exception):
                    ray.cancel(generator)
                raise NodeGone(f"exec_stream got no answer and {problem}")
        ref = await self._blocking(next_ref)
        if ref is None:
            return None
        value: dict[str, Any] = await self._watch(ref, agent, node_id, "exec_stream")
        return value

    async def attach_filesystem(self, session_id: str, mount: FilesystemMount) -> SandboxSession:
        data = await self._session_op(session_id, "attach_filesystem", mount.to_json())
        return self._session(data, await self._record(session_id))

    async def apply_network_policy(self, session_id: str, policy: NetworkPolicy) -> SandboxSession:
        data = await self._session_op(session_id, "apply_network_policy", policy.to_json())
        return self._session(data, await self._record(session_id))

    async def network_log(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = await self._session_op(session_id, "network_log", limit)
        return out

    async def get_session(self, session_id: str) -> SandboxSession:
        record = await self._record(session_id, allow_lost=True)
        if record.get("lost"):
            return self._lost_session(record)
        try:
            data = await self._call(record, "get_session", session_id)
        except LifecycleError:
            fresh = await self._dir("get", session_id)
            if fresh is not None and fresh.get("lost"):
                return self._lost_session(fresh)
            raise
        return self._session(data, record)

    async def list_sessions(self) -> list[SandboxSession]:
        await self._blocking(self._refresh_blocking)
        records: dict[str, dict[str, Any]] = await self._dir("all")
        by_agent: dict[str, list[str]] = {}
        out: list[SandboxSession] = []
        for session_id, record in records.items():
            if record.get("lost"):
                out.append(self._lost_session(record))
            elif record.get("node_id"):
                by_agent.setdefault(str(record.get("agent") or record["node_id"]), []).append(session_id)
        for ids in by_agent.values():
            probe_record = {**records[ids[0]], "id": ids[0]}
            try:
                listed = await self._call(probe_record, "list_sessions", ids)
            except LifecycleError:
                # The node just turned out lost: its sessions are reported as such.
                out += [self._lost_session({**records[sid], "lost": "node gone"}) for sid in ids]
                continue
            out += [self._session(data, records[data["id"]]) for data in listed]
        return out

    # ----------------------------------------------------------------------------------- snapshot/resume

    async def snapshot(self, session_id: str) -> SandboxSnapshot:
        record = await self._record(session_id)
        store = self.store.location if self.store is not None else None
        data = await self._call(record, "snapshot", session_id, store)
        snap = SandboxSnapshot.parse(data["snapshot"])
        await self._dir("put_snapshot", snap.snapshot_id,
                        {"session_id": session_id, "node_id": record["node_id"], "stored": data["stored"]})
        metadata = {**snap.metadata, **self._node_metadata(record), "stored": str(bool(data["stored"])).lower()}
        if store is not None:
            metadata["store"] = store
        return SandboxSnapshot(session_id=session_id, backend=self.name, snapshot_id=snap.snapshot_id,
                               metadata=metadata)

    async def resume(self, session_id: str) -> SandboxSession:
        record = await self._record(session_id, allow_lost=True)
        if not record.get("lost"):
            data = await self._session_op(session_id, "resume")
            return self._session(data, record)
        snapshot_id = record.get("snapshot")
        if snapshot_id is None or self.store is None or not await self._blocking(self.store.exists, snapshot_id):
            raise LifecycleError(
                self._lost_message(session_id, str(record["lost"]))
                + " (it has no snapshot in a shared store to restore from)"
            )
        spec = SandboxSpec.parse(record["spec"]).model_copy(update={"from_snapshot": snapshot_id})
        await self._blocking(self._refresh_blocking, True)
        self._records.pop(session_id, None)
        request = without_gone_pins(parse_placement(spec.labels), self._nodes)
        return await self._place_and_provision(spec, session_id, request, replace=True, avoid=(record["node_id"],))

    # ---------------------------------------------------------------------------------------- terminate

    async def terminate(self, session_id: str) -> None:
        validate_session_id(session_id)
        # Once the directory has it claimed, it must end whatever happens to the caller: a claimed session that
        # is never ended keeps its sandbox and its slot, and every later terminate is told it is gone.
        await run_to_end(lambda: self._terminate(session_id))

    async def _terminate(self, session_id: str) -> None:
        self._records.pop(session_id, None)  # from the directory, not the cache: another driver may have ended it
        # Claimed in the directory first (atomically): of two concurrent terminates, from any drivers, one does
        # the work and the other gets SessionNotFound, as on the node backends.
        record = await self._dir("claim", session_id)
        if record is None:
            raise SessionNotFound(session_id)
        if not record.get("node_id") and not record.get("lost"):
            raise LifecycleError(f"session {session_id!r} is still being placed")
        if not record.get("lost"):
            try:
                await self._call(record, "terminate", session_id)
            except SessionNotFound:
                pass  # the node backend lost it already (e.g. garbage-collected): forget it here too
            except LifecycleError:
                fresh = await self._dir("get", session_id)
                if fresh is None or not fresh.get("lost"):
                    await self._dir("update", session_id, {"terminating": False})  # a later terminate may retry
                    raise
        self._records.pop(session_id, None)
        await self._blocking(self._remove_group, record.get("pg"))
        await self._dir("remove", session_id)


def _ray_nodes() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes
