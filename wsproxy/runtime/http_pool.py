"""Idle keep-alive connections to backends, reused by plain HTTP requests of any client.

Per backend at most `pools.NAME.http_pool.max_idle` connections wait, each for at most
`idle_timeout`; the newest is reused first (the one least likely to have been closed by the
backend), and one that became readable while idle (the backend closed it, or sent bytes nobody
asked for) is dropped instead of reused. One timer entry sweeps expired connections, so a quiet
proxy does not hold backend sockets past their timeout. Owned by the server; kept across reloads
(a backend's connections follow its live object, which a reload keeps when the address stays).
"""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass

import h11
import trio

from wsproxy.config import HttpPool
from wsproxy.policy.balancing import Backend
from wsproxy.runtime.backend_tls import BackendStream
from wsproxy.runtime.timers import TimerEntry, Timers


@dataclass(slots=True)
class Idle:
    """A backend connection between two requests: the stream and its h11 state (next cycle)."""

    stream: BackendStream
    conn: h11.Connection
    until: float  # trio clock: closed after this


def still_open(stream: BackendStream) -> bool:
    """An idle connection may be reused: nothing to read (not closed by the backend, no stray
    bytes). A TLS socket's read also takes in what OpenSSL has pending (session tickets)."""
    sock = stream.socket
    if sock.fileno() == -1:
        return False
    try:
        sock.recv(1)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True
    except (OSError, ssl.SSLError):
        return False
    return False  # the backend closed it (b"") or sent bytes nobody asked for


class IdleConnections:
    """Every backend's idle connections (bounded per backend and in time)."""

    __slots__ = ("_idle", "_sweep", "_timers")

    def __init__(self, timers: Timers | None = None) -> None:
        self._idle: dict[Backend, deque[Idle]] = {}
        self._timers = timers
        self._sweep: TimerEntry | None = None

    def __len__(self) -> int:
        return sum(len(q) for q in self._idle.values())

    def take(self, backend: Backend, now: float) -> Idle | None:
        """The newest usable idle connection to `backend`, or None."""
        queue = self._idle.get(backend)
        while queue:
            idle = queue.pop()
            if idle.until > now and still_open(idle.stream):
                if not queue:
                    del self._idle[backend]
                return idle
            idle.stream.close_now()
        self._idle.pop(backend, None)
        return None

    def put(self, backend: Backend, stream: BackendStream, conn: h11.Connection, settings: HttpPool) -> None:
        """Keep a connection whose exchange ended cleanly (h11 at its next cycle), or close it
        when the backend's idle list is full."""
        if settings.max_idle == 0:
            stream.close_now()
            return
        now = trio.current_time()
        queue = self._idle.setdefault(backend, deque())
        while len(queue) >= settings.max_idle:
            queue.popleft().stream.close_now()  # the oldest goes
        queue.append(Idle(stream, conn, now + settings.idle_timeout))
        self._arm(now + settings.idle_timeout)

    def close_all(self) -> None:
        for queue in self._idle.values():
            for idle in queue:
                idle.stream.close_now()
        self._idle.clear()
        if self._timers is not None:
            self._timers.cancel(self._sweep)
        self._sweep = None

    def _arm(self, when: float) -> None:
        if self._timers is None:
            return
        if self._sweep is not None and self._sweep.callback is not None and self._sweep.when <= when:
            return
        self._timers.cancel(self._sweep)
        self._sweep = self._timers.schedule(when, self._expire)

    def _expire(self, now: float) -> None:
        """The timer entry: close what outlived its idle_timeout, re-arm for the next one."""
        self._sweep = None
        earliest: float | None = None
        for backend in list(self._idle):
            queue = self._idle[backend]
            kept = deque(i for i in queue if i.until > now)
            for idle in queue:
                if idle.until <= now:
                    idle.stream.close_now()
            if kept:
                self._idle[backend] = kept
                first = min(i.until for i in kept)
                earliest = first if earliest is None else min(earliest, first)
            else:
                del self._idle[backend]
        if earliest is not None:
            self._arm(earliest)
