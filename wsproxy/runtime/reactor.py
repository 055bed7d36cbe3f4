"""One readiness loop for the sockets of every session in its relay phase: the relay's one driver.

A trio task per pump is most of an idle session's memory, and a trip through trio's scheduler
per wait (a task switch and an EPOLLONESHOT re-registration) most of a relayed message's cost
(docs/performance.md). Here each relaying socket is registered once, level-triggered, in a
private poller; one task waits until the poller's own descriptor is readable (trio's I/O
manager watches it, so the task sleeps like any other) and calls each ready socket's watcher
directly. An idle session is then a few objects and no task of its own; a busy one costs its
system calls and a share of one poll per round.

The poller is the only part that varies by platform (`Poller`): epoll itself on Linux (cheaper
per round than `selectors`, see `EpollPoller`), otherwise `selectors.DefaultSelector`
(kqueue on BSD and macOS). Both are level-triggered and have a descriptor trio can wait on.

Fairness and isolation are the loop's: every ready socket gets one turn per round; a round has a
time budget (`round_budget`), past which the rest of its events wait while the loop yields to
trio, so handshakes, health checks and the admin listener never wait behind a long round; and a
watcher that raises ends its own session only (traceback logged once, `on_failure` counts it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

import trio

from wsproxy.config.defaults import REACTOR_ROUND_BUDGET
from wsproxy.runtime.splice import PipePool

log = logging.getLogger("wsproxy.reactor")

READ = 1  # the event bits watchers see (epoll's EPOLLIN and EPOLLOUT values)
WRITE = 4
MAX_EVENTS = 512  # events taken per poll; the rest wait for the next round (level-triggered)


class Poller(Protocol):
    """A level-triggered readiness poller with a descriptor of its own (readable when it has events)."""

    drops_closed: bool  # closing a descriptor unregisters it (epoll): no call needed before a close

    def fileno(self) -> int: ...

    def register(self, fd: int, events: int) -> None: ...

    def modify(self, fd: int, events: int) -> None: ...

    def unregister(self, fd: int) -> None: ...

    def poll(self) -> list[tuple[int, int]]:
        """Ready (fd, READ/WRITE bits) now, without waiting; at most MAX_EVENTS."""
        ...

    def close(self) -> None: ...


class EpollPoller:
    """epoll itself: READ/WRITE are its own bits, so nothing is translated per event. Against
    `SelectorPoller` on Linux (epoll under it too) it saves the SelectorKey look-ups and the
    (key, events) list `selectors` builds per poll, and a SelectorKey per registration change:
    a few microseconds per round and per change (benchmarks/poller_bench.py)."""

    __slots__ = ("_ep",)
    drops_closed = True  # the kernel removes a closed socket (we never dup one)

    def __init__(self) -> None:
        self._ep = select.epoll()

    def fileno(self) -> int:
        return self._ep.fileno()

    def register(self, fd: int, events: int) -> None:
        self._ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._ep.unregister(fd)

    def poll(self) -> list[tuple[int, int]]:
        return self._ep.poll(0, MAX_EVENTS)

    def close(self) -> None:
        self._ep.close()


def _to_selectors(events: int) -> int:
    return (selectors.EVENT_READ if events & READ else 0) | (selectors.EVENT_WRITE if events & WRITE else 0)


class SelectorPoller:
    """`selectors.DefaultSelector` (kqueue on BSD and macOS, epoll on Linux), for any host whose
    selector has a descriptor to wait on."""

    __slots__ = ("_sel",)
    drops_closed = False  # the selector's own map must forget it

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        if not hasattr(self._sel, "fileno"):
            self._sel.close()
            raise RuntimeError(f"{type(self._sel).__name__} has no descriptor to wait on: the relay needs one")

    def fileno(self) -> int:
        return self._sel.fileno()

    def register(self, fd: int, events: int) -> None:
        self._sel.register(fd, _to_selectors(events))

    def modify(self, fd: int, events: int) -> None:
        self._sel.modify(fd, _to_selectors(events))

    def unregister(self, fd: int) -> None:
        self._sel.unregister(fd)

    def poll(self) -> list[tuple[int, int]]:
        return [
            (key.fd, (READ if ev & selectors.EVENT_READ else 0) | (WRITE if ev & selectors.EVENT_WRITE else 0))
            for key, ev in self._sel.select(0)[:MAX_EVENTS]
        ]

    def close(self) -> None:
        self._sel.close()


def default_poller() -> Poller:
    """epoll where there is one, else the platform's selector."""
    return EpollPoller() if hasattr(select, "epoll") else SelectorPoller()


class _Waker:
    """A descriptor in the poller that `soon` makes readable, to wake a loop asleep in the poll:
    an eventfd where there is one, a socket pair elsewhere."""

    __slots__ = ("_pair", "fd")

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            self._pair = (a, b)
            self.fd = a.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already pending: the loop will wake anyway
            if self._pair is None:
                os.eventfd_write(self.fd, 1)
            else:
                self._pair[1].send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if self._pair is None:
                os.eventfd_read(self.fd)
            else:
                self._pair[0].recv(4096)

    def close(self) -> None:
        if self._pair is None:
            os.close(self.fd)
        else:
            for s in self._pair:
                s.close()


class Watcher(Protocol):
    def on_event(self, fd: int, mask: int) -> None:
        """`fd` is ready (`mask`: READ/WRITE bits). If this raises, the loop logs it once, stops
        watching this watcher's sockets and calls `failed`: the session ends, nothing else."""

    def failed(self) -> None:
        """A call of this watcher raised (already logged and counted): end the session now."""

    def reactor_stopped(self) -> None:
        """The loop is ending with this watcher still registered: let go of everything."""


class Reactor:
    """The loop (`run`, one task in the server's nursery) and its registrations."""

    __slots__ = (
        "_attached",
        "_budget",
        "_in_round",
        "_leftover",
        "_make_poller",
        "_on_failure",
        "_poller",
        "_soon",
        "_waker",
        "_watchers",
        "pipes",
        "running",
        "task",
    )

    def __init__(
        self,
        *,
        poller: Callable[[], Poller] | None = None,
        round_budget: float = REACTOR_ROUND_BUDGET,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._make_poller = poller  # None: default_poller(), looked up when the loop starts
        self._budget = round_budget  # seconds of watcher calls per round before yielding to trio
        self._on_failure = on_failure  # a watcher raised (the metric)
        self._poller: Poller | None = None
        self._watchers: dict[int, Watcher] = {}
        self._attached: set[Watcher] = set()  # every session the loop owns, registered or not
        # run next round without waiting for the kernel, with the watcher a failure would end
        self._soon: list[tuple[Callable[[], None], Watcher | None]] = []
        self._leftover: list[tuple[int, int]] = []  # events a round's budget left for the next
        self._waker: _Waker | None = None
        self._in_round = False
        self.running = False
        self.task: trio.lowlevel.Task | None = None  # the loop's task, while it runs
        self.pipes = PipePool()  # the kernel pipes its sessions splice through (runtime/splice.py)

    def attach(self, watcher: Watcher) -> None:
        """`watcher` is owned by the loop from now until `detach`: told if the loop stops, even
        while none of its sockets is registered (both peers paused, say)."""
        self._attached.add(watcher)

    def detach(self, watcher: Watcher) -> None:
        self._attached.discard(watcher)

    def register(self, fd: int, mask: int, watcher: Watcher) -> None:
        assert self._poller is not None, "the reactor is not running"
        self._poller.register(fd, mask)
        self._watchers[fd] = watcher

    def modify(self, fd: int, mask: int) -> None:
        assert self._poller is not None
        self._poller.modify(fd, mask)

    def unregister(self, fd: int, *, closing: bool = False) -> None:
        """Forget `fd`; call before the socket is closed (its number may be reused at once).
        `closing`: the caller closes it right after, which is enough for a poller that drops
        closed descriptors (epoll: one system call fewer per socket)."""
        if self._watchers.pop(fd, None) is not None and self._poller is not None:
            if closing and self._poller.drops_closed:
                return
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._poller.unregister(fd)

    def soon(self, callback: Callable[[], None], watcher: Watcher | None = None) -> None:
        """Call `callback` in a coming round even if no socket is ready: work that no readiness
        event will announce (TLS plaintext OpenSSL has already decrypted, a backlog a watcher
        split to stay fair). Called from outside a round (a timer, the session's task), it wakes
        the loop if it sleeps. If `callback` raises, `watcher` fails as if its event had."""
        self._soon.append((callback, watcher))
        if not self._in_round and self._waker is not None and len(self._soon) == 1:
            self._waker.wake()

    def __len__(self) -> int:
        """Sessions the loop owns."""
        return len(self._attached)

    def _fail(self, watcher: Watcher | None, what: str) -> None:
        """A call raised: log it once (with the traceback), count it, and end only that session."""
        log.exception("%s failed: ending its session only", what)
        if self._on_failure is not None:
            self._on_failure()
        if watcher is None:
            return
        for fd in [fd for fd, w in self._watchers.items() if w is watcher]:
            self.unregister(fd)
        self._attached.discard(watcher)
        try:
            watcher.failed()
        except Exception:
            log.exception("ending a failed session failed")

    def _round(self, events: list[tuple[int, int]]) -> None:
        """One round: each ready socket's watcher once, then what was asked for `soon`, until the
        budget is spent (what is left waits for the next round, after a yield to trio). A method
        of its own so that no loop variable keeps the last session alive once it ended."""
        watchers = self._watchers
        clock = time.perf_counter
        deadline = clock() + self._budget
        self._in_round = True
        try:
            for i, (fd, mask) in enumerate(events):
                watcher = watchers.get(fd)
                if watcher is not None:  # else unregistered by an earlier watcher this round
                    try:
                        watcher.on_event(fd, mask)
                    except Exception:
                        self._fail(watcher, "a relay watcher")
                    if clock() >= deadline:
                        self._leftover = events[i + 1 :]
                        return
                elif self._waker is not None and fd == self._waker.fd:
                    self._waker.drain()
            self._leftover = []
            if self._soon:
                soon, self._soon = self._soon, []
                for i, (callback, owner) in enumerate(soon):
                    try:
                        callback()
                    except Exception:
                        self._fail(owner, "a relay callback")
                    if clock() >= deadline:
                        self._soon[:0] = soon[i + 1 :]
                        return
        finally:
            self._in_round = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._poller = poller = (self._make_poller or default_poller)()
        self._waker = waker = _Waker()
        poller.register(waker.fd, READ)
        self.running = True
        self.task = trio.lowlevel.current_task()
        task_status.started()
        try:
            while True:
                if self._soon or self._leftover:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(poller.fileno())
                self._round(self._leftover or poller.poll())
        finally:
            self.running = False
            self.task = None
            for watcher in list(dict.fromkeys([*self._attached, *self._watchers.values()])):
                try:
                    watcher.reactor_stopped()
                except Exception:
                    log.exception("releasing a session from the reactor failed")
            self._watchers.clear()
            self._attached.clear()
            self._soon.clear()
            self._leftover = []
            self._poller = None
            self._waker = None
            poller.close()
            waker.close()
            self.pipes.close()
