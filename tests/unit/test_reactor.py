"""reactor.Reactor on its own: events reach watchers, `soon` wakes a sleeping loop, and stopping
the loop releases every session it owns (registered or not)."""

from __future__ import annotations

import socket

import pytest
import trio

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


async def test_soon_from_outside_a_round_wakes_a_sleeping_loop(nursery, make_loop) -> None:
    loop = make_loop()
    await nursery.start(loop.run)
    await trio.sleep(0.01)  # the loop is asleep in wait_readable: no socket will ever be ready
    done = trio.Event()
    loop.soon(done.set)
    with trio.fail_after(2):
        await done.wait()


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
