"""The one WebSocket frame codec (RFC 6455 section 5) of both relays: parse, mask, build, close.

`FrameParser` reads frame headers out of one direction of a byte stream cut anywhere: it holds
at most one split header (<= 14 bytes) between feeds and reports payload as index ranges of the
caller's chunk, so payload bytes are never copied or buffered here. It does the checks RFC 6455
asks of whoever reads a stream (opcodes, control-frame rules, length encoding, RSV bits, masking
direction, fragmentation order, an optional message-size limit), in the order wsproto does them
and with wsproto's reasons, so both relays answer a bad stream with the close wsproto would give.
`apply_mask`/`remask` are the XOR of RFC 6455 section 5.3 (big-int XOR for short payloads, four
strided table translates for long ones: the fastest pure-Python forms measured, see
benchmarks/codec_bench.py); `MaskKeys` is the source of the proxy's mask keys, an object the
relays are given rather than a module global. `encode_frame` and the `build_*` helpers make the
proxy's frames; `parse_close` and `close_payload` read and write close payloads. Pure: no I/O,
no clock.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

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

FIN = 0x80  # the first byte's FIN bit
RSV1 = 0x40  # the first byte's RSV1 bit (permessage-deflate: a compressed message)

# Close codes this module hands out.
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask key)
MAX_CONTROL_PAYLOAD = 125

_OPCODE_OK = tuple(op in (0, 1, 2, 8, 9, 10) for op in range(16))
NO_LIMIT = 1 << 63  # above any payload length: "no size limit" is then one comparison, like a limit
# What a parser that found an error holds instead of a split header: the hot path of next_event
# then needs no check of its own for a dead parser (a real held header is never this object).
_DEAD = b"dead"
_OPCODE_NAME = {1: "TEXT", 2: "BINARY"}

# Close codes a peer may put on the wire (RFC 6455 section 7.4): the ones wsproto knows below
# 3000, and 3000-4999. 1012/1013 are registered with IANA and the proxy itself sends 1012 on
# restart, so a chained wsproxy must be able to pass it on. 1005, 1006 and 1015 are local-only.
_WIRE_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_LOCAL_ONLY_CLOSE_CODES = (1005, 1006, 1015)
_NO_CODE = (None, 1005, 1006)  # no code on the wire: an empty close payload

_pack16 = struct.Struct("!BBH").pack
_pack64 = struct.Struct("!BBQ").pack
_from_bytes = int.from_bytes


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
    to the current frame and `remaining == 0` means the frame just ended. `remaining` is the
    payload of the current frame still to come: a reader may instead take payload straight from
    its chunk and lower `remaining` by what it took (the inspect relay does, to stop part way when
    the other peer has no room); `next_event` then goes on from the next header.

    `masked` is what the RFC demands of this direction: True for the client's stream, False for
    the backend's. `rsv1_allowed` is set when permessage-deflate was negotiated on this stream:
    RSV1 is then legal on the first frame of a data message (never on continuations or
    controls). `max_message_bytes` caps the wire size of a message, checked from headers, before
    the offending frame's payload is reported.
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
        self._max = max_message_bytes if max_message_bytes is not None else NO_LIMIT
        self._held = b""
        self.prefix = b""
        self.fin = True
        self.rsv = 0  # the three RSV bits as they sit in the first byte (0x70 mask)
        self.opcode = 0
        self.mask: bytes | None = None  # the current frame's mask key (None: not masked)
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

    @property
    def in_header(self) -> bool:
        """Part of a header is held, waiting for the rest."""
        return bool(self._held)

    def next_event(self, data: bytes, pos: int = 0) -> tuple[int, int]:
        """The next thing in `data` from `pos`: (event, end). See the class docstring.

        A header is checked here, in wsproto's order and with its reasons (one call per frame:
        this is the relays' hot path)."""
        rem = self.remaining
        if rem:
            end = pos + rem
            n = len(data)
            if end <= n:
                self.remaining = 0
                return PAYLOAD, end
            self.remaining = end - n
            return PAYLOAD, n
        held = self._held
        if held:  # the header began in an earlier chunk: parse it from held + what follows
            if held is _DEAD:
                return ERROR, pos
            b = held + data[pos : pos + MAX_HEADER - len(held)]
            i = 0
        else:
            b = data
            i = pos
        avail = len(b) - i
        if avail < 2:
            return self._short(b, i, data)
        b0 = b[i]
        b1 = b[i + 1]
        op = b0 & 0x0F
        if not _OPCODE_OK[op]:
            return self._fail(PROTOCOL_ERROR, f"Invalid opcode {op:#x}", pos)
        ln = b1 & 0x7F
        if op >= 8:
            if not b0 & 0x80:
                return self._fail(PROTOCOL_ERROR, "Invalid attempt to fragment control frame", pos)
            if ln > MAX_CONTROL_PAYLOAD:
                return self._fail(PROTOCOL_ERROR, "Control frame with payload len > 125", pos)
        hl = 2
        if ln >= 126:
            if ln == 126:
                hl = 4
                if avail < 4:
                    return self._short(b, i, data)
                ln = (b[i + 2] << 8) | b[i + 3]
                if ln < 126:
                    return self._fail(PROTOCOL_ERROR, "Payload length used 2 bytes when 1 would have sufficed", pos)
            else:
                hl = 10
                if avail < 10:
                    return self._short(b, i, data)
                ln = _from_bytes(b[i + 2 : i + 10], "big")
                if ln < 0x10000:
                    return self._fail(PROTOCOL_ERROR, "Payload length used 8 bytes when 2 would have sufficed", pos)
                if ln >> 63:
                    return self._fail(PROTOCOL_ERROR, "8-byte payload length with non-zero MSB", pos)
        rsv = b0 & 0x70
        if rsv:
            if self._rsv1 and rsv & 0x40 and (op == 0 or op >= 8):
                return self._fail(PROTOCOL_ERROR, "error in extension", pos)
            if rsv != 0x40 or not self._rsv1:
                return self._fail(PROTOCOL_ERROR, "Reserved bit set unexpectedly", pos)
        if b1 & 0x80:
            if not self._masked:
                return self._fail(PROTOCOL_ERROR, "client received unexpected masked frame", pos)
            hl += 4
            if avail < hl:
                return self._short(b, i, data)
            mask: bytes | None = b[i + hl - 4 : i + hl]
        elif self._masked:
            return self._fail(PROTOCOL_ERROR, "server received unexpected unmasked frame", pos)
        else:
            mask = None
        if op < 8:
            if op:
                if self.in_message:
                    why = f"expected CONTINUATION, got <Opcode.{_OPCODE_NAME[op]}: {op}>"
                    return self._fail(PROTOCOL_ERROR, why, pos)
                self.message_opcode = op
                total = ln
            elif not self.in_message:
                return self._fail(PROTOCOL_ERROR, "unexpected CONTINUATION", pos)
            else:
                total = ln + self.message_bytes
            if total > self._max:
                return self._fail(TOO_BIG, f"message over {self._max} bytes", pos)
            self.message_bytes = total
            self.in_message = b0 < 0x80  # FIN not set: more frames of this message follow
        self.fin = b0 > 0x7F  # FIN is the top bit
        self.rsv = rsv
        self.opcode = op
        self.length = ln
        self.remaining = ln
        self.mask = mask
        if held:
            self._held = b""
            self.prefix = held
            return HEADER, pos + hl - len(held)
        self.prefix = b""
        return HEADER, pos + hl

    def _short(self, b: bytes, i: int, data: bytes) -> tuple[int, int]:
        """The header from b[i] is not whole yet: hold it (all of `data` went into it)."""
        self._held = bytes(b[i:])
        return NEED_DATA, len(data)

    def _fail(self, code: int, reason: str, pos: int) -> tuple[int, int]:
        self.error_code = code
        self.error_reason = reason
        self._held = _DEAD
        return ERROR, pos


# --- masking ---------------------------------------------------------------------------------

_XOR_SMALL = 512  # below this, big-int XOR is faster than four strided translates (measured)
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]
# 0x00000001 in each of w 32-bit words: a 32-bit key times _REPS[w] is the key repeated w times
# (no carries), cheaper than converting the repeated key's bytes.
_REPS = [_from_bytes(b"\x01\x00\x00\x00" * w, "little") for w in range(_XOR_SMALL // 4 + 1)]


def _xor(data: bytes, k: int) -> bytes:
    """`data` XOR the 4-byte key whose little-endian value is `k`, repeated."""
    n = len(data)
    if n < _XOR_SMALL:
        if not n:
            return b""
        w = (n + 3) >> 2
        x = _from_bytes(data, "little") ^ k * _REPS[w]
        return x.to_bytes(w << 2, "little")[:n] if n & 3 else x.to_bytes(n, "little")
    t = _XOR_TABLES
    b = bytearray(data)
    b[::4] = b[::4].translate(t[k & 0xFF])
    b[1::4] = b[1::4].translate(t[(k >> 8) & 0xFF])
    b[2::4] = b[2::4].translate(t[(k >> 16) & 0xFF])
    b[3::4] = b[3::4].translate(t[k >> 24])
    return bytes(b)


def apply_mask(data: bytes, key: bytes) -> bytes:
    """`data` XOR the 4-byte mask `key` repeated (masking and unmasking are the same)."""
    return _xor(data, _from_bytes(key, "little"))


def remask(data: bytes, old: bytes, new: bytes) -> bytes:
    """`data` masked with key `old`, masked with key `new` instead: one pass, never unmasked."""
    return _xor(data, _from_bytes(old, "little") ^ _from_bytes(new, "little"))


def key_at(key: bytes, offset: int) -> bytes:
    """The mask key as it applies from payload byte `offset` on (the key's phase)."""
    off = offset & 3
    return key[off:] + key[:off] if off else key


class MaskKeys:
    """Fresh random mask keys (RFC 6455 section 5.3) for the frames the proxy sends to backends.

    Keys come from a pool of random bytes, refilled from `random_bytes` (os.urandom) when used
    up: one system call per many frames. The pool starts small and grows to `pool_keys` keys as
    it is refilled, so a source a quiet session owns costs little and a busy one few refills.
    Make one per process and hand it to whoever builds masked frames (relays, heartbeat pings);
    tests pass a deterministic `random_bytes`. Never share one across a fork: the child would
    repeat the parent's keys (wsproxy's workers are separate programs, not forks).
    """

    __slots__ = ("_at", "_max", "_pool", "_random", "_size")

    def __init__(self, *, random_bytes: Callable[[int], bytes] = os.urandom, pool_keys: int = 1024) -> None:
        if pool_keys < 1:
            raise ValueError("pool_keys must be at least 1")
        self._random = random_bytes
        self._max = pool_keys * 4
        self._size = min(64, self._max)
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        """A mask key never handed out before by this source."""
        i = self._at
        if i >= len(self._pool):
            self._pool = self._random(self._size)
            if len(self._pool) != self._size or self._size & 3:
                raise ValueError("the random source gave the wrong number of bytes")
            self._size = min(self._size * 4, self._max)
            i = 0
        self._at = i + 4
        return self._pool[i : i + 4]


# --- building frames -------------------------------------------------------------------------


def frame_head(b0: int, length: int, key: bytes | None) -> bytes:
    """A frame's header: first byte `b0` (FIN, RSV and opcode), the length, the mask key if any."""
    if key is None:
        if length < 126:
            return bytes((b0, length))
        if length < 0x10000:
            return _pack16(b0, 126, length)
        return _pack64(b0, 127, length)
    if length < 126:
        return bytes((b0, 0x80 | length)) + key
    if length < 0x10000:
        return _pack16(b0, 0xFE, length) + key
    return _pack64(b0, 0xFF, length) + key


def encode_frame(b0: int, payload: bytes, key: bytes | None) -> bytes:
    """One whole frame with first byte `b0`; masked with `key` when one is given (to a backend)."""
    if key is None:
        return frame_head(b0, len(payload), None) + payload
    return frame_head(b0, len(payload), key) + apply_mask(payload, key)


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    mask: bool,
    fin: bool = True,
    keys: MaskKeys | None = None,
) -> bytes:
    """One frame; masked when it goes to a backend (we are its client), with a key from `keys`
    (a key straight from os.urandom if none is given: one-off frames, tests)."""
    b0 = (0x80 if fin else 0) | opcode
    if not mask:
        return encode_frame(b0, bytes(payload), None)
    return encode_frame(b0, bytes(payload), keys.next() if keys is not None else os.urandom(4))


def valid_wire_close_code(code: int) -> bool:
    """May a peer send this close code (RFC 6455 section 7.4)?"""
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of an unmasked close payload; code None means none was sent (1005).

    Raises ProtocolError with 1002 for a 1-byte payload or a code not allowed on the wire, and
    1007 for a reason that is not UTF-8 (reasons as wsproto gives them): the relay must not
    forward such a close.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with 1 byte payload")
    code = (payload[0] << 8) | payload[1]
    if code < 1000 or code > 4999:
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with invalid code")
    if code in _LOCAL_ONLY_CLOSE_CODES:
        raise ProtocolError(PROTOCOL_ERROR, "remote CLOSE with local-only reason")
    if not valid_wire_close_code(code):
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with unknown reserved code")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(INVALID_DATA, f"Error decoding CLOSE reason: {exc}") from None
    return code, reason


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def close_payload(code: int | None, reason: str = "") -> bytes:
    """Close payload for `code`; None/1005/1006 give an empty one (no code on the wire)."""
    if code in _NO_CODE:
        return b""
    assert code is not None
    if code == 1015:  # local-only like 1005/1006; wsproto sends 1000 instead, so do we
        code = 1000
    return struct.pack("!H", code) + _truncate_utf8(reason.encode("utf-8"), 123)


def build_close(code: int | None, reason: str = "", *, mask: bool, keys: MaskKeys | None = None) -> bytes:
    """The proxy's own close frame (reason cut to fit 125 bytes at a character boundary)."""
    return build_frame(CLOSE, close_payload(code, reason), mask=mask, keys=keys)


def build_ping(payload: bytes, *, mask: bool, keys: MaskKeys | None = None) -> bytes:
    """The proxy's own ping (heartbeat); payload at most 125 bytes."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("ping payload over 125 bytes")
    return build_frame(PING, payload, mask=mask, keys=keys)


def build_pong(payload: bytes, *, mask: bool, keys: MaskKeys | None = None) -> bytes:
    """A pong answering a ping with `payload`."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("pong payload over 125 bytes")
    return build_frame(PONG, payload, mask=mask, keys=keys)
