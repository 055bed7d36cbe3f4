"""reactor.Reactor on its own: events reach watchers, `soon` wakes a sleeping loop, and stopping
the loop releases every session it owns (registered or not)."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from tests.support import StepTimer
from wsproxy.runtime.reactor import READ, WRITE, EpollPoller, Reactor, SelectorPoller


@pytest.fixture(params=[EpollPoller, SelectorPoller], ids=["epoll", "selectors"])
def make_loop(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return lambda **kw: Reactor(poller=request.param, **kw)


class Recorder:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.events: list[tuple[int, int]] = []
        self.stopped = 0
        self.got = trio.Event()

    def on_event(self, fd: int, mask: int) -> None:
        self.events.append((fd, mask))
        if self.sock is not None:
            self.sock.recv(4096)  # level-triggered: consume, or the next round reports it again
        self.got.set()

    def reactor_stopped(self) -> None:
        self.stopped += 1


async def test_a_ready_socket_reaches_its_watcher_until_unregistered(nursery, make_loop) -> None:
    loop = make_loop()
    await nursery.start(loop.run)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        watcher = Recorder(a)
        loop.register(a.fileno(), READ, watcher)
        b.send(b"x")
        with trio.fail_after(2):
            await watcher.got.wait()
        assert watcher.events == [(a.fileno(), READ)]
        loop.unregister(a.fileno())
        b.send(b"y")
        await trio.sleep(0.05)
        assert len(watcher.events) == 1  # nothing after unregister


async def test_a_socket_unregistered_for_its_close_is_forgotten_and_its_number_reusable(
    nursery, make_loop, monkeypatch
) -> None:
    """epoll drops a closed descriptor by itself: `closing=True` makes no unregister call there
    (selectors still needs one); either way the socket's number, reused at once, starts clean."""
    loop = make_loop()
    await nursery.start(loop.run)
    calls: list[int] = []
    poller = loop._poller
    real = type(poller).unregister
    monkeypatch.setattr(type(poller), "unregister", lambda self, fd: (calls.append(fd), real(self, fd)))
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()
    loop.register(fd, READ, Recorder(a))
    loop.unregister(fd, closing=True)
    a.close()
    assert calls == ([] if poller.drops_closed else [fd])
    c, d = socket.socketpair()  # the lowest free number: `fd` again
    with b, c, d:
        c.setblocking(False)
        assert c.fileno() == fd
        watcher = Recorder(c)
        loop.register(c.fileno(), READ, watcher)  # an epoll that still held `fd` would refuse (EEXIST)
        d.send(b"x")
        with trio.fail_after(2):
            await watcher.got.wait()
        assert watcher.events == [(fd, READ)]
        loop.unregister(fd)


async def test_soon_from_outside_a_round_wakes_a_sleeping_loop(nursery, make_loop) -> None:
    loop = make_loop()
    await nursery.start(loop.run)
    await trio.sleep(0.01)  # the loop is asleep in wait_readable: no socket will ever be ready
    done = trio.Event()
    loop.soon(done.set)
    with trio.fail_after(2):
        await done.wait()


@pytest.mark.expect_errors(r"wsproxy\.reactor: .* failed: ending its session only \[RuntimeError: a bug in one\b")
async def test_a_failing_soon_callback_does_not_stop_the_loop(nursery, make_loop) -> None:
    loop = make_loop()
    await nursery.start(loop.run)
    done = trio.Event()

    def boom() -> None:
        raise RuntimeError("a bug in one session")

    loop.soon(boom)
    loop.soon(done.set)
    with trio.fail_after(2):
        await done.wait()
    assert loop.running


async def test_stopping_the_loop_releases_every_owned_session_once(make_loop) -> None:
    loop = make_loop()
    registered, parked = Recorder(), Recorder()
    a, b = socket.socketpair()
    with a, b:
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            loop.attach(registered)
            loop.register(a.fileno(), WRITE | READ, registered)
            loop.attach(parked)  # owned, but with no socket registered (both peers paused)
            assert len(loop) == 2
            nursery.cancel_scope.cancel()
    assert (registered.stopped, parked.stopped) == (1, 1)
    assert not loop.running and len(loop) == 0


class Raising(Recorder):
    """A watcher whose every event raises (a bug in one session's relay)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.failures = 0

    def on_event(self, fd: int, mask: int) -> None:
        super().on_event(fd, mask)
        raise RuntimeError("a bug in one session")

    def failed(self) -> None:
        self.failures += 1


@pytest.mark.expect_errors(r"wsproxy\.reactor: .* failed: ending its session only \[RuntimeError: a bug in\b")
async def test_a_raising_watcher_ends_only_its_own_session(nursery, make_loop, caplog) -> None:
    counted: list[int] = []
    loop = make_loop(on_failure=lambda: counted.append(1))
    await nursery.start(loop.run)
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    with a, b, c, d:
        a.setblocking(False)
        c.setblocking(False)
        bad, good = Raising(a), Recorder(c)
        loop.attach(bad)
        loop.attach(good)
        loop.register(a.fileno(), READ, bad)
        loop.register(c.fileno(), READ, good)
        b.send(b"x")
        d.send(b"x")
        with trio.fail_after(2):
            await good.got.wait()
            while not bad.failures:
                await trio.sleep(0.01)
        for _ in range(3):  # the loop goes on serving the other watcher; the failed one is gone
            good.got = trio.Event()
            b.send(b"y")
            d.send(b"y")
            with trio.fail_after(2):
                await good.got.wait()
        assert loop.running
        assert (bad.failures, len(bad.events), len(counted)) == (1, 1, 1)
        assert len(loop) == 1  # only the good watcher is still owned
    tracebacks = [r for r in caplog.records if r.name == "wsproxy.reactor" and r.exc_info]
    assert len(tracebacks) == 1 and "a bug in one session" in caplog.text


class Slow(Recorder):
    """An always-ready watcher that takes `cost` seconds of CPU per event (never consumes)."""

    def __init__(self, cost: float) -> None:
        super().__init__()
        self.cost = cost

    def on_event(self, fd: int, mask: int) -> None:
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        super().on_event(fd, mask)


async def test_a_round_yields_to_trio_once_its_budget_is_spent(nursery, make_loop) -> None:
    """40 ready watchers of 1 ms each: one round would hold trio 40 ms; with a 2 ms budget the
    loop yields after about 2 ms (one watcher's cost past the budget at most), and every watcher
    still gets its turn."""
    budget, cost = 0.002, 0.001
    loop = make_loop(round_budget=budget)
    await nursery.start(loop.run)
    steps = StepTimer(loop.task)
    pairs = [socket.socketpair() for _ in range(40)]
    watchers = [Slow(cost) for _ in pairs]
    trio.lowlevel.add_instrument(steps)
    try:
        for (a, b), w in zip(pairs, watchers, strict=True):
            b.send(b"x")  # never read: ready every round
            loop.register(a.fileno(), READ, w)
        with trio.fail_after(5):
            while not all(w.events for w in watchers):
                await trio.sleep(0)  # this task gets its turns between the loop's slices
    finally:
        trio.lowlevel.remove_instrument(steps)
        for (a, b), _ in zip(pairs, watchers, strict=True):
            loop.unregister(a.fileno())
            a.close()
            b.close()
    # measured ~3 ms with the budget, over 40 ms without; the slack absorbs a loaded machine
    assert steps.longest < budget + cost + 0.015, f"the loop held trio {steps.longest * 1000:.1f} ms"


@pytest.mark.expect_errors(r"wsproxy\.reactor: .* failed: ending its session only \[RuntimeError: a bug in\b")
async def test_a_raising_soon_callback_ends_the_watcher_it_was_asked_for(nursery, make_loop) -> None:
    counted: list[int] = []
    loop = make_loop(on_failure=lambda: counted.append(1))
    await nursery.start(loop.run)
    a, b = socket.socketpair()
    with a, b:
        owner = Raising(a)
        loop.attach(owner)
        loop.register(a.fileno(), READ, owner)
        done = trio.Event()

        def boom() -> None:
            raise RuntimeError("a bug in a callback")

        loop.soon(boom, owner)
        loop.soon(done.set)
        with trio.fail_after(2):
            await done.wait()
        assert (owner.failures, len(counted), len(loop)) == (1, 1, 0)
        b.send(b"x")  # its socket is no longer watched
        await trio.sleep(0.05)
        assert owner.events == []
