"""A session's relay phase on the shared readiness loop (reactor.py): the relay's one I/O driver.

Every decision is the pure `policy.relay_phase.RelayPhase`'s (backpressure, the pending buffer
per side, slow consumer, rate-limit pauses, the close timer, heartbeat accounting); this module
carries out its actions on the sockets. When a socket is ready the reactor calls `on_event`,
which sends the side's in-flight bytes if it has any, reads once if the phase says so, and hands
the result to the phase as an event; the actions that come back (send, close, arm or cancel a
timer, report, end) are carried out in order, a send's result going back as the next event.
Then each socket is watched for what the phase now wants. The session's own task ends once the
link has started; the link ends the session (`on_end`): an idle session costs its objects and no
task.

TLS is the driver's alone: `ssl.SSLSocket`'s public recv/send/pending on a socket the shell owns
from accept on. A read that wants a write and a write that wants a read change what the socket
is watched for; plaintext OpenSSL decrypted already (a record larger than one read) is read in a
coming round (`Reactor.soon`), as no readiness event will announce it. Timers are entries in the
shared `Timers` schedule, as heartbeats are.

Splicing (Linux, plain sockets on both legs, `limits.splice_min_bytes`): where the phase says the
next bytes of a peer go verbatim to the other (`splice_size`), the link moves them with
`os.splice` into a pipe from the reactor's pool (runtime/splice.py) and on to the other socket
(the `PIPE` action, again on writability), instead of reading them into Python; the pipe goes back
to the pool once empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import trio

from wsproxy.observe.metrics import BUFFER_FULL, SEND_STALL_SECONDS, SEND_STALLED, SLOW_CONSUMER_CLOSED, Metrics
from wsproxy.policy import relay_phase as rp
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.policy.relay_phase import RelayPhase, SideState
from wsproxy.protocol.relay import Relay
from wsproxy.protocol.sides import Side
from wsproxy.runtime.reactor import READ, WRITE, Reactor
from wsproxy.runtime.splice import HAS_SPLICE, SPLICE_FLAGS
from wsproxy.runtime.timers import TimerEntry, Timers

log = logging.getLogger("wsproxy.session")

_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _ignore(*_: Any) -> None:
    return None


def _no_name(side: Side) -> str:
    return side


def _waiting(state: SideState) -> int:
    return len(state.out) + state.piped + sum(len(chunk) for chunk in state.more or ())


class PeerSocket:
    """One peer's socket, as the driver sees it."""

    __slots__ = (
        "again",
        "closed",
        "fd",
        "mask",
        "pipe",
        "read_wants_write",
        "sock",
        "state",
        "tls",
        "write_wants_read",
    )

    def __init__(self, sock: socket.socket, state: SideState) -> None:
        self.sock = sock
        self.state = state  # the phase's view of this peer (pending bytes, eof, closed)
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.mask = 0  # what the reactor watches for (0: not registered)
        self.closed = False  # our socket is closed
        self.read_wants_write = False  # TLS: the last recv needs the socket writable first
        self.write_wants_read = False  # TLS: the last send needs the socket readable first
        self.again = False  # TLS: a read of OpenSSL's buffered plaintext is already asked for
        self.pipe: tuple[int, int] | None = None  # the pipe toward this peer while bytes are spliced to it


class Link:
    """Both sides of one relaying session, registered with the reactor."""

    __slots__ = (
        "_done",
        "_metrics",
        "_now",
        "_on_end",
        "_on_rate_close",
        "_on_throttled",
        "_peer_name",
        "_reactor",
        "_size",
        "_splice",
        "_timer_entries",
        "_timers",
        "backend",
        "client",
        "failed_by_bug",
        "phase",
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
        flow: FlowLimiter | None,
        on_throttled: Callable[[], None],
        on_rate_close: Callable[[float], None],
        peer_name: Callable[[Side], str],
        on_end: Callable[[Link], None],
        schedule: Any = None,
        splice_min_bytes: int | None = None,
    ) -> None:
        self._reactor = reactor
        self.relay = relay
        plain = not isinstance(client, ssl.SSLSocket) and not isinstance(backend, ssl.SSLSocket)
        self.phase = RelayPhase(
            relay,
            close_timeout=close_timeout,
            slow_consumer_timeout=slow_consumer_timeout,
            flow=flow,
            schedule=schedule,
            finish_limit=receive_size,
            splice_min_bytes=splice_min_bytes if HAS_SPLICE and plain else None,
        )
        self._splice = self.phase.splice_min is not None  # some payloads may cross through a pipe
        self.client = PeerSocket(client, self.phase.client)
        self.backend = PeerSocket(backend, self.phase.backend)
        self._timers = timers
        self._metrics = metrics
        self._size = receive_size
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time, one call shorter
        self._on_throttled = on_throttled  # the client went over its budget (counted once per run)
        self._on_rate_close = on_rate_close  # ... and stayed over it for close_after: closing 1008
        self._peer_name = peer_name
        self._timer_entries: dict[tuple[str, str | None], TimerEntry] = {}
        self._on_end: Callable[[Link], None] | None = on_end  # sockets closed, counts released, log line
        self._done = False
        self.failed_by_bug = False  # a bug ended this session (logged)

    # --- the session's side ----------------------------------------------------------------

    def start(self, client_trailing: bytes, backend_trailing: bytes) -> None:
        """Feed what each peer sent past its handshake, send what that queued, start watching.
        From here the reactor owns the session until `on_end`."""
        self._reactor.attach(self)
        try:
            now = self._now()
            self._carry_out(self.phase.start(client_trailing, backend_trailing, now), now)
        except Exception:
            self._crash()

    def backlog(self) -> tuple[int, int]:
        """Bytes waiting in the proxy: (to the client, to the backend): each side's send in flight
        and the proxy's frames queued behind it."""
        return _waiting(self.client.state), _waiting(self.backend.state)

    def end(self) -> None:
        """End the session now, without a closing handshake (a cut, a shutdown deadline)."""
        self._finish()

    def settle(self) -> None:
        """The session changed the relay outside a read (a ping, a close): let the phase decide
        again, and carry it out."""
        if self._done:
            return
        try:
            now = self._now()
            self._carry_out(self.phase.settle(now), now)
        except Exception:
            self._crash()

    @property
    def done(self) -> bool:
        """The session has ended (or is ending): nothing more is read, sent or timed."""
        return self._done

    # --- the reactor's side ----------------------------------------------------------------

    def on_event(self, fd: int, mask: int) -> None:
        """A socket of this session is ready. What raises here is the reactor's to catch: it logs
        the traceback once, counts it, and calls `failed` (this session alone ends)."""
        if self._done:
            return
        s = self.client if fd == self.client.fd else self.backend
        phase = self.phase
        now = self._now()
        acted = False
        if s.state.out and not s.closed:
            self._send(s, s.state.out, now)
            acted = True
        elif s.state.piped and not s.closed:
            self._pipe_out(s, now)
            acted = True
        if not self._done and phase.may_read(s.state):
            step = self._splice_or_read(s, now) if self._splice else self._read(s, now, self._size)
            acted = step or acted
        if not acted:
            phase.settle(now)
        self._carry_out(phase.actions, now)

    def failed(self) -> None:
        self.failed_by_bug = True
        self._finish()

    def reactor_stopped(self) -> None:
        self._finish()

    # --- I/O ------------------------------------------------------------------------------

    def _read(self, s: PeerSocket, now: float, size: int) -> bool:
        """Read once; True if the phase was told something."""
        try:
            data = s.sock.recv(size)  # (SSLSocket's public recv for TLS)
        except ssl.SSLWantWriteError:
            s.read_wants_write = True
            return False
        except _WOULD_BLOCK:
            s.read_wants_write = False
            return False
        except (OSError, ssl.SSLError):
            data = b""  # reset or broken: the relay treats it as the peer vanishing
        s.read_wants_write = False
        self.phase.received(s.state.name, data, now)
        return True

    def _splice_or_read(self, s: PeerSocket, now: float) -> bool:
        """Splice what the phase lets cross verbatim into the pipe toward the other peer (then
        on, by the PIPE action); else read. After a large frame the read takes only the next
        frame's head: that head is sent on at once and its payload spliced in the same turn.
        True if the phase was told something."""
        phase = self.phase
        st = s.state
        n = phase.splice_size(st)
        if n:
            spliced = self._splice_in(s, n, now)
            if spliced is not None:
                return spliced
        size = phase.read_size(st, self._size)
        told = self._read(s, now, size)
        if told and size < self._size and not self._done:
            self._carry_out(phase.actions, now)
            if not self._done and phase.may_read(st):
                n = phase.splice_size(st)
                if n:
                    self._splice_in(s, n, now)
        return told

    def _splice_in(self, s: PeerSocket, n: int, now: float) -> bool | None:
        """Move up to `n` bytes of `s`'s input into the pipe toward the other peer; True if the
        phase was told something, None if no pipe is to be had (the caller reads instead)."""
        other = self.backend if s is self.client else self.client
        pipe = other.pipe or self._reactor.pipes.take(self._size)
        if pipe is None:
            return None
        other.pipe = pipe
        try:
            got = os.splice(s.fd, pipe[1], n, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return False  # (the pipe is empty: kept while the frame goes on)
        except OSError:
            got = 0  # reset or broken: the peer vanished
        if got:
            self.phase.spliced(s.state.name, got, now)
            return True
        other.pipe = None
        self._reactor.pipes.give(pipe)  # still empty
        self.phase.received(s.state.name, b"", now)
        return True

    def _pipe_out(self, s: PeerSocket, now: float) -> None:
        """One send of what the pipe toward `s` holds; its result goes back to the phase."""
        pipe = s.pipe
        assert pipe is not None
        try:
            sent = os.splice(pipe[0], s.fd, s.state.piped, flags=SPLICE_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:
            s.pipe = None
            self._reactor.pipes.drop(pipe)
            self.phase.send_failed(s.state.name, now)
            return
        self.phase.piped_sent(s.state.name, sent, now)
        if not s.state.piped and s.pipe is not None:
            s.pipe = None
            self._reactor.pipes.give(pipe)

    def _send(self, s: PeerSocket, data: bytes | memoryview, now: float) -> None:
        """One send of the side's in-flight bytes; its result goes back to the phase."""
        try:
            sent = s.sock.send(data)
        except ssl.SSLWantReadError:
            s.write_wants_read = True
            sent = 0
        except _WOULD_BLOCK:
            s.write_wants_read = False
            sent = 0
        except (OSError, ssl.SSLError):
            self.phase.send_failed(s.state.name, now)
            return
        else:
            s.write_wants_read = False
        self.phase.sent(s.state.name, sent, now)

    def _carry_out(self, actions: list[tuple[Any, ...]], now: float) -> None:
        """Carry out the phase's actions in order (a send's result may add more), then watch each
        socket for what the phase now wants."""
        i = 0
        try:
            while i < len(actions):
                action = actions[i]
                i += 1
                tag = action[0]
                if tag is rp.SEND:
                    s = self.client if action[1] is rp.CLIENT else self.backend
                    if not s.closed:
                        self._send(s, action[2], now)
                elif tag is rp.PIPE:
                    s = self.client if action[1] is rp.CLIENT else self.backend
                    if not s.closed:
                        self._pipe_out(s, now)
                elif tag is rp.CLOSE:
                    self._close(self.client if action[1] is rp.CLIENT else self.backend)
                elif tag is rp.SHUT:
                    self._shut(self.client if action[1] is rp.CLIENT else self.backend)
                elif tag is rp.ARM:
                    self._arm(action[1], action[2], action[3])
                elif tag is rp.CANCEL:
                    self._timers.cancel(self._timer_entries.pop((action[1], action[2]), None))
                elif tag is rp.REPORT:
                    self._report(action[1], action[2], action[3])
                elif tag is rp.LATER:
                    self._reactor.soon(self.settle, self)
                elif tag is rp.END:
                    self._finish()
                    return
        finally:
            actions.clear()
        self._aim(self.client)
        self._aim(self.backend)

    def _arm(self, kind: str, side: Side | None, when: float) -> None:
        key = (kind, side)
        self._timers.cancel(self._timer_entries.pop(key, None))

        def fire(now: float) -> None:
            self._timer_entries.pop(key, None)
            if self._done:
                return
            try:
                self._carry_out(self.phase.timer(kind, side, now), now)
            except Exception:
                self._crash()

        self._timer_entries[key] = self._timers.schedule(when, fire)

    def _report(self, what: str, side: Side, value: Any) -> None:
        if what is rp.BUFFER_FULL:
            self._metrics.backpressure_event(side, BUFFER_FULL)
        elif what is rp.STALL_ENDED:
            self._metrics.send_stall(side, value)
            if value >= SEND_STALL_SECONDS:
                self._metrics.backpressure_event(side, SEND_STALLED)
        elif what is rp.PONG_RTT:
            self._metrics.rtt(side, value)
        elif what is rp.SLOW_CONSUMER:
            log.warning("%s %s accepted nothing for %gs: closing it", side, self._peer_name(side), value)
            self._metrics.backpressure_event(side, SLOW_CONSUMER_CLOSED)
        elif what is rp.THROTTLED:
            self._on_throttled()
        elif what is rp.RATE_CLOSED:
            self._on_rate_close(value)

    def _aim(self, s: PeerSocket) -> None:
        """Watch `s` for what it now needs: readable to read (or for a TLS write that wants a
        read), writable for pending bytes (or a TLS read that wants a write)."""
        if s.closed:
            return
        reading, writing = self.phase.wants(s.state)
        mask = 0
        if reading or (s.write_wants_read and writing):
            mask |= READ
        if (writing and not s.write_wants_read) or (s.read_wants_write and reading):
            mask |= WRITE
        if reading and s.tls and not s.again and cast(ssl.SSLSocket, s.sock).pending():
            # Plaintext OpenSSL decrypted already (a record larger than one read, or read with
            # the handshake): the kernel socket may be empty, so the poller would never say so.
            s.again = True
            self._reactor.soon(lambda: self._read_again(s), self)
        if mask == s.mask:
            return
        if mask == 0:  # not even registered: a hung-up socket would report itself every round
            self._reactor.unregister(s.fd)
        elif s.mask == 0:
            self._reactor.register(s.fd, mask, self)
        else:
            self._reactor.modify(s.fd, mask)
        s.mask = mask

    def _read_again(self, s: PeerSocket) -> None:
        s.again = False
        self.on_event(s.fd, READ)

    def _shut(self, s: PeerSocket) -> None:
        """Shut the write side (a FIN after the proxy's close frame); reading goes on. TLS sends no
        close_notify here: the close frame already said it, and the socket is closed later."""
        if s.closed:
            return
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(s.sock, socket.SHUT_WR)

    def _drop_pipe(self, s: PeerSocket) -> None:
        """What is still in the pipe toward `s` will never be sent: close it."""
        if s.pipe is not None:
            pipe, s.pipe = s.pipe, None
            self._reactor.pipes.drop(pipe)

    def _close(self, s: PeerSocket) -> None:
        if s.closed:
            return
        s.closed = True
        self._drop_pipe(s)
        if s.mask:
            self._reactor.unregister(s.fd, closing=True)  # closed just below
            s.mask = 0
        sock = s.sock
        if sock.fileno() == -1:
            return
        if s.tls:  # close_notify if the socket takes it at once; never wait for the peer's
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                sock.unwrap()  # type: ignore[attr-defined]
        # No trio task waits on a relaying socket: none to tell (trio's notify_closing is a system call).
        sock.close()

    # --- the end ---------------------------------------------------------------------------

    def _crash(self) -> None:
        """A step run outside the reactor's rounds (a timer, the session's task) raised: log it
        once and count it, as the reactor does for its own calls, and end this session only."""
        log.exception("session relay failed (%s)", self._peer_name(Side.CLIENT))
        self._metrics.relay_failure()
        self.failed_by_bug = True
        self._finish()

    def _finish(self) -> None:
        """Stop watching, cancel every timer, and tell the session (which closes the sockets)."""
        if self._done:
            return
        self._done = True
        self.phase.end()
        for s in (self.client, self.backend):
            if s.mask:
                self._reactor.unregister(s.fd)
                s.mask = 0
            self._drop_pipe(s)
        for entry in self._timer_entries.values():
            self._timers.cancel(entry)
        self._timer_entries.clear()
        self._reactor.detach(self)
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            try:
                on_end(self)
            except Exception:
                log.exception("ending the session (%s) failed", self._peer_name(Side.CLIENT))
        # Let go of the session's bound methods: the session holds this link, so without this
        # an ended session would wait for the cycle collector instead of being freed at once.
        self._on_throttled = self._on_rate_close = _ignore
        self._peer_name = _no_name
