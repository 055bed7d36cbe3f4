"""A session's relay phase driven by the shared readiness loop (reactor.py) instead of tasks.

The same contract as the task-driven pumps in session.py, with the waiting turned inside out:
when a socket is ready the reactor calls `on_event`, which reads once, feeds the sans-I/O relay,
and sends what it queued at once. What the kernel does not take yet stays in that side's one
pending buffer; while it waits, the peer that produced it is not read (backpressure: the pending
bytes are bounded by one read plus control frames), and the socket watches for writability. A
side the relay is done with is closed once its pending bytes are out. The session's own task
ends once the link has started; the link ends the session (`on_end`): an idle session costs its
objects and no task.

Timers (slow consumer, rate-limit pauses, the close timeout) are entries in the shared
`Timers` schedule, as heartbeats are.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any

import trio

from wsproxy.observe.metrics import BUFFER_FULL, SEND_STALL_SECONDS, SEND_STALLED, SLOW_CONSUMER_CLOSED, Metrics
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.protocol.relay import GOING_AWAY, Relay
from wsproxy.runtime.reactor import Reactor
from wsproxy.runtime.timers import TimerEntry, Timers

log = logging.getLogger("wsproxy.session")

IN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1
OUT = select.EPOLLOUT if hasattr(select, "EPOLLOUT") else 4
SETTLE_ROUNDS = 16  # relay steps per event before the rest is left to the next reactor round
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _nothing_pending() -> int:
    return 0


def _ignore(*_: Any) -> None:
    return None


def _no_name(side: str) -> str:
    return side


class Side:
    """One peer's socket and what is owed to it."""

    __slots__ = (
        "again",
        "closed",
        "eof",
        "fd",
        "feed",
        "mask",
        "name",
        "out",
        "pending",
        "read_wants_write",
        "recv",
        "send",
        "sock",
        "stall_began",
        "stall_timer",
        "take",
        "tls",
        "write_wants_read",
    )

    def __init__(
        self, name: str, sock: socket.socket, feed: Callable[[bytes], None], take: Callable[[], bytes]
    ) -> None:
        self.name = name
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)
        # The calls made per read and per send, bound once. For TLS, the SSL object's own (the
        # SSLSocket methods only add checks around them; their errors all end the side anyway).
        sslobj = getattr(sock, "_sslobj", None) if self.tls else None
        self.recv: Callable[[int], bytes] = sslobj.read if sslobj is not None else sock.recv
        self.send: Callable[[Any], int] = sslobj.write if sslobj is not None else sock.send
        self.pending: Callable[[], int] = sslobj.pending if sslobj is not None else _nothing_pending
        self.feed = feed
        self.take = take
        self.out: bytes | memoryview = b""  # sent in part: the rest, as given to the last send
        self.mask = 0  # what the reactor watches for (0: not registered)
        self.eof = False  # the peer's stream ended (or broke): nothing more to read
        self.closed = False  # our socket is closed: nothing more to send
        self.read_wants_write = False  # TLS: the last recv needs the socket writable first
        self.write_wants_read = False  # TLS: the last send needs the socket readable first
        self.stall_began: float | None = None  # when the pending bytes stopped fitting
        self.stall_timer: TimerEntry | None = None
        self.again = False  # TLS: a read of OpenSSL's buffered plaintext is already asked for


class Link:
    """Both sides of one relaying session, registered with the reactor."""

    __slots__ = (
        "_close_timer",
        "_done",
        "_flow",
        "_may_backlog",
        "_now",
        "_on_end",
        "_on_pongs",
        "_on_rate_close",
        "_on_throttled",
        "_peer_name",
        "_reactor",
        "_schedule",
        "_size",
        "_slow_limit",
        "_throttle_timer",
        "_throttled",
        "_timers",
        "backend",
        "client",
        "close_timeout",
        "failed",
        "metrics",
        "relay",
    )

    def __init__(
        self,
        *,
        reactor: Reactor,
        relay: Relay,
        client: socket.socket,
        backend: socket.socket,
        timers: Timers,
        metrics: Metrics,
        receive_size: int,
        close_timeout: float,
        slow_consumer_timeout: float | None,
        on_pongs: Callable[[list[tuple[str, bytes]], float], None],
        flow: FlowLimiter | None,
        on_throttled: Callable[[], None],
        on_rate_close: Callable[[], None],
        peer_name: Callable[[str], str],
        on_end: Callable[[Link], None],
        schedule: Any = None,
    ) -> None:
        self._reactor = reactor
        self.relay = relay
        self.client = Side("client", client, relay.feed_client, relay.take_for_client)
        self.backend = Side("backend", backend, relay.feed_backend, relay.take_for_backend)
        self._timers = timers
        self.metrics = metrics
        self._size = receive_size
        self.close_timeout = close_timeout
        self._slow_limit = slow_consumer_timeout
        self._schedule = schedule  # heartbeat.Schedule (None: nothing timed), told what each read carried
        self._on_pongs = on_pongs  # the proxy's own pongs a read carried, with the time they arrived
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time, one call shorter
        self._may_backlog = getattr(relay, "may_backlog", True)  # passthrough never keeps a backlog
        self._flow = flow
        self._on_throttled = on_throttled  # the client went over its budget (counted once per run)
        self._on_rate_close = on_rate_close  # ... and stayed over it for close_after: 1008
        self._peer_name = peer_name
        self._throttled = False
        self._throttle_timer: TimerEntry | None = None
        self._close_timer: TimerEntry | None = None
        self._on_end = on_end  # the session's end: sockets closed, counts released, log line
        self._done = False
        self.failed = False  # a bug ended this session (logged)

    # --- the session's side ----------------------------------------------------------------

    def start(self, client_trailing: bytes, backend_trailing: bytes) -> None:
        """Feed what each peer sent past its handshake, send what that queued, start watching.
        From here the reactor owns the session until `on_end`."""
        self._reactor.attach(self)
        try:
            if client_trailing:
                self._feed(self.client, client_trailing)
            if backend_trailing:
                self._feed(self.backend, backend_trailing)
        except Exception:
            self._crash()
            return
        self.settle()

    def backlog(self) -> tuple[int, int]:
        """Bytes waiting in the proxy: (to the client, to the backend)."""
        return len(self.client.out), len(self.backend.out)

    def end(self) -> None:
        """End the session now, without a closing handshake (a cut, a shutdown deadline)."""
        self._finish()

    def settle(self) -> None:
        """Send what the relay queued, close finished sides, re-aim the reactor. Called after
        every relay step, and by the session after a step of its own (ping, close)."""
        if self._done:
            return
        try:
            self._settle()
        except Exception:
            self._crash()

    # --- the reactor's side ----------------------------------------------------------------

    def on_event(self, fd: int, mask: int) -> None:
        if self._done:
            return
        side = self.client if fd == self.client.fd else self.backend
        try:
            if side.out and not side.closed:
                self._write(side)
            if self._may_read(side):
                self._read(side)
            self._settle()
        except Exception:
            self._crash()

    def reactor_stopped(self) -> None:
        self._finish()

    @property
    def done(self) -> bool:
        """The session has ended (or is ending): nothing more is read, sent or timed."""
        return self._done

    # --- steps ----------------------------------------------------------------------------

    def _may_read(self, s: Side) -> bool:
        if s.eof or s.closed:
            return False
        if (self.backend if s is self.client else self.client).out:
            return False  # backpressure: what s sent before is not out yet
        if self._may_backlog and self.relay.backlog(s.name):
            return False  # inflated input waits until the other peer took some
        return not (self._throttled and s is self.client)

    def _feed(self, s: Side, data: bytes) -> None:
        """Feed one read to the relay (a step that also counts as traffic from `s`)."""
        self._step(s.feed, data, s.name)

    def _step(self, step: Callable[[Any], None], arg: Any, read_from: str | None = None) -> None:
        """Run one relay step and tell the heartbeat schedule what it carried: traffic from the
        peer read (if any), data frames, the proxy's own pongs. Runs for every read."""
        schedule = self._schedule
        if schedule is None:
            step(arg)
            return
        now = self._now()
        if read_from is not None:
            schedule.saw_traffic(read_from, now)
        stats = self.relay.stats
        frames = stats.data_frames
        step(arg)
        if stats.data_frames != frames:
            schedule.saw_data(now)
        pongs = self.relay.take_pongs()
        if pongs:
            self._on_pongs(pongs, now)

    def _read(self, s: Side) -> None:
        try:
            data = s.recv(self._size)
        except ssl.SSLWantWriteError:
            s.read_wants_write = True
            return
        except _WOULD_BLOCK:
            s.read_wants_write = False
            return
        except (OSError, ssl.SSLError):
            data = b""  # reset or broken: the relay treats it as the peer vanishing
        s.read_wants_write = False
        if not data:
            s.eof = True
            s.feed(b"")
            return
        flow = self._flow if s is self.client else None
        sent_before = self.relay.stats.messages_to_backend
        self._feed(s, data)
        if self._may_backlog and self.relay.backlog(s.name):
            self.metrics.backpressure_event("backend" if s is self.client else "client", BUFFER_FULL)
        if flow is not None and not self.relay.closing:
            was_limited = flow.limited_since is not None
            messages = self.relay.stats.messages_to_backend - sent_before
            flow.charge(trio.current_time(), messages=messages, nbytes=len(data))
            if flow.limited_since is not None:
                self._hold_back(newly=not was_limited)

    def _write(self, s: Side) -> None:
        out = s.out
        try:
            sent = s.send(out)
        except ssl.SSLWantReadError:
            s.write_wants_read = True
            sent = 0
        except _WOULD_BLOCK:
            s.write_wants_read = False
            sent = 0
        except (OSError, ssl.SSLError):
            self._broken(s)
            return
        else:
            s.write_wants_read = False
        if sent == len(out):
            s.out = b""
            if s.stall_began is not None:
                self._stall_over(s)
            return
        s.out = memoryview(out)[sent:] if sent else out  # unchanged: TLS retries need the same buffer
        if s.stall_began is None:
            s.stall_began = trio.current_time()
            if self._slow_limit is not None:
                s.stall_timer = self._timers.schedule(s.stall_began + self._slow_limit, self._slow_timer(s))

    def _stall_over(self, s: Side) -> None:
        assert s.stall_began is not None
        stalled = trio.current_time() - s.stall_began
        self.metrics.send_stall(s.name, stalled)
        if stalled >= SEND_STALL_SECONDS:
            self.metrics.backpressure_event(s.name, SEND_STALLED)
        s.stall_began = None
        self._timers.cancel(s.stall_timer)
        s.stall_timer = None

    def _slow_timer(self, s: Side) -> Callable[[float], None]:
        def fire(now: float) -> None:
            s.stall_timer = None
            if self._done or not s.out:
                return
            try:
                drop()
            except Exception:
                self._crash()

        def drop() -> None:
            limit = self._slow_limit
            # The peer took nothing for `limit` seconds while data waited. Its socket is mid-frame,
            # so no close frame can follow: drop it, and tell the other peer why.
            log.warning("%s %s accepted nothing for %gs: closing it", s.name, self._peer_name(s.name), limit)
            self.metrics.backpressure_event(s.name, SLOW_CONSUMER_CLOSED)
            reason = f"{s.name} too slow: nothing accepted for {limit:g}s"
            self.relay.abandon(s.name, other_code=GOING_AWAY, reason=reason)
            s.out = b""
            s.stall_began = None
            self._close(s)
            self.settle()

        return fire

    def _broken(self, s: Side) -> None:
        """A send failed: the peer is gone; the relay decides what the other side hears."""
        s.out = b""
        if s.stall_began is not None:
            self._stall_over(s)
        self._close(s)
        if not s.eof:
            s.eof = True
            s.feed(b"")

    def _hold_back(self, *, newly: bool) -> None:
        """Over its message/byte budget: stop reading the client until the budget allows, or
        close it once it has been over for close_after."""
        flow = self._flow
        assert flow is not None
        self._timers.cancel(self._throttle_timer)
        self._throttle_timer = None
        if newly:
            self._on_throttled()
        pause = flow.pause(trio.current_time())
        if pause is None or pause <= 0:
            self._throttled = False
            if pause is None:
                self._on_rate_close()
            return
        self._throttled = True
        self._throttle_timer = self._timers.schedule(trio.current_time() + pause, self._throttle_over)

    def _throttle_over(self, now: float) -> None:
        self._throttle_timer = None
        if self._done:
            return
        try:
            self._hold_back(newly=False)
        except Exception:
            self._crash()
            return
        self.settle()

    def _settle(self) -> None:
        relay = self.relay
        client, backend = self.client, self.backend
        for _ in range(SETTLE_ROUNDS):
            changed = False
            for s in (client, backend):
                data = s.take()
                if not data or s.closed:
                    continue
                s.out = data if not s.out else bytes(s.out) + data
                closed = s.closed
                self._write(s)
                changed = changed or s.closed != closed
            if self._may_backlog:
                for s, other in ((client, backend), (backend, client)):
                    if relay.backlog(s.name) and not other.out:  # (a finished side's output is dropped)
                        self._step(relay.resume, s.name)  # inflated input, as far as the other side has room
                        changed = True
            if not changed:
                break
        else:
            self._reactor.soon(self.settle)  # a long backlog: the rest in the next round, fairly
        if relay.closing:  # (a side can only be done once a close or a failure started)
            if self._close_timer is None:
                self._close_timer = self._timers.schedule(self._now() + self.close_timeout, self._close_expired)
            if relay.client_done and not client.out:
                self._close(client)
            if relay.backend_done and not backend.out:
                self._close(backend)
            if client.closed and backend.closed:
                self._finish()
                return
        self._aim(client)
        self._aim(backend)

    def _close_expired(self, now: float) -> None:
        """The closing handshake did not finish within timeouts.close: end the session."""
        self._close_timer = None
        self._finish()

    def _aim(self, s: Side) -> None:
        """Watch `s` for what it now needs: readable to read (or for a TLS write that wants a
        read), writable for pending bytes (or a TLS read that wants a write)."""
        if s.closed:
            return
        reading = self._may_read(s)
        mask = 0
        if reading or (s.write_wants_read and s.out):
            mask |= IN
        if (s.out and not s.write_wants_read) or (s.read_wants_write and reading):
            mask |= OUT
        if reading and s.tls and not s.again and s.pending():
            # Plaintext OpenSSL decrypted already (a record larger than one read, or read with
            # the handshake): the kernel socket may be empty, so epoll would never say so.
            s.again = True
            self._reactor.soon(lambda: self._read_again(s))
        if mask == s.mask:
            return
        if mask == 0:  # not even registered: a hung-up socket would report itself every round
            self._reactor.unregister(s.fd)
        elif s.mask == 0:
            self._reactor.register(s.fd, mask, self)
        else:
            self._reactor.modify(s.fd, mask)
        s.mask = mask

    def _read_again(self, s: Side) -> None:
        s.again = False
        self.on_event(s.fd, IN)

    def _close(self, s: Side) -> None:
        if s.closed:
            return
        s.closed = True
        if s.mask:
            self._reactor.unregister(s.fd)
            s.mask = 0
        if s.stall_timer is not None:
            self._timers.cancel(s.stall_timer)
            s.stall_timer = None
        sock = s.sock
        if sock.fileno() == -1:
            return
        if s.tls:  # close_notify if the socket takes it at once; never wait for the peer's
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                sock.unwrap()  # type: ignore[attr-defined]
        trio.lowlevel.notify_closing(sock)
        sock.close()

    def _crash(self) -> None:
        log.exception("session relay failed (%s)", self._peer_name("client"))
        self.failed = True
        self._finish()

    def _release(self) -> None:
        """Stop watching and cancel every timer; the sockets stay for the caller to close."""
        self._done = True
        for s in (self.client, self.backend):
            if s.mask:
                self._reactor.unregister(s.fd)
                s.mask = 0
            self._timers.cancel(s.stall_timer)
            s.stall_timer = None
        self._timers.cancel(self._close_timer)
        self._timers.cancel(self._throttle_timer)
        self._close_timer = self._throttle_timer = None

    def _finish(self) -> None:
        if self._done:
            return
        self._release()
        self._reactor.detach(self)
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            try:
                on_end(self)
            except Exception:
                log.exception("ending the session (%s) failed", self._peer_name("client"))
        # Let go of the session's bound methods: the session holds this link, so without this
        # an ended session would wait for the cycle collector instead of being freed at once.
        self._on_pongs = self._on_throttled = self._on_rate_close = _ignore
        self._peer_name = _no_name
