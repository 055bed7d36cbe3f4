"""The passthrough relay: frames forwarded verbatim, only their headers parsed.

The fast path of ARCHITECTURE.md "Two relay paths". Client frames reach the backend with the
client's own mask, backend frames reach the client unmasked, payloads are never reassembled,
unmasked or re-masked, and permessage-deflate (negotiated end to end) passes untouched. Only
control frames are held, whole (at most 131 bytes), because the relay must read a close's code
and reason and a pong's payload before deciding where they go. Everything else it does mirrors
`relay_inspect.InspectRelay` at the `relay.Relay` interface: close codes and reasons pass end
to end, the closing handshake completes on both hops, a protocol error answers the offending
peer with its code (1002/1007) and the other peer with 1001 (client at fault) or 1011 (backend
at fault), a message over the size limit earns its sender 1009 and the other peer 1001, and a
vanished peer gets the other side 1001/1011. One thing cannot be mirrored: if a peer vanishes
(or is abandoned) part way through a frame, the frame can never be completed on the other
stream, so the other peer is dropped without a close instead of getting 1001/1011.

The proxy's own frames (closes, heartbeat pings) are injected into a peer's stream only at a
frame boundary of what is being forwarded to it: while a forwarded frame is part way through,
they wait in a small per-hop queue and go out the moment that frame ends.
"""

from __future__ import annotations

from wsproxy.protocol.frames import (
    CLOSE,
    HEADER,
    MAX_CONTROL_PAYLOAD,
    NEED_DATA,
    PAYLOAD,
    PING,
    PONG,
    FrameParser,
    MaskKeys,
    ProtocolError,
    apply_mask,
    build_close,
    build_ping,
    parse_close,
)
from wsproxy.protocol.heartbeat import PING_MARKER
from wsproxy.protocol.relay import (
    ABNORMAL,
    GOING_AWAY,
    INTERNAL_ERROR,
    NO_MESSAGE_LIMIT,
    TOO_BIG,
    CloseRecord,
    RelayStats,
)
from wsproxy.protocol.relay_base import RelayBase
from wsproxy.protocol.sides import Side

MAX_OWN_PINGS = 4  # unanswered proxy pings remembered per hop (the schedule keeps one in flight)


class _SideState:
    """One side's peer: the parser of what it sends and what is queued for it."""

    __slots__ = (
        "ctl",
        "failed",
        "fwd",
        "mask_out",
        "out",
        "owed",
        "own_pings",
        "parser",
        "pending",
        "recv_close",
        "sent_close",
        "side",
    )

    def __init__(self, side: Side, parser: FrameParser, *, mask_out: bool) -> None:
        self.side = side
        self.parser = parser  # frames coming from this peer
        self.mask_out = mask_out  # the proxy's own frames to this peer are masked (backend)
        self.out: list[bytes | memoryview] = []  # ready for this peer, in order
        self.pending: list[bytes] | None = None  # own frames waiting for a frame boundary
        self.own_pings: list[bytes] | None = None  # the proxy's pings to this peer, unanswered
        self.ctl: bytearray | None = None  # a control frame from this peer, being collected
        self.fwd = False  # the current data frame from this peer goes to the other peer
        self.sent_close = False  # a close to this peer is queued (out or pending)
        self.recv_close = False  # this peer's valid close arrived
        self.failed = False  # stream ended or protocol error: read nothing more from it
        # Its protocol error's close (code, reason), owed until the other peer's close arrives:
        # meanwhile nothing is read from it, and what the other peer still sends reaches it.
        self.owed: tuple[int, str] | None = None

    @property
    def open(self) -> bool:
        """May data frames still be sent to this peer?"""
        return not (self.sent_close or self.recv_close or self.failed)

    @property
    def done(self) -> bool:
        if self.pending:
            return False
        return self.failed or (self.sent_close and self.recv_close)

    def take(self) -> bytes:
        out = self.out
        if not out:
            return b""
        first = out[0]
        data = first if len(out) == 1 and type(first) is bytes else b"".join(out)
        out.clear()
        return data


class PassthroughRelay(RelayBase):
    """Forward frames verbatim between client and backend; see the module docstring.

    `deflate`: the backend accepted the client's permessage-deflate offer, so RSV1 is legal on
    the first frame of a data message in both directions. `max_message_bytes`: a message whose
    wire size (compressed, if deflated) exceeds it fails its sender with 1009. `ping_marker`:
    pongs starting with it answer the proxy's own pings (`send_ping`); they are swallowed and
    handed out by `take_pongs` instead of being forwarded. `mask_keys`: where the keys of the
    proxy's own frames to the backend come from (one per process; a fresh source if not given).
    """

    __slots__ = ("_backend", "_client", "_held", "_keys", "_marker", "_pongs", "stats")
    _client: _SideState
    _backend: _SideState
    # Every read is forwarded at once: backlog() is False unless the client's allowance holds
    # some of it back (limit_client), and the relay phase asks for a backlog only then.
    may_backlog = False
    may_splice = True  # splice_run / spliced: payloads may cross outside the relay (relay_phase)

    def __init__(
        self,
        *,
        deflate: bool = False,
        max_message_bytes: int | None = None,
        ping_marker: bytes = PING_MARKER,
        mask_keys: MaskKeys | None = None,
    ) -> None:
        if not ping_marker or len(ping_marker) > MAX_CONTROL_PAYLOAD:
            raise ValueError("ping_marker must be 1 to 125 bytes")
        self._keys = mask_keys if mask_keys is not None else MaskKeys()
        self._client = _SideState(
            Side.CLIENT,
            FrameParser(masked=True, rsv1_allowed=deflate, max_message_bytes=max_message_bytes),
            mask_out=False,
        )
        self._backend = _SideState(
            Side.BACKEND,
            FrameParser(masked=False, rsv1_allowed=deflate, max_message_bytes=max_message_bytes),
            mask_out=True,
        )
        self._marker = ping_marker
        self._pongs: list[tuple[Side, bytes]] | None = None
        self.stats = RelayStats()
        # The client's allowance (limit_client): the message count at which its stream is held,
        # the bytes it may still use (None: no limit), and what was held back (one read at most).
        self._msg_stop = NO_MESSAGE_LIMIT
        self._byte_left: int | None = None
        self._held = b""

    # --- the Relay contract ---------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """A closing handshake started (or a hop failed): the session's close timeout runs."""
        c, b = self._client, self._backend
        return c.sent_close or c.recv_close or c.failed or b.sent_close or b.recv_close or b.failed

    def held(self, side: Side) -> int:
        return len(self._held) if side == Side.CLIENT else 0

    def _feed_within(self, data: bytes) -> None:
        """feed_client under an allowance: act on what it allows, hold the rest."""
        c = self._client
        if not data:
            self._held = b""
            self._feed(c, self._backend, data)
            return
        if self._held or self._spent():
            self._held += data  # (the phase reads no more while it holds some: order is kept anyway)
            return
        left = self._byte_left
        rest = b""
        if left is not None and len(data) > left:
            data, rest = data[:left], data[left:]
        self._feed(c, self._backend, data)  # may hold the part after the last allowed message
        if left is not None:
            self._byte_left = left - (len(data) - len(self._held))
        if rest and not c.failed:
            self._held += rest

    def close(self, *, client_code: int, backend_code: int, reason: str) -> None:
        """The proxy's own close to each peer still open (at its next frame boundary)."""
        c, b = self._client, self._backend
        if c.open or b.open:
            self.stats.closed_by("proxy")
            if self.stats.proxy_close is None:
                self.stats.proxy_close = CloseRecord(client_code, reason)
        if c.open and not self._pay_owed(c):
            self._send_close(c, client_code, reason)
        if b.open and not self._pay_owed(b):
            self._send_close(b, backend_code, reason)

    def abandon(self, side: Side, *, other_code: int, reason: str) -> None:
        """Give up on a dead or stuck peer: nothing more to or from it; the other gets a close.

        If the abandoned peer's frame was part way through to the other peer, that stream can
        carry no valid frame any more, so the other peer is dropped too (no close possible).
        """
        src = self._state(side)
        dst = self._backend if src is self._client else self._client
        if src.done:
            return
        cut = self._stop(src, dst)
        src.out.clear()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(other_code, reason)
        if cut:
            dst.failed = True
            dst.pending = None
            return
        self._close_other(dst, other_code, reason)

    def close_slow(self, side: Side, *, code: int, other_code: int, reason: str, finish_limit: int) -> bool:
        """`side` takes nothing: finish the frame in flight to it, then close it (relay.Relay)."""
        dst = self._state(side)
        src = self._backend if dst is self._client else self._client
        if dst.done:
            return False
        if not dst.open or (src.fwd and src.parser.remaining > finish_limit):
            self.abandon(side, other_code=other_code, reason=reason)
            return False
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(code, reason)
        self._send_close(dst, code, reason)  # waits for the end of the frame in flight, if any
        self._close_other(src, other_code, reason)
        return True

    def close_received(self, side: Side) -> bool:
        return self._state(side).recv_close

    def send_ping(self, side: Side, payload: bytes) -> bool:
        """Queue the proxy's own ping to `side`; False if that peer is closing.

        Its payload is remembered (the last MAX_OWN_PINGS per hop), so the pong it earns is
        swallowed instead of reaching the other peer, which never sent that ping. Give it the
        ping marker as prefix: only pongs carrying the marker are checked against our pings.
        """
        hop = self._state(side)
        frame = build_ping(payload, mask=hop.mask_out, keys=self._keys)
        if not hop.open:
            return False
        self._emit_own(hop, frame)
        if hop.own_pings is None:
            hop.own_pings = [payload]
        else:
            hop.own_pings.append(payload)
            del hop.own_pings[:-MAX_OWN_PINGS]
        return True

    def ping_waiting(self, side: Side) -> bool:
        """Is a proxy ping to `side` still held behind a forwarded frame (not yet sendable)?

        A peer cannot answer a ping it has not been sent: the heartbeat should start that
        ping's timeout only once this turns False. (InspectRelay never holds one.)
        """
        pending = self._state(side).pending
        return pending is not None and any(f[0] & 0x0F == PING for f in pending)

    def backlog(self, side: Side) -> bool:
        """Only the client's held input (limit_client), once the allowance lets some through."""
        return side == Side.CLIENT and bool(self._held) and not self._client.failed and not self._spent()

    def resume(self, side: Side) -> None:
        if side == Side.CLIENT and self._held:
            data, self._held = self._held, b""
            self._feed_within(data)

    def splice_run(self, side: Side, least: int) -> int:
        """Bytes `side` sends next that go to the other peer verbatim, unseen: the rest of the
        payload of a data frame of at least `least` bytes being forwarded (0: none, or the relay
        must see them: a control frame being collected, a peer closing or failed, the client's
        input under an allowance). The driver may move up to that many outside the relay (a
        kernel pipe) and say so with `spliced`."""
        src = self._state(side)
        if not src.fwd or src.failed or src.recv_close or src.owed is not None or src.ctl is not None:
            return 0
        if src is self._client and (self._held or self._byte_left is not None or self._msg_stop != NO_MESSAGE_LIMIT):
            return 0
        p = src.parser
        return p.remaining if p.length >= least else 0

    def frame_length(self, side: Side) -> int:
        """Payload length of the last data frame whose header came from `side` (0: none yet), and
        0 while `side` is part way through a frame or a header (not at a frame boundary)."""
        p = self._state(side).parser
        return p.length if p.opcode < 8 and not p.remaining and not p.in_header else 0

    def spliced(self, side: Side, n: int) -> None:
        """`n` bytes of `splice_run(side)` went to the other peer outside the relay: account for
        them as if fed (bytes in, a data frame part, the frame's end and its message)."""
        src = self._state(side)
        p = src.parser
        if not 0 < n <= p.remaining or not src.fwd:
            raise ValueError(f"spliced {n} bytes of a run of {p.remaining if src.fwd else 0}")
        if src is self._client:
            self.stats.client_bytes_in += n
            dst = self._backend
        else:
            self.stats.backend_bytes_in += n
            dst = self._client
        p.remaining -= n  # (FrameParser: a reader may take payload itself and lower `remaining`)
        self.stats.data_frames += 1
        if not p.remaining:
            self._frame_ended(src, dst)

    def take_pongs(self) -> list[tuple[Side, bytes]]:
        """(side, payload) of every pong that answered one of the proxy's pings since the last
        call; those were swallowed, every other pong passed end to end."""
        pongs = self._pongs
        if not pongs:
            return []
        self._pongs = None
        return pongs

    # --- internals ------------------------------------------------------------------------

    def _state(self, side: Side) -> _SideState:
        if side == Side.CLIENT:
            return self._client
        if side == Side.BACKEND:
            return self._backend
        raise ValueError(f"unknown side {side!r}")

    def _emit_own(self, hop: _SideState, frame: bytes) -> None:
        """Queue a frame the proxy made; it waits while a forwarded frame is part way through."""
        feeder = self._backend if hop is self._client else self._client
        if feeder.fwd and feeder.parser.remaining:
            if hop.pending is None:
                hop.pending = [frame]
            else:
                hop.pending.append(frame)
        else:
            hop.out.append(frame)

    def _send_close(self, hop: _SideState, code: int | None, reason: str) -> None:
        """The proxy's own close to `hop`, if it may still be sent one."""
        if hop.failed or hop.sent_close:
            return
        self._emit_own(hop, build_close(code, reason, mask=hop.mask_out, keys=self._keys))
        hop.sent_close = True

    def _feed(self, src: _SideState, dst: _SideState, data: bytes) -> None:
        if src.failed or src.owed is not None or (src.sent_close and src.recv_close):
            if not data:  # its stream ended: it hears why now (it may still read)
                self._pay_owed(src)
            return  # after a close or a failure, nothing more from this peer is acted on
        if not data:
            self._peer_lost(src, dst)
            return
        if src.recv_close:
            return  # bytes after a peer's close frame mean nothing
        p = src.parser
        n = len(data)
        if type(data) is not bytes:
            data = bytes(data)  # out keeps slices of it until taken: it must not change
        if p.remaining > n and src.ctl is None:
            # Hot path: the whole chunk is payload of a frame that does not end here.
            p.next_event(data, 0)
            self.stats.data_frames += 1
            if src.fwd:
                dst.out.append(data)
            return
        stats = self.stats
        mv = memoryview(data)
        out = dst.out
        run = -1  # data[run:pos] is forwarded and not yet appended to out
        pos = 0
        while pos < n:
            kind, end = p.next_event(data, pos)
            if kind == PAYLOAD:
                ctl = src.ctl
                if ctl is not None:
                    ctl += mv[pos:end]
                    pos = end
                    if not p.remaining:
                        src.ctl = None
                        if not self._control(src, dst, ctl):
                            return
                    continue
                stats.data_frames += 1
                if src.fwd and run < 0:
                    run = pos
                pos = end
            elif kind == HEADER:
                if p.opcode >= 8:
                    if run >= 0:
                        out.append(mv[run:pos])
                        run = -1
                    src.fwd = False
                    ctl = bytearray(p.prefix)
                    ctl += mv[pos:end]
                    pos = end
                    if p.remaining:
                        src.ctl = ctl
                    elif not self._control(src, dst, ctl):
                        return
                    continue
                stats.data_frames += 1
                src.fwd = fwd = dst.open
                if fwd:
                    if p.prefix:
                        out.append(p.prefix)  # only ever at pos 0, with no run open
                    if run < 0:
                        run = pos
                elif run >= 0:
                    out.append(mv[run:pos])
                    run = -1
                pos = end
            elif kind == NEED_DATA:
                break  # a split header is held by the parser, not forwarded yet
            else:  # ERROR: always at a frame boundary, before the bad header went anywhere
                if run >= 0:
                    out.append(mv[run:pos])
                self._protocol_error(src, dst, p.error_code, p.error_reason)
                return
            if not p.remaining and src.fwd:
                # A forwarded data frame just ended: count it, let waiting own frames out.
                if dst.pending and run >= 0:
                    out.append(mv[run:pos])
                    run = -1
                if self._frame_ended(src, dst):
                    if run >= 0:
                        out.append(mv[run:pos])
                    if pos < n:
                        self._held = data[pos:]  # the rest waits for the next allowance
                    return
        if run >= 0:
            out.append(data if run == 0 and pos == n else mv[run:pos])

    def _frame_ended(self, src: _SideState, dst: _SideState) -> bool:
        """A data frame forwarded from `src` just ended: count its message, let the own frames
        waiting for dst's frame boundary out. True if the client's message allowance is used up."""
        hold = False
        if src.parser.fin:
            stats = self.stats
            if dst is self._client:
                stats.messages_to_client += 1
            else:
                stats.messages_to_backend += 1
                hold = stats.messages_to_backend >= self._msg_stop
        if dst.pending:
            dst.out.extend(dst.pending)
            dst.pending = None
        return hold

    def _control(self, src: _SideState, dst: _SideState, frame: bytearray) -> bool:
        """Act on a complete control frame from `src`; False once `src` must not be read on."""
        p = src.parser
        op = p.opcode
        if op == PING:
            if dst.open:
                dst.out.append(bytes(frame))  # src is at a boundary, so is dst's stream
            return True
        payload = bytes(frame[len(frame) - p.length :])
        if p.mask is not None:
            payload = apply_mask(payload, p.mask)
        if op == PONG:
            own = src.own_pings
            if own and payload.startswith(self._marker) and payload in own:
                own.remove(payload)
                if not own:
                    src.own_pings = None
                if self._pongs is None:
                    self._pongs = []
                self._pongs.append((src.side, payload))
            elif dst.open:
                dst.out.append(bytes(frame))
            return True
        assert op == CLOSE
        try:
            code, reason = parse_close(payload)
        except ProtocolError as exc:
            self._protocol_error(src, dst, exc.code, exc.reason)
            return False
        self._peer_close(src, dst, code, reason, bytes(frame))
        return False

    def _peer_close(self, src: _SideState, dst: _SideState, code: int | None, reason: str, frame: bytes) -> None:
        self.stats.peer_closed(src.side, code, reason)
        src.recv_close = True
        if self._pay_owed(dst):
            return  # the other peer's replies are all through: now it hears of its error
        if not src.sent_close:
            # The peer started closing: pass its close on verbatim; its answer comes back when
            # the other side answers. If the other side cannot answer any more, answer it here.
            if dst.open:
                self._emit_own(dst, frame)
                dst.sent_close = True
            else:  # defensive, as in InspectRelay: no path leaves dst closed and src not told
                self._send_close(src, code, reason)
        elif dst.recv_close and not dst.sent_close and not dst.failed:
            # The peer answered a close we forwarded to it: complete the other hop with it.
            self._emit_own(dst, frame)
            dst.sent_close = True

    def _protocol_error(self, src: _SideState, dst: _SideState, code: int, reason: str) -> None:
        """Fail `src` with `code`; the other peer hears why. Always at a frame boundary of src.

        The other peer hears first: what it still sends (replies to src's valid messages,
        already on their way) reaches src until its close arrives; then src gets its close
        (`owed`). The close timeout bounds the wait."""
        src.ctl = None
        src.fwd = False
        self.stats.closed_by("proxy")
        if code == TOO_BIG:
            # A limit, not a fault of either implementation: the other side is going away
            # either way (as InspectRelay says it).
            other_code, why = GOING_AWAY, f"{src.side} sent a {reason}"
            self.stats.proxy_close = CloseRecord(code, why)
        else:
            self.stats.proxy_close = CloseRecord(code, f"{src.side} protocol error: {reason}")
            if src is self._client:
                other_code, why = GOING_AWAY, "client protocol error"
            else:
                other_code, why = INTERNAL_ERROR, "backend protocol error"
        if src.open and dst.open:
            src.owed = (code, reason)
            self._send_close(dst, other_code, why)
            return
        self._send_close(src, code, reason)
        src.failed = True
        self._close_other(dst, other_code, why)

    def _peer_lost(self, src: _SideState, dst: _SideState) -> None:
        """The peer's stream ended. Without a finished closing handshake, it vanished."""
        cut = self._stop(src, dst)
        if self.stats.client_close is None and src is self._client:
            self.stats.client_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by(Side.CLIENT)
        elif self.stats.backend_close is None and src is self._backend:
            self.stats.backend_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by(Side.BACKEND)
            if self.stats.proxy_close is None and self.stats.client_close is None:
                # The client's 1011 is the proxy's word, not the client's: an alert on the
                # proxy's closes must see a backend that crashed.
                self.stats.proxy_close = CloseRecord(INTERNAL_ERROR, "backend connection lost")
        if cut:
            # dst holds the start of a frame that can never be completed: no valid frame can
            # follow it on that stream, so dst cannot get a close; drop the connection.
            dst.failed = True
            dst.pending = None
            return
        if src is self._client:
            self._close_other(dst, GOING_AWAY, "client went away")
        else:
            self._close_other(dst, INTERNAL_ERROR, "backend connection lost")

    def _stop(self, src: _SideState, dst: _SideState) -> bool:
        """Read nothing more from `src`, send it nothing more; True if its frame to dst was cut."""
        cut = src.fwd and src.parser.remaining > 0
        if src is self._client:
            self._held = b""
        src.failed = True
        src.ctl = None
        src.fwd = False
        src.pending = None
        src.own_pings = None
        dst.fwd = False  # the rest of a frame dst is sending has nowhere to go
        return cut

    def _close_other(self, dst: _SideState, code: int, reason: str) -> None:
        if self._pay_owed(dst) or dst.failed or dst.sent_close:
            return
        if not dst.recv_close:
            self._send_close(dst, code, reason)
        else:
            # The other peer was waiting for an answer to its close: give it its own code back.
            rec = self.stats.client_close if dst is self._client else self.stats.backend_close
            self._send_close(dst, rec.code if rec else code, rec.reason if rec else reason)
