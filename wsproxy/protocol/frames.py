"""Incremental WebSocket frame-header parser and frame helpers for the passthrough relay.

The passthrough relay forwards frames verbatim (RFC 6455 section 5), so it only needs to know
where each frame starts and ends, what kind it is and whether it is legal; it never needs a data
payload. `FrameParser` reads headers out of a byte stream cut anywhere, holds at most one split
header (<= 14 bytes) between feeds and reports payload as index ranges of the caller's chunk, so
payload bytes are never copied or buffered here. It also does the checks an intermediary owes
both peers (opcodes, control-frame rules, fragmentation order, masking direction, RSV bits,
length encoding, an optional message-size limit) and says which close code a violation earns.
The helpers unmask and read the few control payloads the relay looks at (close, pong) and build
the proxy's own control frames. Pure: no I/O, no clock.
"""

from __future__ import annotations

import os
import struct

# Events returned by FrameParser.next_event.
NEED_DATA = 0  # the chunk is used up (a split header may be held); feed more
HEADER = 1  # a frame header was completed; its fields are on the parser
PAYLOAD = 2  # chunk[pos:end] is payload of the current frame; parser.remaining says what is left
ERROR = 3  # the stream broke the protocol; parser.error_code / error_reason say how

# Opcodes (RFC 6455 section 5.2).
CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

# Close codes this module hands out.
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask key)
MAX_CONTROL_PAYLOAD = 125

_OPCODE_OK = tuple(op in (0, 1, 2, 8, 9, 10) for op in range(16))

# Close codes a peer may put on the wire (RFC 6455 section 7.4). 1012/1013 are registered with
# IANA, wsproto (hence the inspect relay) accepts them, and the proxy itself sends 1012 on
# restart, so a chained wsproxy must be able to pass it on. 1004-1006, 1014-2999 and 1015 are not.
_WIRE_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
# Local-only codes: they mean "no code" / "no close frame" and must never be sent.
_NO_CODE = (None, 1005, 1006)


class ProtocolError(ValueError):
    """A peer broke RFC 6455; `code` is the close code it should get."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class FrameParser:
    """Frame headers out of one direction of a WebSocket byte stream, fed in arbitrary chunks.

    Drive it with `next_event(chunk, pos)` until `pos == len(chunk)` or the event is
    NEED_DATA / ERROR. After HEADER, the header's bytes are `prefix + chunk[pos:end]` (`prefix`
    is the part held from earlier chunks, usually b""); after PAYLOAD, `chunk[pos:end]` belongs
    to the current frame and `remaining == 0` means the frame just ended.

    `masked` is what the RFC demands of this direction: True for the client's stream, False for
    the backend's. `rsv1_allowed` is set when permessage-deflate was negotiated end to end: RSV1
    is then legal on the first frame of a data message (never on continuations or controls).
    `max_message_bytes` caps the wire size of a message, checked from headers, before the
    offending frame's payload is forwarded.
    """

    __slots__ = (
        "_held",
        "_masked",
        "_max",
        "_rsv1",
        "error_code",
        "error_reason",
        "fin",
        "in_message",
        "length",
        "mask",
        "masked",
        "message_bytes",
        "message_opcode",
        "opcode",
        "prefix",
        "remaining",
        "rsv",
    )

    def __init__(
        self,
        *,
        masked: bool,
        rsv1_allowed: bool = False,
        max_message_bytes: int | None = None,
    ) -> None:
        self._masked = masked
        self._rsv1 = rsv1_allowed
        self._max = max_message_bytes
        self._held = b""
        self.prefix = b""
        self.fin = True
        self.rsv = 0  # the three RSV bits as they sit in the first byte (0x70 mask)
        self.opcode = 0
        self.masked = False
        self.mask: bytes | None = None
        self.length = 0
        self.remaining = 0
        self.in_message = False  # a fragmented data message has started and not finished
        self.message_opcode = 0
        self.message_bytes = 0  # wire payload bytes of the current/last data message
        self.error_code = 0
        self.error_reason = ""

    @property
    def at_boundary(self) -> bool:
        """No frame is part way through (a held partial header does not count)."""
        return not self.remaining

    def next_event(self, data: bytes, pos: int = 0) -> tuple[int, int]:
        """The next thing in `data` from `pos`: (event, end). See the class docstring."""
        rem = self.remaining
        if rem:
            end = pos + rem
            n = len(data)
            if end <= n:
                self.remaining = 0
                return PAYLOAD, end
            self.remaining = end - n
            return PAYLOAD, n
        if self.error_code:
            return ERROR, pos
        held = self._held
        if held:
            buf = held + data[pos : pos + MAX_HEADER - len(held)]
            hl = self._header(buf, 0, len(buf))
            if hl > 0:
                self._held = b""
                self.prefix = held
                return HEADER, pos + hl - len(held)
            if hl == 0:
                self._held = buf  # still short: all of data went into buf
                return NEED_DATA, len(data)
            return ERROR, pos
        n = len(data)
        hl = self._header(data, pos, n)
        if hl > 0:
            self.prefix = b""
            return HEADER, pos + hl
        if hl == 0:
            self._held = bytes(data[pos:])
            return NEED_DATA, n
        return ERROR, pos

    def _fail(self, code: int, reason: str) -> int:
        self.error_code = code
        self.error_reason = reason
        self._held = b""
        return -1

    def _header(self, b: bytes, i: int, n: int) -> int:
        """Header length if a whole valid header starts at b[i]; 0 if short; -1 if invalid."""
        if n - i < 2:
            return 0
        b0 = b[i]
        b1 = b[i + 1]
        op = b0 & 0x0F
        if not _OPCODE_OK[op]:
            return self._fail(PROTOCOL_ERROR, f"reserved opcode {op:#x}")
        ln = b1 & 0x7F
        if op >= 8:
            if not b0 & 0x80:
                return self._fail(PROTOCOL_ERROR, "fragmented control frame")
            if ln > MAX_CONTROL_PAYLOAD:
                return self._fail(PROTOCOL_ERROR, "control frame payload over 125 bytes")
        elif op:
            if self.in_message:
                return self._fail(PROTOCOL_ERROR, "new data frame inside a fragmented message")
        elif not self.in_message:
            return self._fail(PROTOCOL_ERROR, "continuation frame without a message")
        rsv = b0 & 0x70
        if rsv and (rsv != 0x40 or not self._rsv1 or op == 0 or op >= 8):
            return self._fail(PROTOCOL_ERROR, "reserved bit set unexpectedly")
        masked = b1 & 0x80
        if masked:
            if not self._masked:
                return self._fail(PROTOCOL_ERROR, "masked frame from the server side")
            hl = 6
        else:
            if self._masked:
                return self._fail(PROTOCOL_ERROR, "unmasked frame from the client side")
            hl = 2
        if ln >= 126:
            if ln == 126:
                hl += 2
                if n - i < hl:
                    return 0
                ln = (b[i + 2] << 8) | b[i + 3]
                if ln < 126:
                    return self._fail(PROTOCOL_ERROR, "payload length not minimally encoded")
            else:
                hl += 8
                if n - i < hl:
                    return 0
                ln = int.from_bytes(b[i + 2 : i + 10], "big")
                if ln >> 63:
                    return self._fail(PROTOCOL_ERROR, "64-bit payload length with the top bit set")
                if ln < 0x10000:
                    return self._fail(PROTOCOL_ERROR, "payload length not minimally encoded")
        elif n - i < hl:
            return 0
        if op < 8:
            total = ln + self.message_bytes if op == 0 else ln
            if self._max is not None and total > self._max:
                return self._fail(TOO_BIG, f"message over {self._max} bytes")
            if op:
                self.message_opcode = op
            self.message_bytes = total
            self.in_message = not b0 & 0x80
        self.fin = bool(b0 & 0x80)
        self.rsv = rsv
        self.opcode = op
        self.length = ln
        self.remaining = ln
        if masked:
            self.masked = True
            self.mask = bytes(b[i + hl - 4 : i + hl])
        else:
            self.masked = False
            self.mask = None
        return hl


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR `payload` with the 4-byte mask `key` (masking and unmasking are the same)."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def valid_wire_close_code(code: int) -> bool:
    """May a peer send this close code (RFC 6455 section 7.4)?"""
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of an unmasked close payload; code None means none was sent (1005).

    Raises ProtocolError with 1002 for a 1-byte payload or a code not allowed on the wire, and
    1007 for a reason that is not UTF-8: the relay must not forward such a close.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not valid_wire_close_code(code):
        raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def build_frame(opcode: int, payload: bytes = b"", *, mask: bool, fin: bool = True) -> bytes:
    """One frame; masked with a fresh random key when it goes to a backend (we are its client)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        return head + key + apply_mask(payload, key)
    return head + bytes(payload)


def close_payload(code: int | None, reason: str = "") -> bytes:
    """Close payload for `code`; None/1005/1006 give an empty one (no code on the wire)."""
    if code in _NO_CODE:
        return b""
    assert code is not None
    if code == 1015:  # local-only like 1005/1006; wsproto sends 1000 instead, so do we
        code = 1000
    return struct.pack("!H", code) + _truncate_utf8(reason.encode("utf-8"), 123)


def build_close(code: int | None, reason: str = "", *, mask: bool) -> bytes:
    """The proxy's own close frame (reason cut to fit 125 bytes at a character boundary)."""
    return build_frame(CLOSE, close_payload(code, reason), mask=mask)


def build_ping(payload: bytes, *, mask: bool) -> bytes:
    """The proxy's own ping (heartbeat); payload at most 125 bytes."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("ping payload over 125 bytes")
    return build_frame(PING, payload, mask=mask)


def build_pong(payload: bytes, *, mask: bool) -> bytes:
    """A pong answering a ping with `payload`."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("pong payload over 125 bytes")
    return build_frame(PONG, payload, mask=mask)
