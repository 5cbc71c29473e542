"""``_cancel_safe``: a blocking provision whose caller is cancelled, by anyio or by asyncio itself, hands its
session over or ends it, never leaving it running with nobody holding it; and ``run_to_end`` finishes an
operation whose caller was cancelled half way."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from stockade import LifecycleError, SandboxSession, SandboxState
from stockade.backends._cancel_safe import provision_in_thread, run_to_end


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


class Steps:
    """A two-step operation that must not stop between its steps (as a terminate that has claimed its session)."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.finished = threading.Event()

    async def run(self) -> str:
        self.done.append("claimed")
        await anyio.sleep(0.1)
        self.done.append("ended")
        self.finished.set()
        return "ok"


def test_run_to_end_returns_the_operations_value() -> None:
    steps = Steps()
    assert anyio.run(run_to_end, steps.run) == "ok" and steps.done == ["claimed", "ended"]


def test_run_to_end_goes_on_when_asyncio_cancels_the_caller() -> None:
    steps = Steps()

    async def go() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(run_to_end(steps.run), 0.02)
        assert steps.done == ["claimed"]  # the caller was let go at once
        await asyncio.sleep(0.3)

    asyncio.run(go())
    assert steps.done == ["claimed", "ended"]


def test_run_to_end_goes_on_when_anyio_cancels_the_caller() -> None:
    steps = Steps()

    async def go() -> None:
        with anyio.move_on_after(0.02):
            await run_to_end(steps.run)
        await anyio.sleep(0.3)

    anyio.run(go)
    assert steps.done == ["claimed", "ended"]


def test_without_it_a_cancelled_caller_stops_half_way() -> None:
    """The control: the same operation awaited directly stops after its first step."""
    steps = Steps()

    async def go() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(steps.run(), 0.02)
        await asyncio.sleep(0.3)

    asyncio.run(go())
    assert steps.done == ["claimed"]
