"""The node agent's bookkeeping of provision attempts, without a cluster: a driver that gives up on a provision
(``abandon``, or Ray cancelling the actor task) never leaves a session on the node, whenever it gives up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stockade import LifecycleError, SandboxSession, SandboxSpec, SandboxState, SessionNotFound

pytest.importorskip("ray", reason="ray is not installed: pip install 'stockade[ray]'")

from stockade.backends.ray._agent import _NodeAgent


class FakeNodeBackend:
    """Provisions that wait for ``release``; records what was made and what was ended."""

    name = "fake"

    def __init__(self, *, fail: bool = False) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail = fail
        self.live: set[str] = set()
        self.provisioned: list[str] = []
        self.terminated: list[str] = []

    async def provision(self, spec: SandboxSpec) -> SandboxSession:
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise LifecycleError("the fake backend refused")
        assert spec.session_id is not None
        self.live.add(spec.session_id)
        self.provisioned.append(spec.session_id)
        return SandboxSession(id=spec.session_id, backend=self.name, state=SandboxState.RUNNING)

    async def terminate(self, session_id: str) -> None:
        if session_id not in self.live:
            raise SessionNotFound(session_id)
        self.live.remove(session_id)
        self.terminated.append(session_id)


def agent(backend: FakeNodeBackend) -> Any:
    node = _NodeAgent.__new__(_NodeAgent)  # no Ray runtime: only what provision and abandon touch
    node.raylet_pid = None
    node.node_backend = backend.name
    node.problem = None
    node.backend = backend  # type: ignore[assignment]  # duck-typed: only provision and terminate are used
    node.attempts = {}
    return node


SPEC = SandboxSpec(session_id="s1").to_json()


def test_a_finished_provision_is_handed_over_and_abandon_after_it_ends_the_session() -> None:
    async def go() -> None:
        backend = FakeNodeBackend()
        node = agent(backend)
        backend.release.set()
        reply = await node.provision(SPEC, None, "t1")
        assert reply["ok"]["id"] == "s1" and backend.live == {"s1"}  # admitted: a normal provision
        assert await node.abandon("s1", "t1") == {"ok": None}
        assert backend.live == set() and backend.terminated == ["s1"]
        assert await node.abandon("s1", "t1") == {"ok": None}  # twice: nothing more to end
        assert backend.terminated == ["s1"]

    asyncio.run(go())


def test_abandon_before_the_provision_starts_means_it_never_runs() -> None:
    async def go() -> None:
        backend = FakeNodeBackend()
        node = agent(backend)
        backend.release.set()
        assert await node.abandon("s1", "t1") == {"ok": None}
        reply = await node.provision(SPEC, None, "t1")
        assert reply["error"]["code"] == "lifecycle_error" and "gave up" in reply["error"]["message"]
        assert backend.provisioned == [] and backend.live == set()
        # Another attempt at the same id is a new one: admitted.
        assert "ok" in await node.provision(SPEC, None, "t2")
        assert backend.live == {"s1"}

    asyncio.run(go())


def test_abandon_while_the_provision_runs_waits_and_ends_what_it_made() -> None:
    async def go() -> None:
        backend = FakeNodeBackend()
        node = agent(backend)
        provision = asyncio.ensure_future(node.provision(SPEC, None, "t1"))
        await backend.started.wait()
        abandon = asyncio.ensure_future(node.abandon("s1", "t1"))
        await asyncio.sleep(0.05)
        assert not abandon.done()  # it waits for the provision to end
        backend.release.set()
        assert await abandon == {"ok": None}
        assert backend.provisioned == ["s1"] and backend.live == set()  # made, then ended, before abandon returned
        reply = await provision
        assert "gave up" in reply["error"]["message"]

    asyncio.run(go())


def test_ray_cancelling_the_actor_task_ends_the_session_once_it_is_made() -> None:
    async def go() -> None:
        backend = FakeNodeBackend()
        node = agent(backend)
        provision = asyncio.ensure_future(node.provision(SPEC, None, "t1"))
        await backend.started.wait()
        provision.cancel()  # what ray.cancel does to an async actor task
        with pytest.raises(asyncio.CancelledError):
            await provision
        backend.release.set()  # the node backend's provision goes on to its end, then the session is ended
        await node.attempts["t1"].finished.wait()
        assert backend.provisioned == ["s1"] and backend.live == set()
        assert await node.abandon("s1", "t1") == {"ok": None}  # the driver's abandon finds nothing left
        assert backend.terminated == ["s1"]

    asyncio.run(go())


def test_abandon_after_a_failed_provision_ends_nothing() -> None:
    async def go() -> None:
        backend = FakeNodeBackend(fail=True)
        backend.live.add("s1")  # a session of that id that this attempt did not make (it must survive)
        node = agent(backend)
        backend.release.set()
        reply = await node.provision(SPEC, None, "t1")
        assert reply["error"]["message"] == "the fake backend refused"
        assert await node.abandon("s1", "t1") == {"ok": None}
        assert backend.live == {"s1"} and backend.terminated == []

    asyncio.run(go())
