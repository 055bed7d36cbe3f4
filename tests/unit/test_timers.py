"""timers.Timers: one heap for every session's deadlines; cancelled entries free what they hold."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio
import trio.testing

from wsproxy.runtime import timers as timers_mod
from wsproxy.runtime.timers import Timers


class Owner:
    def __init__(self) -> None:
        self.fired: list[float] = []

    def fire(self, now: float) -> None:
        self.fired.append(now)


async def test_callbacks_fire_in_deadline_order(autojump_clock: trio.testing.MockClock) -> None:
    t = Timers()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        start = trio.current_time()
        t.schedule(start + 3, lambda now: order.append("c"))
        t.schedule(start + 1, lambda now: order.append("a"))
        t.schedule(start + 2, lambda now: order.append("b"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert order == ["a", "b", "c"]


async def test_a_cancelled_entry_never_fires(autojump_clock: trio.testing.MockClock) -> None:
    t = Timers()
    owner = Owner()
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        entry = t.schedule(trio.current_time() + 1, owner.fire)
        t.cancel(entry)
        t.cancel(entry)  # twice is harmless
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert owner.fired == []
    assert len(t) == 0


@pytest.mark.expect_errors(r"wsproxy\.timers: timer callback failed \[RuntimeError: bug\]")
async def test_a_failing_callback_does_not_stop_the_others(autojump_clock: trio.testing.MockClock) -> None:
    t = Timers()
    owner = Owner()

    def boom(now: float) -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        t.schedule(trio.current_time() + 1, boom)
        t.schedule(trio.current_time() + 2, owner.fire)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert len(owner.fired) == 1


def test_cancel_releases_the_owner_before_its_deadline() -> None:
    t = Timers()
    owner = Owner()
    ref = weakref.ref(owner)
    t.cancel(t.schedule(3600.0, owner.fire))
    del owner
    gc.collect()
    assert ref() is None


def test_cancelled_entries_are_compacted_so_the_heap_tracks_live_timers() -> None:
    t = Timers()
    keep = [t.schedule(float(i), Owner().fire) for i in range(10)]
    for i in range(10_000):
        t.cancel(t.schedule(3600.0 + i, Owner().fire))
    assert len(t) == 10
    assert len(t._heap) < 10 + 2 * timers_mod.COMPACT_MIN
    assert all(e.callback is not None for e in keep)
