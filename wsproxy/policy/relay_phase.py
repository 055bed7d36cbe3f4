"""The relay phase's decisions, sans I/O: what to send, when to stop reading, what to close, when.

A session's relay (relay_passthrough / relay_inspect) turns bytes into bytes; around it sit the
decisions that make a relay a good citizen of the proxy, and they are all here, as pure code that
takes events and returns actions, so they can be tested with plain values and no sockets:

- backpressure: a peer is not read while what it sent before still waits for the other one, so
  each side has one pending buffer, bounded by one read plus the proxy's own control frames. The
  buffer in flight is kept exactly as it was given to the last send (a TLS write that OpenSSL
  answered with want-read/want-write must be retried with the same buffer); what the relay
  queues meanwhile waits behind it;
- the slow consumer: a side that took nothing of its pending bytes for `slow_consumer_timeout`
  is closed with 1008 after the frame in flight (what was pending goes first, nothing more is
  relayed to it), and the other peer is told why (1001);
- the lingering close: a side the proxy ends on an error (or drops as slow) before its close
  arrived has its write side shut once the close frame is out, and is read and discarded until
  it ends or the close timer fires, so its peer reads the close instead of a reset;
- rate-limit pauses: the relay acts on the client's input only as far as its message/byte
  budget (FlowLimiter) allows, whole messages at a time; the rest of that read is held (in the
  relay, one read at most) and the client is not read until the budget allows again; a client
  held for `close_after` is closed with 1008;
- the close timer: once a closing handshake started, the session ends at `close_timeout` at the
  latest;
- heartbeat accounting: what each read carried (traffic from a peer, data frames, the proxy's own
  pongs) goes to the heartbeat schedule;
- splicing (passthrough, plain sockets, `splice_min_bytes` set): the rest of a large data frame's
  payload may cross from one socket to the other through a kernel pipe, never read into Python.
  The phase says how much (`splice_size`, asked instead of reading), the driver moves it into the
  pipe (`spliced`) and out of it (`PIPE` action, `piped_sent`); bytes in the pipe are pending
  bytes like `out` (backpressure, the slow consumer, the lingering close wait for them), and what
  the relay queues meanwhile waits behind them. After a large frame, a peer's next read takes
  only a frame head (`read_size`), so the next large payload is spliced from its first byte.

Events are the methods (`start`, `received`, `sent`, `send_failed`, `timer`, `settle`), each
with `now`; each returns the list of actions to carry out in order (tuples, tag first: `SEND`,
`CLOSE`, `ARM`, `CANCEL`, `REPORT`, `LATER`, `END`, `PIPE`). What to watch a socket for is a query
(`wants`), asked by the driver once after it carried out a batch of actions, so a burst of
events costs one change of the poller's registration. The driver (runtime/link.py) owns the
sockets, TLS and the timers, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from wsproxy.config import defaults
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.protocol.frames import MAX_HEADER
from wsproxy.protocol.heartbeat import Schedule
from wsproxy.protocol.relay import GOING_AWAY, POLICY_VIOLATION, Relay, SplicingRelay
from wsproxy.protocol.sides import Side

CLIENT, BACKEND = Side.CLIENT, Side.BACKEND
SETTLE_ROUNDS = 16  # relay steps per event before the rest is asked for in a later round (LATER)

# Actions: (tag, ...) tuples, carried out in order.
SEND = "send"  # (SEND, side, data): write data to side's socket, then report `sent` or `send_failed`
CLOSE = "close"  # (CLOSE, side): close that side's socket now (its pending bytes are out or dropped)
SHUT = "shut"  # (SHUT, side): shut that socket's write side (all sent); keep reading it (and discarding)
ARM = "arm"  # (ARM, timer, side, when): call `timer(timer, side, now)` at `when` (replaces one armed)
CANCEL = "cancel"  # (CANCEL, timer, side): forget that timer
REPORT = "report"  # (REPORT, what, side, value): for metrics and logs; changes nothing here
LATER = "later"  # (LATER,): call `settle` again in a coming round (a long backlog, split to be fair)
END = "end"  # (END,): the relay phase is over: close what is open, release the session
PIPE = "pipe"  # (PIPE, side): send what the pipe toward side holds, then report `piped_sent` or `send_failed`

# Timers (the `timer` of ARM, CANCEL and the `timer` event).
CLOSE_TIMER = "close"  # side None: the closing handshake ran out of time
STALL_TIMER = "stall"  # per side: the slow-consumer deadline
THROTTLE_TIMER = "throttle"  # side "client": the rate-limit pause is over

# Reports (the `what` of REPORT).
BUFFER_FULL = "buffer_full"  # side: the relay's output queue toward `side` is full (reading paused)
STALL_ENDED = "stall_ended"  # side, seconds: pending bytes toward `side` waited this long, now sent
SLOW_CONSUMER = "slow_consumer"  # side, seconds: `side` took nothing that long: dropped
THROTTLED = "throttled"  # client: newly over its message/byte budget (reading paused)
RATE_CLOSED = "rate_closed"  # client, seconds: over its budget for close_after: closing with 1008
PONG_RTT = "pong_rtt"  # leg, seconds: a round trip of the proxy's own ping


class SideState:
    """What the relay phase knows about one peer (read by the driver, changed only here)."""

    __slots__ = (
        "closed",
        "eof",
        "finishing",
        "large",
        "lingering",
        "more",
        "name",
        "out",
        "piped",
        "stall_since",
    )

    def __init__(self, name: Side) -> None:
        self.name = name
        self.out: bytes | memoryview = b""  # in flight: the rest of the last SEND, as it was given
        # queued behind `out` (only the proxy's own frames, in practice); None: nothing, no list
        self.more: list[bytes] | None = None
        self.eof = False  # the peer's stream ended (or broke): nothing more to read
        self.closed = False  # the socket is closed (CLOSE was asked): nothing more to send
        self.stall_since: float | None = None  # when a send first left bytes pending
        self.finishing = False  # dropped as a slow consumer: what is pending, then its 1008, goes out
        self.lingering = False  # write side shut after the proxy's close: read and discarded till it ends
        self.piped = 0  # bytes in the kernel pipe toward this peer (spliced, not sent yet): before `out`
        self.large = False  # its last data frame was large: read the next frame's head alone


class RelayPhase:
    """One session's relay phase: the relay plus every decision around it (see the module)."""

    __slots__ = (
        "_close_armed",
        "_finish_limit",
        "_later",
        "_may_backlog",
        "_rounds",
        "_slow_limit",
        "_splicer",
        "_throttled",
        "actions",
        "backend",
        "client",
        "close_timeout",
        "done",
        "flow",
        "relay",
        "schedule",
        "splice_min",
    )

    def __init__(
        self,
        relay: Relay,
        *,
        close_timeout: float,
        slow_consumer_timeout: float | None = None,
        flow: FlowLimiter | None = None,
        schedule: Schedule | None = None,
        finish_limit: int = defaults.BUFFER_BYTES,
        splice_min_bytes: int | None = None,
    ) -> None:
        self.relay = relay
        # payloads of at least this many bytes may be spliced (None: never; only a relay that says
        # `may_splice` can account for bytes it never saw)
        may_splice = getattr(relay, "may_splice", False)
        self.splice_min = splice_min_bytes if may_splice else None
        self._splicer = cast(SplicingRelay, relay) if may_splice else None
        self._finish_limit = finish_limit  # bytes a slow consumer's frame in flight may still need
        # (the relay's feed and take methods are looked up per call: bound once, they were four
        # objects per idle session)
        self.client = SideState(CLIENT)
        self.backend = SideState(BACKEND)
        self.close_timeout = close_timeout
        self._slow_limit = slow_consumer_timeout
        self.flow = flow
        self.schedule = schedule  # heartbeat.Schedule (None: nothing timed), told what each read carried
        self._may_backlog = getattr(relay, "may_backlog", True)  # passthrough never keeps a backlog
        if flow is not None and flow.active:
            self._may_backlog = True  # ... unless the rate limit holds some of the client's input
        else:
            self.flow = None
        self._throttled = False
        self._close_armed = False
        self._rounds = 0  # relay steps since the last event from outside (bounded by SETTLE_ROUNDS)
        self._later = False  # a LATER is outstanding
        self.done = False
        self.actions: list[tuple[Any, ...]] = []  # one list, reused: the driver clears it once done

    # --- queries ----------------------------------------------------------------------------

    def side(self, name: Side) -> SideState:
        return self.client if name == CLIENT else self.backend

    def may_read(self, s: SideState) -> bool:
        """Read this peer now? Not once it ended, not while what it sent before still waits for
        the other peer (backpressure), not while the relay holds a backlog of it, not while it is
        over its rate (the client)."""
        if s.eof or s.closed or self.done:
            return False
        if s.lingering:
            return True  # read and discarded until it ends
        other = self.backend if s is self.client else self.client
        if (other.out or other.piped) and not other.finishing:  # (a slow consumer's frame only grows by its rest)
            return False
        if self._may_backlog and self.relay.backlog(s.name):
            return False  # inflated input waits until the other peer took some
        return not (self._throttled and s is self.client)

    def wants(self, s: SideState) -> tuple[bool, bool]:
        """(read, write): what the driver should watch this side's socket for."""
        if s.closed or self.done:
            return False, False
        return self.may_read(s), bool(s.out) or s.piped > 0

    def read_size(self, s: SideState, size: int) -> int:
        """How much to read from this peer (when `may_read`): `size`, or only a frame's head when
        its last data frame was large enough to splice, so that the next one's payload is not
        read into Python with its head."""
        if s.large and not s.lingering and self.splice_min is not None:
            return MAX_HEADER
        return size

    def splice_size(self, s: SideState) -> int:
        """Bytes of this peer's input that may cross to the other peer through a kernel pipe now,
        instead of a read (when `may_read`): the rest of a forwarded data frame's payload, at
        most `finish_limit` (one read's worth), of a frame of at least `splice_min_bytes` (0: read)."""
        least, splicer = self.splice_min, self._splicer
        if least is None or splicer is None or s.lingering or (s is self.client and self.flow is not None):
            return 0
        other = self.backend if s is self.client else self.client
        if other.out or other.more or other.piped or other.closed or other.finishing or other.lingering:
            return 0
        run = splicer.splice_run(s.name, least)
        return min(run, self._finish_limit)

    # --- events -----------------------------------------------------------------------------

    def start(self, client_trailing: bytes, backend_trailing: bytes, now: float) -> list[tuple[Any, ...]]:
        """The relay phase begins with what each peer sent past its handshake."""
        self._rounds = 0
        if client_trailing:
            if self.flow is not None:
                self._client_step(self.relay.feed_client, client_trailing, now, fresh=True)
            else:
                self._step(self.relay.feed_client, client_trailing, now, CLIENT)
        if backend_trailing:
            self._step(self.relay.feed_backend, backend_trailing, now, BACKEND)
        self._settle(now)
        return self.actions

    def received(self, name: Side, data: bytes, now: float) -> list[tuple[Any, ...]]:
        """A read of peer `name` gave `data`; b"": its stream ended (or broke)."""
        s = self.client if name == CLIENT else self.backend
        if self.done or s.eof:
            return self.actions
        self._rounds = 0
        if s.lingering:
            if data:
                self._feed(s, data)  # (the relay only records what it means: nothing goes anywhere now)
                return self.actions
            s.eof = True  # it ended: now the socket may close without a reset
            self._close(s)
            if self.client.closed and self.backend.closed:
                self._end()
            return self.actions
        if not data:
            s.eof = True
            self._feed(s, b"")
            self._settle(now)
            return self.actions
        relay = self.relay
        if s is self.client:
            if self.flow is not None:
                self._client_step(relay.feed_client, data, now, fresh=True)
            else:
                self._step(relay.feed_client, data, now, name)
        else:
            self._step(relay.feed_backend, data, now, name)
        splicer = self._splicer
        if splicer is not None and self.splice_min is not None and (s is self.backend or self.flow is None):
            s.large = splicer.frame_length(name) >= self.splice_min
        if self._may_backlog and relay.backlog(name):
            self.actions.append((REPORT, BUFFER_FULL, BACKEND if s is self.client else CLIENT, None))
        self._settle(now)
        return self.actions

    def sent(self, name: Side, n: int, now: float) -> list[tuple[Any, ...]]:
        """The driver's send of side `name`'s in-flight bytes took `n` of them (0: it would block;
        for TLS, all or none)."""
        s = self.client if name == CLIENT else self.backend
        if s.closed or self.done:
            return self.actions
        out = s.out
        if n < len(out):
            s.out = memoryview(out)[n:] if n else out  # unchanged: a TLS retry repeats the same buffer
            return self._stalling(s, now)
        return self._flushed(s, now)

    def spliced(self, name: Side, n: int, now: float) -> list[tuple[Any, ...]]:
        """The driver moved `n` (> 0, at most `splice_size`) bytes of peer `name`'s input into
        the pipe toward the other peer; the PIPE action sends them on."""
        s = self.client if name == CLIENT else self.backend
        if self.done or s.eof:
            return self.actions
        other = self.backend if s is self.client else self.client
        self._rounds = 0
        splicer = self._splicer
        assert splicer is not None  # only a relay that splices offers a `splice_size`
        other.piped += n
        self._step(lambda count: splicer.spliced(name, count), n, now, name)
        s.large = splicer.frame_length(name) >= (self.splice_min or 0)
        self.actions.append((PIPE, other.name))
        self._settle(now)
        return self.actions

    def piped_sent(self, name: Side, n: int, now: float) -> list[tuple[Any, ...]]:
        """The driver's send from the pipe toward `name` took `n` bytes (0: it would block)."""
        s = self.client if name == CLIENT else self.backend
        if s.closed or self.done:
            return self.actions
        s.piped -= n
        if s.piped:
            return self._stalling(s, now)
        return self._flushed(s, now)

    def _stalling(self, s: SideState, now: float) -> list[tuple[Any, ...]]:
        """A send toward `s` took less than it was given: the slow-consumer clock runs."""
        if s.stall_since is None:
            s.stall_since = now
            if self._slow_limit is not None:
                self.actions.append((ARM, STALL_TIMER, s.name, now + self._slow_limit))
        return self.actions

    def _flushed(self, s: SideState, now: float) -> list[tuple[Any, ...]]:
        """Everything in flight toward `s` (bytes, or the pipe) was taken: what queued behind it
        goes next, else the stall is over and the relay may go on."""
        if s.more:
            s.out = s.more[0] if len(s.more) == 1 else b"".join(s.more)
            s.more = None
            self.actions.append((SEND, s.name, s.out))
            return self.actions
        s.out = b""
        if s.stall_since is not None:
            self._stall_over(s, now)
        if self._may_backlog or self.relay.closing:  # (else nothing can have changed)
            self._settle(now, take=False)
        return self.actions

    def send_failed(self, name: Side, now: float) -> list[tuple[Any, ...]]:
        """A send to `name` failed: the peer is gone; the relay decides what the other hears."""
        s = self.client if name == CLIENT else self.backend
        if s.closed or self.done:
            return self.actions
        s.out = b""
        s.piped = 0
        s.more = None
        if s.stall_since is not None:
            self._stall_over(s, now)
        self._close(s)
        if not s.eof:
            s.eof = True
            self._feed(s, b"")
        self._settle(now)
        return self.actions

    def timer(self, kind: str, name: Side | None, now: float) -> list[tuple[Any, ...]]:
        """An armed timer fired."""
        if self.done:
            return self.actions
        self._rounds = 0
        if kind == CLOSE_TIMER:
            self._end()
        elif kind == STALL_TIMER:
            assert name is not None
            s = self.client if name == CLIENT else self.backend
            if (s.out or s.piped) and not s.closed and not s.finishing:
                # The peer took nothing for the limit while data waited: nothing more is relayed
                # to it but the rest of the frame in flight and a 1008 (if it reads within the
                # close timeout, it learns why); the other peer is told why.
                limit = self._slow_limit or 0.0
                self.actions.append((REPORT, SLOW_CONSUMER, name, limit))
                reason = f"{name} too slow: nothing accepted for {limit:g}s"
                s.stall_since = None
                if self.relay.close_slow(
                    Side(name),
                    code=POLICY_VIOLATION,
                    other_code=GOING_AWAY,
                    reason=reason,
                    finish_limit=self._finish_limit,
                ):
                    s.finishing = True
                else:  # its frame in flight cannot be finished: no close frame can follow, drop it
                    s.out = b""
                    s.piped = 0
                    s.more = None
                    self._close(s)
                self._settle(now)
        elif kind == THROTTLE_TIMER and self._throttled:
            self._hold_back(now, newly=False, wanted=self.relay.held(Side.CLIENT))
            self._settle(now)
        return self.actions

    def settle(self, now: float) -> list[tuple[Any, ...]]:
        """Something changed outside a read (a ping or a close the proxy queued, a LATER came
        due): take what the relay queued and decide again."""
        if self.done:
            return self.actions
        self._rounds = 0
        self._later = False
        self._settle(now)
        return self.actions

    def end(self) -> None:
        """The driver ended the session itself (a cut, the loop stopping): decide nothing more."""
        self.done = True

    # --- steps ----------------------------------------------------------------------------

    def _feed(self, s: SideState, data: bytes) -> None:
        if s is self.client:
            self.relay.feed_client(data)
        else:
            self.relay.feed_backend(data)

    def _step(self, step: Callable[[Any], None], arg: Any, now: float, read_from: Side | None = None) -> None:
        """Run one relay step and tell the heartbeat schedule what it carried: traffic from the
        peer read (if any), data frames, the proxy's own pongs."""
        schedule = self.schedule
        if schedule is None:
            step(arg)
            return
        if read_from is not None:
            schedule.saw_traffic(read_from, now)
        stats = self.relay.stats
        frames = stats.data_frames
        step(arg)
        if stats.data_frames != frames:
            schedule.saw_data(now)
        pongs = self.relay.take_pongs()
        for leg, payload in pongs:
            rtt = schedule.saw_own_pong(leg, payload, now)
            if rtt is not None:
                self.actions.append((REPORT, PONG_RTT, leg, rtt))

    def _settle(self, now: float, *, take: bool = True) -> None:
        """Queue what the relay has for each side (`take`: only after a relay step; a send's
        result cannot give the relay anything new), resume a backlog the other side has room
        for, and follow a closing handshake to its end."""
        relay = self.relay
        actions = self.actions
        if self.flow is not None and relay.closing:
            self._lift_limit()
        for s in (self.client, self.backend) if take else ():
            data = relay.take_for_client() if s is self.client else relay.take_for_backend()
            if not data or s.closed:
                continue  # (a finished side's output is dropped)
            if s.out or s.piped:  # a send in flight: never grow its buffer
                if s.more is None:
                    s.more = [data]
                else:
                    s.more.append(data)
            else:
                s.out = data
                actions.append((SEND, s.name, data))
        if self._may_backlog:
            for s, other in ((self.client, self.backend), (self.backend, self.client)):
                if relay.backlog(s.name) and not other.out:
                    if self._rounds >= SETTLE_ROUNDS:
                        if not self._later:
                            self._later = True
                            actions.append((LATER,))
                        break
                    self._rounds += 1
                    if s is self.client and self.flow is not None:
                        self._client_step(relay.resume, CLIENT, now, fresh=False)  # held by the budget
                    else:
                        self._step(relay.resume, s.name, now)  # inflated input, as far as there is room
                    self._settle(now)
                    return
        if relay.closing:  # (a side can only be done once a close or a failure started)
            if not self._close_armed:
                self._close_armed = True
                actions.append((ARM, CLOSE_TIMER, None, now + self.close_timeout))
            for s in (self.client, self.backend):
                if s.out or s.piped or s.closed or s.lingering:
                    continue
                if relay.client_done if s is self.client else relay.backend_done:
                    if s.eof or relay.close_received(Side(s.name)):
                        self._close(s)
                    else:  # closed on an error, its close not read yet: linger
                        self._linger(s)
                elif s.finishing:  # the slow consumer's 1008 is out: wait for its answer, lingering
                    self._linger(s)
            if self.client.closed and self.backend.closed:
                self._end()

    def _stall_over(self, s: SideState, now: float) -> None:
        assert s.stall_since is not None
        self.actions.append((REPORT, STALL_ENDED, s.name, now - s.stall_since))
        s.stall_since = None
        if self._slow_limit is not None:
            self.actions.append((CANCEL, STALL_TIMER, s.name))

    def _client_step(self, step: Callable[[Any], None], arg: Any, now: float, *, fresh: bool) -> None:
        """A relay step on the client's input under its budget: the relay acts on what the
        budget allows now and holds the rest; what it used is charged, and a client whose input
        is held is not read until the budget allows again (or is closed after close_after)."""
        flow = self.flow
        assert flow is not None
        relay = self.relay
        if relay.closing:
            self._lift_limit()
            self._step(step, arg, now, CLIENT if fresh else None)
            return
        messages, nbytes = flow.allowance(now)
        relay.limit_client(messages=messages, nbytes=nbytes)
        before = relay.stats.messages_to_backend
        self._step(step, arg, now, CLIENT if fresh else None)
        if relay.closing:
            self._lift_limit()
            return
        left_messages, left_bytes = relay.client_allowance()
        held = relay.held(Side.CLIENT)
        limited = held > 0 and (left_messages == 0 or left_bytes == 0)
        was_limited = flow.limited_since is not None
        used = nbytes - left_bytes if nbytes is not None and left_bytes is not None else 0
        flow.charge(now, messages=relay.stats.messages_to_backend - before, nbytes=used, held=limited, fresh=fresh)
        if limited:
            self._hold_back(now, newly=not was_limited, wanted=held)

    def _lift_limit(self) -> None:
        """A closing handshake started: what the client holds is read on (its close may be in
        it); nothing more reaches the backend as data anyway."""
        self.relay.limit_client(messages=None, nbytes=None)
        if self._throttled:
            self._throttled = False
            self.actions.append((CANCEL, THROTTLE_TIMER, CLIENT))

    def _hold_back(self, now: float, *, newly: bool, wanted: int) -> None:
        """Over its message/byte budget with `wanted` bytes held: stop reading the client until
        the budget allows some of them, or close it once it has been held for close_after."""
        flow = self.flow
        assert flow is not None
        self.actions.append((CANCEL, THROTTLE_TIMER, CLIENT))
        if newly:
            self.actions.append((REPORT, THROTTLED, CLIENT, None))
        pause = flow.pause(now, wanted=wanted)
        if pause is not None and pause > 0:
            self._throttled = True
            self.actions.append((ARM, THROTTLE_TIMER, CLIENT, now + pause))
            return
        self._throttled = False
        if pause is None:
            over = flow.close_after or 0.0
            self.actions.append((REPORT, RATE_CLOSED, CLIENT, over))
            self.relay.close(
                client_code=POLICY_VIOLATION,
                backend_code=GOING_AWAY,
                reason=f"client over its rate limit for {over:g}s",
            )
            self._lift_limit()
        else:  # the budget allows some of what is held now: a fresh allowance lets it through
            messages, nbytes = flow.allowance(now)
            self.relay.limit_client(messages=messages, nbytes=nbytes)

    def _linger(self, s: SideState) -> None:
        """Everything for `s` is out, the proxy's close last: shut the write side, then read and
        discard until the peer ends (or the close timer ends the session), so the peer reads
        that close rather than a reset caused by input the proxy left unread."""
        s.lingering = True
        self.actions.append((SHUT, s.name))
        if s.stall_since is not None and self._slow_limit is not None:
            self.actions.append((CANCEL, STALL_TIMER, s.name))
        s.stall_since = None

    def _close(self, s: SideState) -> None:
        if s.closed:
            return
        s.closed = True
        self.actions.append((CLOSE, s.name))
        if s.stall_since is not None and self._slow_limit is not None:
            self.actions.append((CANCEL, STALL_TIMER, s.name))
        s.stall_since = None

    def _end(self) -> None:
        self.done = True
        self.actions.append((END,))
