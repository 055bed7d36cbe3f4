"""The inspect relay: every frame parsed, validated, unmasked and re-framed, side by side.

Each peer's stream goes through the codec's `frames.FrameParser` (headers checked as wsproto
checks them, split anywhere); this module adds close payloads and UTF-8 in text messages (checked
incrementally, across fragments). Payloads are streamed: each piece of a data frame a read brings
is unmasked, checked and sent on at once as a frame of its own (masked with a key from the relay's
`MaskKeys` towards the backend), so a message is never held whole; its boundaries, opcode and
order are kept, only its fragmentation may differ. A frame from the backend that arrives whole
and needs no change goes to the client as it came. Each side has its own permessage-deflate
(`deflate.HopDeflate`); compressed input is inflated only while the other peer's queue is under
`buffer_bytes` (the compression-bomb guard), the rest waits as backlog (`backlog()`/`resume()`).

Pings and pongs pass end to end (pongs answering the proxy's own pings are swallowed and handed
out by `take_pongs`); close codes and reasons pass end to end, and the closing handshake completes
on both sides. A protocol error answers the offending peer with its RFC code (1002, or 1007 for
bad UTF-8 or bad compressed data) and the other peer with 1001 (client at fault) or 1011 (backend
at fault); a message over `max_message_bytes` earns its sender 1009 and the other peer 1001 (an
uncompressed one from the header of the frame that crosses the limit, before any of that frame
goes on; a compressed one as it inflates). The close codes and reasons and the closing states are
the ones the earlier wsproto-based relay produced (a parity test holds them to wsproto).
"""

from __future__ import annotations

import codecs

from wsproto.extensions import Extension, PerMessageDeflate

from wsproxy.config import defaults
from wsproxy.protocol.deflate import HopDeflate, negotiated_deflate
from wsproxy.protocol.frames import (
    ERROR,
    HEADER,
    NO_LIMIT,
    PING,
    PONG,
    TEXT,
    FrameParser,
    MaskKeys,
    ProtocolError,
    apply_mask,
    close_payload,
    encode_frame,
    frame_head,
    key_at,
    parse_close,
    remask,
)
from wsproxy.protocol.heartbeat import PING_MARKER
from wsproxy.protocol.relay import (
    ABNORMAL,
    GOING_AWAY,
    INTERNAL_ERROR,
    INVALID_DATA,
    NO_MESSAGE_LIMIT,
    TOO_BIG,
    CloseRecord,
    RelayStats,
)
from wsproxy.protocol.relay_base import RelayBase
from wsproxy.protocol.sides import Side

MAX_OWN_PINGS = 4  # unanswered proxy pings remembered per side (the schedule keeps one in flight)

# A side's closing state, as RFC 6455 section 7 (and wsproto) name them.
OPEN = 0
REMOTE_CLOSING = 1  # the peer's close arrived, ours has not gone out yet
LOCAL_CLOSING = 2  # our close went out, the peer's has not arrived yet
CLOSED = 3

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class _SideState:
    """One side's peer: the parser of what it sends, its message in progress, what is queued for it."""

    __slots__ = (
        *("deflate", "failed", "mask_out", "out", "owed", "own_pings", "side", "state"),  # the connection
        *("compressed", "ctl", "inbox", "inflated", "out_op", "parser", "utf8"),  # its stream, part way
    )

    def __init__(self, side: Side, *, negotiated: PerMessageDeflate | None) -> None:
        client = side == Side.CLIENT
        self.side = side
        self.state = OPEN
        self.failed = False  # stream ended, protocol error or abandoned: read nothing more from it
        # Its protocol error's close (code, reason), owed until the other peer's close arrives:
        # meanwhile nothing is read from it, and what the other peer still sends reaches it.
        self.owed: tuple[int, str] | None = None
        self.out: list[bytes] = []  # whole frames ready for this peer, in order
        self.own_pings: list[bytes] = []  # payloads of the proxy's pings to this peer, unanswered
        self.mask_out = not client  # frames to a backend are masked (we are its client)
        # permessage-deflate with this peer; we are the client's server and the backend's client.
        self.deflate = HopDeflate(negotiated, client=client) if negotiated is not None else None
        # The stream from this peer (frames from a client are masked), part way through.
        self.parser = FrameParser(masked=client, rsv1_allowed=self.deflate is not None)
        self.inbox = bytearray()  # read but not parsed yet: the backlog (compressed input only)
        self.ctl: bytearray | None = None  # a control frame's payload, collected across reads
        self.compressed = False  # the data message in progress is compressed
        self.inflated = 0  # its size so far, inflated
        self.out_op = 0  # opcode of the next frame of it sent on (0 once its first frame went)
        self.utf8: codecs.IncrementalDecoder | None = None  # a text message's UTF-8 check, once not ASCII

    @property
    def done(self) -> bool:
        return self.failed or self.state == CLOSED

    def stop(self) -> None:
        """Read nothing more of this peer's stream."""
        self.inbox.clear()
        self.ctl = None
        self.utf8 = None
        if self.deflate is not None:
            self.deflate.stop_inflating()

    def take(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data


class InspectRelay(RelayBase):
    """Parse, check and re-frame both sides; see the module docstring for the rules.

    `mask_keys`: where the keys of the frames to the backend come from (one per process; a fresh
    source if not given).
    """

    __slots__ = (
        "_backend",
        "_buffer",
        "_client",
        "_keys",
        "_marker",
        "_max_message",
        "_pongs",
        "may_backlog",
        "stats",
    )
    _client: _SideState
    _backend: _SideState

    def __init__(
        self,
        *,
        client_extensions: list[Extension] | None = None,
        backend_extensions: list[Extension] | None = None,
        max_message_bytes: int | None = None,
        buffer_bytes: int = defaults.BUFFER_BYTES,
        ping_marker: bytes = PING_MARKER,
        mask_keys: MaskKeys | None = None,
    ) -> None:
        self._client = _SideState(Side.CLIENT, negotiated=negotiated_deflate(client_extensions))
        self._backend = _SideState(Side.BACKEND, negotiated=negotiated_deflate(backend_extensions))
        self._keys = mask_keys if mask_keys is not None else MaskKeys()
        self._buffer = buffer_bytes
        self._max_message = max_message_bytes if max_message_bytes is not None else NO_LIMIT
        self._marker = ping_marker
        self._pongs: list[tuple[Side, bytes]] = []
        self.stats = RelayStats()
        # Only inflating compressed input can leave a backlog (relay.Relay.backlog).
        self.may_backlog = self._client.deflate is not None or self._backend.deflate is not None
        # The client's allowance: the message count at which its stream is held, and the bytes it
        # may still use (None: no limit); what is held waits in its inbox.
        self._msg_stop = NO_MESSAGE_LIMIT
        self._byte_left: int | None = None

    # --- the Relay contract ---------------------------------------------------------------

    @property
    def closing(self) -> bool:
        c, b = self._client, self._backend
        return c.state != OPEN or b.state != OPEN or c.failed or b.failed

    def held(self, side: Side) -> int:
        return len(self._client.inbox if side == Side.CLIENT else self._backend.inbox)

    def _feed_within(self, data: bytes) -> None:
        """feed_client under an allowance: act on what it allows, hold the rest in the inbox."""
        c = self._client
        if not data or c.inbox or self._spent():
            if data:
                c.inbox += data  # (the phase reads no more while some is held: order is kept anyway)
            else:
                self._feed(c, self._backend, data)
            return
        left = self._byte_left
        rest = b""
        if left is not None and len(data) > left:
            data, rest = data[:left], data[left:]
        self._feed(c, self._backend, data)  # may hold what follows the last allowed message
        if left is not None:
            self._byte_left = left - (len(data) - len(c.inbox))
        if rest and not c.failed and c.state == OPEN:
            c.inbox += rest

    def backlog(self, side: Side) -> bool:
        if side == Side.CLIENT:
            src = self._client
            if self._spent():
                return False  # held by the allowance until a new one comes
        else:
            src = self._backend
        return bool(src.inbox) and not src.failed and src.state != CLOSED

    def resume(self, side: Side) -> None:
        if side == Side.CLIENT:
            c = self._client
            if (self._byte_left is None and self._msg_stop == NO_MESSAGE_LIMIT) or not c.inbox:
                self._drain(c, self._backend)
            else:
                data = bytes(c.inbox)
                c.inbox.clear()
                self._feed_within(data)
        else:
            self._drain(self._backend, self._client)

    def close(self, *, client_code: int, backend_code: int, reason: str) -> None:
        c, b = self._client, self._backend
        if c.state == OPEN or b.state == OPEN:
            self.stats.closed_by("proxy")
            if self.stats.proxy_close is None:
                self.stats.proxy_close = CloseRecord(client_code, reason)
        if c.state == OPEN and not self._pay_owed(c):
            self._send_close(c, client_code, reason)
        if b.state == OPEN and not self._pay_owed(b):
            self._send_close(b, backend_code, reason)

    def abandon(self, side: Side, *, other_code: int, reason: str) -> None:
        src, dst = (self._client, self._backend) if side == Side.CLIENT else (self._backend, self._client)
        if src.done:
            return
        src.failed = True
        src.stop()
        src.out.clear()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(other_code, reason)
        self._close_other(dst, other_code, reason)

    def close_slow(self, side: Side, *, code: int, other_code: int, reason: str, finish_limit: int) -> bool:
        """`side` takes nothing: close it after what is queued (every frame queued is whole)."""
        dst, src = (self._client, self._backend) if side == Side.CLIENT else (self._backend, self._client)
        if dst.done:
            return False
        if dst.state != OPEN:
            self.abandon(side, other_code=other_code, reason=reason)
            return False
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(code, reason)
        self._send_close(dst, code, reason)
        self._close_other(src, other_code, reason)
        return True

    def close_received(self, side: Side) -> bool:
        return (self._client if side == Side.CLIENT else self._backend).state in (REMOTE_CLOSING, CLOSED)

    def send_ping(self, side: Side, payload: bytes) -> bool:
        dst = self._client if side == Side.CLIENT else self._backend
        if dst.failed or dst.state != OPEN:
            return False
        if len(payload) > 125:
            raise ValueError("ping payload over 125 bytes")
        dst.out.append(encode_frame(0x80 | PING, payload, self._keys.next() if dst.mask_out else None))
        dst.own_pings.append(payload)
        del dst.own_pings[:-MAX_OWN_PINGS]
        return True

    def ping_waiting(self, side: Side) -> bool:
        return False  # every frame is queued whole: a ping is never held behind one

    def take_pongs(self) -> list[tuple[Side, bytes]]:
        if not self._pongs:
            return self._pongs
        pongs, self._pongs = self._pongs, []
        return pongs

    # --- reading a peer's stream ------------------------------------------------------------

    def _feed(self, src: _SideState, dst: _SideState, data: bytes) -> None:
        """The next bytes of src's stream (b"": it ended)."""
        if src.failed or src.state == CLOSED or src.owed is not None:
            if not data:  # its stream ended: it hears why now (it may still read)
                self._pay_owed(src)
            return  # after a close or a failure, nothing more from this peer is acted on
        if not data:
            self._peer_lost(src, dst)
            return
        if src.state == REMOTE_CLOSING:
            return  # bytes after a peer's close frame mean nothing
        if src.inbox:
            src.inbox += data
            self._drain(src, dst)
            return
        if type(data) is not bytes:
            data = bytes(data)  # out may keep it until taken: it must not change
        # Act on every frame (or piece of one) in data. The parser reads the headers; payload is
        # taken here, straight from data.
        p = src.parser
        n = len(data)
        pos = 0
        start = -1  # where the current frame's header starts in data (-1: in an earlier read)
        while pos < n:
            rem = p.remaining
            if not rem:  # a header starts here
                kind, end = p.next_event(data, pos)
                if kind != HEADER:
                    if kind == ERROR:
                        self._protocol_error(src, dst, p.error_code, p.error_reason)
                    return  # NEED_DATA: the parser holds a split header
                start = -1 if p.prefix else pos
                pos = end
                op = p.opcode
                if op >= 8:
                    if p.length:
                        src.ctl = bytearray()
                    elif not self._control(src, dst, b""):
                        return
                    continue
                if op:  # the first frame of a data message
                    src.out_op = op
                    src.compressed = p.rsv != 0
                if p.message_bytes > self._max_message and not src.compressed:
                    # Not compressed: the frame's length is what it adds, refused before any of it
                    # goes on (a compressed message is counted as it inflates).
                    self._too_big(src, dst)
                    return
                rem = p.length
            elif src.ctl is not None:  # the rest of a control frame
                ctl = src.ctl
                end = pos + rem if pos + rem < n else n
                ctl += memoryview(data)[pos:end]
                p.remaining = rem - (end - pos)
                pos = end
                if not p.remaining:
                    src.ctl = None
                    payload = bytes(ctl) if p.mask is None else apply_mask(bytes(ctl), p.mask)
                    if not self._control(src, dst, payload):
                        return
                continue
            # Payload of a data frame (none, for an empty one): as much as this read holds.
            end = pos + rem if pos + rem < n else n
            done = self._data(src, dst, data, start, pos, end)
            if done != end:
                if done >= 0:  # the other peer's queue is full: the rest waits
                    src.inbox += memoryview(data)[done:]
                return
            pos = end
            if self.stats.messages_to_backend >= self._msg_stop and src is self._client:
                # The client's allowance is used up (limit_client): the rest waits for the next.
                src.inbox += memoryview(data)[pos:]
                return

    def _drain(self, src: _SideState, dst: _SideState) -> None:
        """Parse the backlog, as far as the other peer's queue has room."""
        if not src.inbox:
            return
        if src.failed or src.state == CLOSED or src.state == REMOTE_CLOSING:
            src.inbox.clear()
            return
        data = bytes(src.inbox)
        src.inbox.clear()
        self._feed(src, dst, data)

    def _data(self, src: _SideState, dst: _SideState, data: bytes, start: int, pos: int, end: int) -> int:
        """Act on data[pos:end], payload of src's current data frame; `start` is where the frame's
        header begins in `data` (-1: in an earlier read). Returns how far `data` was used: `end`,
        less if the rest must wait for room (compressed input), -1 if src must not be read on."""
        if src.compressed:
            return self._inflate(src, dst, data, pos, end)
        p = src.parser
        k = end - pos
        rem = p.remaining - k
        p.remaining = rem
        last = not rem and p.fin
        stats = self.stats
        stats.data_frames += 1
        key = p.mask
        fwd = dst.state == OPEN and not dst.failed
        if key is None:  # from the backend: the payload is plain already
            if p.message_opcode == TEXT and not self._utf8_ok(src, dst, data[pos:end], last):
                return -1
            if fwd and (k or last):
                b0 = src.out_op | 0x80 if last else src.out_op
                if start >= 0 and not rem and dst.deflate is None and data[start] == b0:
                    # The whole frame is here and goes on unchanged (same opcode, FIN, length).
                    dst.out.append(data if end - start == len(data) else data[start:end])
                    src.out_op = 0
                else:
                    self._send(src, dst, data if k == len(data) else data[pos:end], last)
                if last:
                    stats.messages_to_client += 1
        else:  # from the client: masked, and going to the backend masked with a key of ours
            done = p.length - rem - k  # payload bytes before this piece: the mask key's phase
            if done & 3:
                key = key_at(key, done)
            raw = data[pos:end]
            if p.message_opcode == TEXT or dst.deflate is not None:
                plain = apply_mask(raw, key)
                if p.message_opcode == TEXT and not self._utf8_ok(src, dst, plain, last):
                    return -1
                if fwd and (k or last):
                    self._send(src, dst, plain, last)
            elif fwd and (k or last):
                # Binary, not compressed either side: unmask and mask again in one pass.
                b0 = src.out_op | 0x80 if last else src.out_op
                src.out_op = 0
                new = self._keys.next()
                dst.out.append(frame_head(b0, k, new) + remask(raw, key, new))
            if fwd and last:
                stats.messages_to_backend += 1
        if last:
            src.utf8 = None
        return end

    def _inflate(self, src: _SideState, dst: _SideState, data: bytes, pos: int, end: int) -> int:
        """`_data` for a compressed message: inflate slice by slice while there is room."""
        p = src.parser
        k = end - pos
        raw = data[pos:end]
        if p.mask is not None:
            raw = apply_mask(raw, key_at(p.mask, p.length - p.remaining))
        fwd = dst.state == OPEN and not dst.failed
        room = self._buffer - (sum(map(len, dst.out)) if fwd else 0)
        assert src.deflate is not None  # the parser refuses RSV1 from a side without deflate
        try:
            plain, used = src.deflate.inflate(raw, room=room, ends_message=p.remaining == k and p.fin)
        except ProtocolError as exc:
            self._protocol_error(src, dst, exc.code, exc.reason)
            return -1
        if used < k and not used:
            return pos  # no room at all: all of it waits
        p.remaining -= used
        last = not p.remaining and p.fin
        self.stats.data_frames += 1
        src.inflated += len(plain)
        if src.inflated > self._max_message:
            self._too_big(src, dst)
            return -1
        if p.message_opcode == TEXT and not self._utf8_ok(src, dst, plain, last):
            return -1
        if fwd and (plain or last):
            self._send(src, dst, plain, last)
            if last:
                if dst is self._client:
                    self.stats.messages_to_client += 1
                else:
                    self.stats.messages_to_backend += 1
        if last:
            src.compressed = False
            src.inflated = 0
            src.utf8 = None
        return pos + used

    def _utf8_ok(self, src: _SideState, dst: _SideState, plain: bytes, last: bool) -> bool:
        """Is this piece of a text message valid UTF-8 so far (and complete, if `last`)?"""
        dec = src.utf8
        if dec is None:
            if plain.isascii():
                return True
            dec = src.utf8 = _utf8_decoder()
        try:
            dec.decode(plain, bool(last))
        except UnicodeDecodeError as exc:
            self._protocol_error(src, dst, INVALID_DATA, str(exc))
            return False
        return True

    def _send(self, src: _SideState, dst: _SideState, plain: bytes, last: bool) -> None:
        """Queue one frame of src's message for dst, compressed if dst negotiated deflate."""
        op = src.out_op
        src.out_op = 0
        b0 = op | 0x80 if last else op
        if dst.deflate is not None:  # as wsproto does: every message compressed, RSV1 on its first frame
            if op:
                b0 |= 0x40
            plain = dst.deflate.deflate(plain, ends_message=last)
        dst.out.append(encode_frame(b0, plain, self._keys.next() if dst.mask_out else None))

    def _control(self, src: _SideState, dst: _SideState, payload: bytes) -> bool:
        """Act on a whole control frame from src; False once src must not be read on."""
        op = src.parser.opcode
        if op in (PING, PONG):
            if op == PONG and payload.startswith(self._marker) and payload in src.own_pings:
                src.own_pings.remove(payload)
                self._pongs.append((src.side, payload))
            elif dst.state == OPEN and not dst.failed:
                dst.out.append(encode_frame(0x80 | op, payload, self._keys.next() if dst.mask_out else None))
            return True
        try:
            code, reason = parse_close(payload)
        except ProtocolError as exc:
            self._protocol_error(src, dst, exc.code, exc.reason)
            return False
        src.state = CLOSED if src.state == LOCAL_CLOSING else REMOTE_CLOSING
        src.stop()  # nothing after a close frame is read
        self._peer_close(src, dst, code, reason)
        return False

    # --- closing ------------------------------------------------------------------------------

    def _send_close(self, dst: _SideState, code: int | None, reason: str) -> None:
        """Send a close frame if this side may still send one (OPEN or REMOTE_CLOSING)."""
        if dst.failed or dst.state == LOCAL_CLOSING or dst.state == CLOSED:
            return
        dst.out.append(encode_frame(0x88, close_payload(code, reason), self._keys.next() if dst.mask_out else None))
        dst.state = LOCAL_CLOSING if dst.state == OPEN else CLOSED

    def _peer_close(self, src: _SideState, dst: _SideState, code: int | None, reason: str) -> None:
        self.stats.peer_closed(src.side, code, reason)
        if self._pay_owed(dst):
            return  # the other peer's replies are all through: now it hears of its error
        if src.state == REMOTE_CLOSING:
            # The peer started closing: pass it on; its answer comes back when the other side
            # answers. If the other side cannot answer any more, answer the peer ourselves.
            if dst.state == OPEN and not dst.failed:
                self._send_close(dst, code, reason)
            else:
                self._send_close(src, code, reason)
        elif src.state == CLOSED and dst.state == REMOTE_CLOSING:
            # The peer answered a close we forwarded to it: complete the other side with it.
            self._send_close(dst, code, reason)

    def _protocol_error(self, src: _SideState, dst: _SideState, code: int, reason: str) -> None:
        """Fail src with `code` (1009: over the size limit, a limit rather than a fault); dst hears why.

        dst hears first: what it still sends (replies to src's valid messages, already on their
        way) reaches src until dst's close arrives; then src gets its close (`owed`). The close
        timeout bounds the wait."""
        src.stop()
        self.stats.closed_by("proxy")
        if code == TOO_BIG:
            other_code, why = GOING_AWAY, f"{src.side} sent a {reason}"
            self.stats.proxy_close = CloseRecord(code, why)
        else:
            self.stats.proxy_close = CloseRecord(code, f"{src.side} protocol error: {reason}")
            if src is self._client:
                other_code, why = GOING_AWAY, "client protocol error"
            else:
                other_code, why = INTERNAL_ERROR, "backend protocol error"
        if src.state == OPEN and dst.state == OPEN and not dst.failed:
            src.owed = (code, reason)
            self._send_close(dst, other_code, why)
            return
        self._send_close(src, code, reason)
        src.failed = True
        self._close_other(dst, other_code, why)

    def _too_big(self, src: _SideState, dst: _SideState) -> None:
        self._protocol_error(src, dst, TOO_BIG, f"message over {self._max_message} bytes")

    def _peer_lost(self, src: _SideState, dst: _SideState) -> None:
        """The peer's stream ended. Without a finished closing handshake, it vanished."""
        src.state = CLOSED
        src.failed = True
        src.stop()
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
        if src is self._client:
            self._close_other(dst, GOING_AWAY, "client went away")
        else:
            self._close_other(dst, INTERNAL_ERROR, "backend connection lost")

    def _close_other(self, dst: _SideState, code: int, reason: str) -> None:
        if self._pay_owed(dst):
            return
        if dst.state == OPEN:
            self._send_close(dst, code, reason)
        elif dst.state == REMOTE_CLOSING:
            # The other peer was waiting for an answer to its close: give it its own code back.
            rec = self.stats.client_close if dst is self._client else self.stats.backend_close
            self._send_close(dst, rec.code if rec else code, rec.reason if rec else reason)
