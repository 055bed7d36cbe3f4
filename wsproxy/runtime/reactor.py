"""One readiness loop for the sockets of every session in its relay phase.

A trio task per pump is most of an idle session's memory, and a trip through trio's scheduler
per wait (a task switch and an EPOLLONESHOT re-registration) most of a relayed message's cost
(docs/performance.md). Here each relaying socket is registered once, level-triggered, in a
private epoll; one task waits until that epoll has events (trio's own epoll watches its
descriptor, so the task sleeps like any other) and calls each ready socket's watcher directly.
An idle session is then a few objects and no task of its own; a busy one costs its system calls
and a share of one `epoll_wait` per round.

Fairness comes from the level-triggered round: every ready socket gets one turn per round, and
the task yields to trio between rounds, so one flooding session delays neither the others nor
a cancellation. The loop is Linux's (epoll); elsewhere sessions relay with their own tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Callable
from typing import Protocol

import trio

log = logging.getLogger("wsproxy.reactor")

AVAILABLE = hasattr(select, "epoll") and hasattr(os, "eventfd")
MAX_EVENTS = 512  # events taken per round; the rest wait for the next round (level-triggered)


class Watcher(Protocol):
    def on_event(self, fd: int, mask: int) -> None:
        """`fd` is ready (`mask`: epoll bits). Must not raise: a watcher handles its own errors."""

    def reactor_stopped(self) -> None:
        """The loop is ending with this watcher still registered: let go of everything."""


class Reactor:
    """The loop (`run`, one task in the server's nursery) and its registrations."""

    __slots__ = ("_attached", "_ep", "_in_round", "_soon", "_wake", "_watchers", "running")

    def __init__(self) -> None:
        self._ep: select.epoll | None = None
        self._watchers: dict[int, Watcher] = {}
        self._attached: set[Watcher] = set()  # every session the loop owns, registered or not
        self._soon: list[Callable[[], None]] = []  # run next round without waiting for the kernel
        self._wake = -1  # an eventfd in the epoll: `soon` from outside a round wakes the loop
        self._in_round = False
        self.running = False

    def attach(self, watcher: Watcher) -> None:
        """`watcher` is owned by the loop from now until `detach`: told if the loop stops, even
        while none of its sockets is registered (both peers paused, say)."""
        self._attached.add(watcher)

    def detach(self, watcher: Watcher) -> None:
        self._attached.discard(watcher)

    def register(self, fd: int, mask: int, watcher: Watcher) -> None:
        assert self._ep is not None, "the reactor is not running"
        self._ep.register(fd, mask)
        self._watchers[fd] = watcher

    def modify(self, fd: int, mask: int) -> None:
        assert self._ep is not None
        self._ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        """Forget `fd`; call before the socket is closed (its number may be reused at once)."""
        if self._watchers.pop(fd, None) is not None and self._ep is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def soon(self, callback: Callable[[], None]) -> None:
        """Call `callback` in the next round even if no socket is ready (TLS plaintext OpenSSL
        has already decrypted, work a watcher split to stay fair)."""
        self._soon.append(callback)
        if not self._in_round and self._wake >= 0 and len(self._soon) == 1:
            os.eventfd_write(self._wake, 1)  # the loop may be asleep in wait_readable

    def __len__(self) -> int:
        """Sessions the loop owns."""
        return len(self._attached)

    def _round(self, events: list[tuple[int, int]]) -> None:
        """One round: each ready socket's watcher once, then what was asked for `soon`. A method
        of its own so that no loop variable keeps the last session alive once it ended."""
        watchers = self._watchers
        self._in_round = True
        try:
            for fd, mask in events:
                watcher = watchers.get(fd)
                if watcher is not None:  # else unregistered by an earlier watcher this round
                    watcher.on_event(fd, mask)
                elif fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
            if self._soon:
                soon, self._soon = self._soon, []
                for callback in soon:
                    try:
                        callback()
                    except Exception:
                        log.exception("reactor callback failed")
        finally:
            self._in_round = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._ep = ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ep.register(self._wake, select.EPOLLIN)
        self.running = True
        task_status.started()
        try:
            while True:
                if self._soon:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(ep)
                self._round(ep.poll(0, MAX_EVENTS))
        finally:
            self.running = False
            for watcher in list(dict.fromkeys([*self._attached, *self._watchers.values()])):
                try:
                    watcher.reactor_stopped()
                except Exception:
                    log.exception("releasing a session from the reactor failed")
            self._watchers.clear()
            self._attached.clear()
            self._soon.clear()
            self._ep = None
            ep.close()
            os.close(self._wake)
            self._wake = -1
