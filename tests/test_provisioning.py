"""``provision_in_thread``: a blocking provision whose caller is cancelled, by anyio or by asyncio itself, hands
its session over or ends it; it is never left running with nobody holding it."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from stockade import LifecycleError, SandboxSession, SandboxState
from stockade.backends._provisioning import provision_in_thread


class Builds:
    """A blocking build that takes ``seconds``, and the discards it saw."""

    def __init__(self, seconds: float = 0.0, *, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.built: list[str] = []
        self.discarded: list[str] = []
        self.done = threading.Event()

    def build(self) -> SandboxSession:
        time.sleep(self.seconds)
        if self.fail:
            raise LifecycleError("the build failed")
        self.built.append("s1")
        return SandboxSession(id="s1", backend="fake", state=SandboxState.RUNNING)

    def discard(self, session_id: str) -> None:
        self.discarded.append(session_id)
        self.done.set()


def test_an_uncancelled_provision_is_handed_over() -> None:
    builds = Builds()
    session = anyio.run(provision_in_thread, builds.build, builds.discard)
    assert session.id == "s1" and builds.discarded == []


def test_a_failed_build_raises_its_error_and_discards_nothing() -> None:
    builds = Builds(fail=True)
    with pytest.raises(LifecycleError, match="the build failed"):
        anyio.run(provision_in_thread, builds.build, builds.discard)
    assert builds.discarded == []


def test_anyio_cancellation_hands_the_session_over() -> None:
    builds = Builds(0.2)
    handed: list[SandboxSession] = []

    async def go() -> None:
        with anyio.move_on_after(0.05):
            handed.append(await provision_in_thread(builds.build, builds.discard))

    anyio.run(go)
    assert [s.id for s in handed] == ["s1"] and builds.discarded == []  # the caller holds it: its to end


def test_asyncio_cancellation_while_building_ends_the_session() -> None:
    builds = Builds(0.2)

    async def go() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(provision_in_thread(builds.build, builds.discard), 0.05)
        assert builds.built == []  # it returned at once, while the build went on

    asyncio.run(go())
    assert builds.done.wait(5)
    assert builds.built == ["s1"] and builds.discarded == ["s1"]


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.002, 0.005, 0.01])
def test_asyncio_cancellation_at_any_moment_ends_the_session_exactly_once(delay: float) -> None:
    """Around the moment the build returns: whichever side sees the cancellation, the session is ended once."""
    builds = Builds(0.005)

    async def go() -> bool:
        task = asyncio.ensure_future(provision_in_thread(builds.build, builds.discard))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return False
        return True

    handed = asyncio.run(go())
    time.sleep(0.2)  # the build (5 ms) and any discard are over
    # Handed over: the caller holds it. Not handed: nothing was built, or what was built was ended, once.
    assert builds.discarded == ([] if handed else builds.built)
