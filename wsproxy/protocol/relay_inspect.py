"""The inspect relay: every frame parsed, validated, unmasked and re-framed, hop by hop.

Each peer's byte stream is parsed incrementally here (a header or a payload may be split across
reads, a read may hold many frames), with the checks RFC 6455 asks of an endpoint: opcodes, RSV
bits, masking direction, length encoding, control-frame rules, fragmentation order, close
payloads, and UTF-8 in text messages (checked incrementally, across fragments). Payloads are
streamed: each piece of a data frame that a read brings is unmasked, checked and sent on at once
as a frame of its own towards the other peer (masked with a fresh random key towards the
backend, unmasked towards the client), so a message is never held whole and its boundaries,
opcode and order are kept; only its fragmentation may differ. A frame from the backend that
arrives whole and needs no change goes to the client as it came.

Each hop negotiates its own permessage-deflate (a wsproto `PerMessageDeflate`, used here only for
its negotiated parameters; zlib does the work). Compressed input is inflated in small slices and
only while the other peer's queue is under `buffer_bytes`: deflate expands up to ~1000x, so a
64 KiB read could otherwise become 64 MiB in memory (a compression bomb); the rest waits as
backlog (`backlog()` / `resume()`) until the queue drains.

Pings and pongs pass end to end (pongs answering the proxy's own pings are swallowed and handed
out by `take_pongs`); close codes and reasons pass end to end, and the closing handshake completes
on both hops. A protocol error answers the offending peer with its RFC code (1002, or 1007 for
bad UTF-8 or bad compressed data) and the other peer with 1001 (client at fault) or 1011 (backend
at fault); a message over `max_message_bytes` earns its sender 1009 and the other peer 1001 (an
uncompressed one from the header of the frame that crosses the limit, before any of that frame
goes on; a compressed one as it inflates). The close codes and reasons and the per-hop closing
states are the ones the earlier wsproto-based relay produced.
"""

from __future__ import annotations

import codecs
import os
import struct
import zlib
from collections.abc import Sequence

from wsproto.extensions import Extension, PerMessageDeflate

from wsproxy.config import defaults
from wsproxy.protocol.frames import PING, PONG, TEXT, ProtocolError, close_payload
from wsproxy.protocol.heartbeat import PING_MARKER
from wsproxy.protocol.relay import (
    ABNORMAL,
    GOING_AWAY,
    INTERNAL_ERROR,
    INVALID_DATA,
    PROTOCOL_ERROR,
    TOO_BIG,
    CloseRecord,
    RelayStats,
)

DEFLATE_SLICE = 1024  # compressed bytes inflated at once: at most ~1 MiB out
MAX_OWN_PINGS = 4  # unanswered proxy pings remembered per hop (the schedule keeps one in flight)

# A hop's closing state, as RFC 6455 section 7 (and wsproto) name them.
OPEN = 0
REMOTE_CLOSING = 1  # the peer's close arrived, ours has not gone out yet
LOCAL_CLOSING = 2  # our close went out, the peer's has not arrived yet
CLOSED = 3

_OPCODE_OK = tuple(op in (0, 1, 2, 8, 9, 10) for op in range(16))
_OPCODE_NAME = {1: "TEXT", 2: "BINARY"}
# Close codes a peer may send below 3000: the ones wsproto knows (1005/1006/1015 are refused
# separately as local-only). 3000-4999 are always allowed.
_KNOWN_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_LOCAL_ONLY_CLOSE_CODES = (1005, 1006, 1015)
_SYNC_TAIL = b"\x00\x00\xff\xff"  # the end of a compressed message, stripped on the wire

_pack16 = struct.Struct("!BBH").pack
_pack64 = struct.Struct("!BBQ").pack
_from_bytes = int.from_bytes
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


# --- masking ---------------------------------------------------------------------------------

_XOR_SMALL = 512  # below this, big-int XOR is faster than four strided translates
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]
# 0x00000001 in each of w 32-bit words: a 32-bit key times _REPS[w] is the key repeated w times
# (no carries), cheaper than converting the repeated key's bytes.
_REPS = [_from_bytes(b"\x01\x00\x00\x00" * w, "little") for w in range(_XOR_SMALL // 4 + 1)]


def _xor(data: bytes, key: bytes) -> bytes:
    """`data` XOR the 4-byte `key` repeated (masking and unmasking are the same)."""
    n = len(data)
    if n < _XOR_SMALL:
        if not n:
            return b""
        w = (n + 3) >> 2
        x = _from_bytes(data, "little") ^ _from_bytes(key, "little") * _REPS[w]
        return x.to_bytes(w << 2, "little")[:n] if n & 3 else x.to_bytes(n, "little")
    t = _XOR_TABLES
    b = bytearray(data)
    b[::4] = b[::4].translate(t[key[0]])
    b[1::4] = b[1::4].translate(t[key[1]])
    b[2::4] = b[2::4].translate(t[key[2]])
    b[3::4] = b[3::4].translate(t[key[3]])
    return bytes(b)


def _remask(data: bytes, old: bytes, new: bytes) -> bytes:
    """`data` masked with key `old`, masked with key `new` instead: one pass, never unmasked."""
    n = len(data)
    if n < _XOR_SMALL:
        if not n:
            return b""
        w = (n + 3) >> 2
        x = _from_bytes(data, "little") ^ (_from_bytes(old, "little") ^ _from_bytes(new, "little")) * _REPS[w]
        return x.to_bytes(w << 2, "little")[:n] if n & 3 else x.to_bytes(n, "little")
    t = _XOR_TABLES
    b = bytearray(data)
    b[::4] = b[::4].translate(t[old[0] ^ new[0]])
    b[1::4] = b[1::4].translate(t[old[1] ^ new[1]])
    b[2::4] = b[2::4].translate(t[old[2] ^ new[2]])
    b[3::4] = b[3::4].translate(t[old[3] ^ new[3]])
    return bytes(b)


_KEY_POOL = 4096
_keys = b""
_keys_at = 0


def _new_key() -> bytes:
    """A fresh random mask key (RFC 6455 section 5.3), from a pool refilled from os.urandom."""
    global _keys, _keys_at
    i = _keys_at
    if i >= len(_keys):
        _keys = os.urandom(_KEY_POOL)
        i = 0
    _keys_at = i + 4
    return _keys[i : i + 4]


def _forget_keys() -> None:
    global _keys, _keys_at
    _keys, _keys_at = b"", 0


os.register_at_fork(after_in_child=_forget_keys)  # a forked worker must not reuse its parent's keys


def _frame(b0: int, payload: bytes, masked: bool) -> bytes:
    """One whole frame: first byte `b0`, then length, mask key (if `masked`) and payload."""
    n = len(payload)
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 0x10000:
        head = _pack16(b0, mbit | 126, n)
    else:
        head = _pack64(b0, mbit | 127, n)
    if masked:
        key = _new_key()
        return head + key + _xor(payload, key)
    return head + payload


def _parse_close(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of an unmasked close payload (code None: none sent), by wsproto's rules."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with 1 byte payload")
    code = (payload[0] << 8) | payload[1]
    if code < 1000 or code > 4999:
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with invalid code")
    if code in _LOCAL_ONLY_CLOSE_CODES:
        raise ProtocolError(PROTOCOL_ERROR, "remote CLOSE with local-only reason")
    if code < 3000 and code not in _KNOWN_CLOSE_CODES:
        raise ProtocolError(PROTOCOL_ERROR, "CLOSE with unknown reserved code")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(INVALID_DATA, f"Error decoding CLOSE reason: {exc}") from None
    return code, reason


def _negotiated_deflate(extensions: Sequence[Extension] | None) -> PerMessageDeflate | None:
    deflate = None
    for ext in extensions or ():
        if not ext.enabled():
            continue
        if not isinstance(ext, PerMessageDeflate) or deflate is not None:
            raise TypeError(f"unsupported extension {ext!r}")
        deflate = ext
    return deflate


class _Hop:
    """One peer: the parser state of what it sends, and what is queued for it."""

    __slots__ = (
        "ctl",
        "deflate",
        "failed",
        "fin",
        "held",
        "inbox",
        "key",
        "mask_out",
        "masked_in",
        "msg_bytes",
        "msg_op",
        "msg_z",
        "name",
        "off",
        "opcode",
        "out",
        "out_op",
        "own_pings",
        "remaining",
        "state",
        "utf8",
        "zin",
        "zin_bits",
        "zin_reset",
        "zout",
        "zout_bits",
        "zout_reset",
    )

    def __init__(self, name: str, *, client: bool, deflate: PerMessageDeflate | None) -> None:
        self.name = name
        self.state = OPEN
        self.failed = False  # stream ended, protocol error or abandoned: read nothing more from it
        self.out: list[bytes] = []  # whole frames ready for this peer, in order
        self.own_pings: list[bytes] = []  # payloads of the proxy's pings to this peer, unanswered
        self.masked_in = client  # frames from a client are masked, frames to a backend are
        self.mask_out = not client
        # The stream from this peer, part way through.
        self.held = b""  # the start of a header split across reads (< 14 bytes)
        self.inbox = bytearray()  # read but not parsed yet: the backlog (compressed input only)
        self.remaining = 0  # payload bytes of the current frame still to come
        self.opcode = 0  # of the current control frame
        self.fin = 0  # FIN bit of the current data frame
        self.key: bytes | None = None  # its mask key
        self.off = 0  # its payload bytes consumed so far (the mask key's phase)
        self.ctl: bytearray | None = None  # a control frame's payload, collected across reads
        self.msg_op = 0  # opcode of the data message in progress (0: none)
        self.msg_z = False  # that message is compressed
        self.msg_bytes = 0  # its size so far, inflated
        self.out_op = 0  # opcode of the next frame of it sent on (0 once its first frame went)
        self.utf8: codecs.IncrementalDecoder | None = None  # a text message's UTF-8 check, once not ASCII
        # permessage-deflate on this hop; we are the client's server and the backend's client.
        self.deflate = deflate is not None
        self.zin: zlib._Decompress | None = None  # inflates this peer's messages
        self.zout: zlib._Compress | None = None  # deflates the messages sent to it
        if deflate is None:
            self.zin_bits = self.zout_bits = 15
            self.zin_reset = self.zout_reset = False
        elif client:
            self.zin_bits, self.zin_reset = deflate.client_max_window_bits, deflate.client_no_context_takeover
            self.zout_bits, self.zout_reset = deflate.server_max_window_bits, deflate.server_no_context_takeover
        else:
            self.zin_bits, self.zin_reset = deflate.server_max_window_bits, deflate.server_no_context_takeover
            self.zout_bits, self.zout_reset = deflate.client_max_window_bits, deflate.client_no_context_takeover

    @property
    def done(self) -> bool:
        return self.failed or self.state == CLOSED

    def stop(self) -> None:
        """Read nothing more of this peer's stream."""
        self.held = b""
        self.inbox.clear()
        self.ctl = None
        self.utf8 = None
        self.zin = None

    def take(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data


class InspectRelay:
    """Parse, check and re-frame both hops; see the module docstring for the rules."""

    __slots__ = ("_backend", "_buffer", "_client", "_marker", "_max_message", "_pongs", "may_backlog", "stats")

    def __init__(
        self,
        *,
        client_extensions: list[Extension] | None = None,
        backend_extensions: list[Extension] | None = None,
        max_message_bytes: int | None = None,
        buffer_bytes: int = defaults.BUFFER_BYTES,
        ping_marker: bytes = PING_MARKER,
    ) -> None:
        self._client = _Hop("client", client=True, deflate=_negotiated_deflate(client_extensions))
        self._backend = _Hop("backend", client=False, deflate=_negotiated_deflate(backend_extensions))
        self._buffer = buffer_bytes
        self._max_message = max_message_bytes
        self._marker = ping_marker
        self._pongs: list[tuple[str, bytes]] = []
        self.stats = RelayStats()
        # Only inflating compressed input can leave a backlog (relay.Relay.backlog).
        self.may_backlog = self._client.deflate or self._backend.deflate

    # --- the Relay contract ---------------------------------------------------------------

    @property
    def client_done(self) -> bool:
        return self._client.done

    @property
    def backend_done(self) -> bool:
        return self._backend.done

    @property
    def closing(self) -> bool:
        c, b = self._client, self._backend
        return c.state != OPEN or b.state != OPEN or c.failed or b.failed

    def take_for_client(self) -> bytes:
        return self._client.take()

    def take_for_backend(self) -> bytes:
        return self._backend.take()

    def feed_client(self, data: bytes) -> None:
        self.stats.client_bytes_in += len(data)
        self._feed(self._client, self._backend, data)

    def feed_backend(self, data: bytes) -> None:
        self.stats.backend_bytes_in += len(data)
        self._feed(self._backend, self._client, data)

    def backlog(self, side: str) -> bool:
        src = self._client if side == "client" else self._backend
        return bool(src.inbox) and not src.failed and src.state != CLOSED

    def resume(self, side: str) -> None:
        if side == "client":
            self._drain(self._client, self._backend)
        else:
            self._drain(self._backend, self._client)

    def close(self, *, client_code: int, backend_code: int, reason: str) -> None:
        c, b = self._client, self._backend
        if c.state == OPEN or b.state == OPEN:
            self.stats.closed_by("proxy")
            if self.stats.proxy_close is None:
                self.stats.proxy_close = CloseRecord(client_code, reason)
        if c.state == OPEN:
            self._send_close(c, client_code, reason)
        if b.state == OPEN:
            self._send_close(b, backend_code, reason)

    def abandon(self, side: str, *, other_code: int, reason: str) -> None:
        src, dst = (self._client, self._backend) if side == "client" else (self._backend, self._client)
        if src.done:
            return
        src.failed = True
        src.stop()
        src.out.clear()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(other_code, reason)
        self._close_other(dst, other_code, reason)

    def send_ping(self, to: str, payload: bytes) -> bool:
        hop = self._client if to == "client" else self._backend
        if hop.failed or hop.state != OPEN:
            return False
        if len(payload) > 125:
            raise ValueError("ping payload over 125 bytes")
        hop.out.append(_frame(0x80 | PING, payload, hop.mask_out))
        hop.own_pings.append(payload)
        del hop.own_pings[:-MAX_OWN_PINGS]
        return True

    def ping_waiting(self, to: str) -> bool:
        return False  # every frame is queued whole: a ping is never held behind one

    def take_pongs(self) -> list[tuple[str, bytes]]:
        if not self._pongs:
            return self._pongs
        pongs, self._pongs = self._pongs, []
        return pongs

    # --- reading a peer's stream ------------------------------------------------------------

    def _feed(self, src: _Hop, dst: _Hop, data: bytes) -> None:
        if src.failed or src.state == CLOSED:
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
        self._parse(src, dst, data if type(data) is bytes else bytes(data))

    def _drain(self, src: _Hop, dst: _Hop) -> None:
        """Parse the backlog, as far as the other peer's queue has room."""
        if not src.inbox:
            return
        if src.failed or src.state == CLOSED or src.state == REMOTE_CLOSING:
            src.inbox.clear()
            return
        data = bytes(src.inbox)
        src.inbox.clear()
        self._parse(src, dst, data)

    def _parse(self, src: _Hop, dst: _Hop, data: bytes) -> None:
        """Act on every frame (or piece of one) in `data`, the next bytes of src's stream."""
        if src.held:
            data = src.held + data
            src.held = b""
        n = len(data)
        pos = 0
        while pos < n:
            rem = src.remaining
            if rem:  # the rest of a frame begun in an earlier read
                end = pos + rem
                if end > n:
                    end = n
                ctl = src.ctl
                if ctl is None:
                    done = self._data(src, dst, data, -1, pos, end)
                    if done != end:
                        if done >= 0:  # the other peer's queue is full: the rest waits
                            src.inbox += memoryview(data)[done:]
                        return
                    pos = end
                    continue
                ctl += memoryview(data)[pos:end]
                src.remaining = rem - (end - pos)
                pos = end
                if not src.remaining:
                    src.ctl = None
                    payload = bytes(ctl) if src.key is None else _xor(bytes(ctl), src.key)
                    if not self._control(src, dst, src.opcode, payload):
                        return
                continue
            # A frame header starts at pos: check it the way wsproto did, in its order.
            avail = n - pos
            if avail < 2:
                src.held = data[pos:]
                return
            b0 = data[pos]
            b1 = data[pos + 1]
            op = b0 & 0x0F
            ln = b1 & 0x7F
            if not _OPCODE_OK[op]:
                self._protocol_error(src, dst, PROTOCOL_ERROR, f"Invalid opcode {op:#x}")
                return
            if op >= 8:
                if not b0 & 0x80:
                    self._protocol_error(src, dst, PROTOCOL_ERROR, "Invalid attempt to fragment control frame")
                    return
                if ln > 125:
                    self._protocol_error(src, dst, PROTOCOL_ERROR, "Control frame with payload len > 125")
                    return
            hl = 2
            if ln >= 126:
                if ln == 126:
                    hl = 4
                    if avail < 4:
                        src.held = data[pos:]
                        return
                    ln = (data[pos + 2] << 8) | data[pos + 3]
                    if ln < 126:
                        self._protocol_error(
                            src, dst, PROTOCOL_ERROR, "Payload length used 2 bytes when 1 would have sufficed"
                        )
                        return
                else:
                    hl = 10
                    if avail < 10:
                        src.held = data[pos:]
                        return
                    ln = _from_bytes(data[pos + 2 : pos + 10], "big")
                    if ln < 0x10000:
                        self._protocol_error(
                            src, dst, PROTOCOL_ERROR, "Payload length used 8 bytes when 2 would have sufficed"
                        )
                        return
                    if ln >> 63:
                        self._protocol_error(src, dst, PROTOCOL_ERROR, "8-byte payload length with non-zero MSB")
                        return
            rsv = b0 & 0x70
            if rsv:
                if src.deflate and rsv & 0x40 and (op == 0 or op >= 8):
                    self._protocol_error(src, dst, PROTOCOL_ERROR, "error in extension")
                    return
                if rsv != 0x40 or not src.deflate:
                    self._protocol_error(src, dst, PROTOCOL_ERROR, "Reserved bit set unexpectedly")
                    return
            if b1 & 0x80:
                if not src.masked_in:
                    self._protocol_error(src, dst, PROTOCOL_ERROR, "client received unexpected masked frame")
                    return
                hl += 4
                if avail < hl:
                    src.held = data[pos:]
                    return
                key: bytes | None = data[pos + hl - 4 : pos + hl]
            elif src.masked_in:
                self._protocol_error(src, dst, PROTOCOL_ERROR, "server received unexpected unmasked frame")
                return
            else:
                key = None
            start = pos
            pos += hl
            end = pos + ln
            if op >= 8:
                if end <= n:
                    payload = data[pos:end]
                    if key is not None and ln:
                        payload = _xor(payload, key)
                    pos = end
                    if not self._control(src, dst, op, payload):
                        return
                    continue
                src.ctl = bytearray(memoryview(data)[pos:])
                src.opcode = op
                src.key = key
                src.remaining = end - n
                return
            if op:
                if src.msg_op:
                    name = _OPCODE_NAME[op]
                    self._protocol_error(src, dst, PROTOCOL_ERROR, f"expected CONTINUATION, got <Opcode.{name}: {op}>")
                    return
                src.msg_op = src.out_op = op
                src.msg_z = rsv != 0
            elif not src.msg_op:
                self._protocol_error(src, dst, PROTOCOL_ERROR, "unexpected CONTINUATION")
                return
            if self._max_message is not None and not src.msg_z:
                # Not compressed: the frame's length is what it adds, refused before any of it
                # goes on (a compressed message is counted as it inflates).
                size = src.msg_bytes + ln
                if size > self._max_message:
                    self._too_big(src, dst)
                    return
                src.msg_bytes = size
            src.fin = b0 & 0x80
            src.key = key
            src.off = 0
            src.remaining = ln
            if end > n:
                end = n
            done = self._data(src, dst, data, start, pos, end)
            if done != end:
                if done >= 0:
                    src.inbox += memoryview(data)[done:]
                return
            pos = end

    def _data(self, src: _Hop, dst: _Hop, data: bytes, start: int, pos: int, end: int) -> int:
        """Act on data[pos:end], payload of src's current data frame; `start` is where the frame's
        header begins in `data` (-1: in an earlier read). Returns how far `data` was used: `end`,
        less if the rest must wait for room (compressed input), -1 if src must not be read on."""
        if src.msg_z:
            return self._inflate(src, dst, data, pos, end)
        k = end - pos
        rem = src.remaining - k
        src.remaining = rem
        last = not rem and src.fin
        stats = self.stats
        stats.data_frames += 1
        key = src.key
        fwd = dst.state == OPEN and not dst.failed
        if key is None:  # from the backend: the payload is plain already
            if src.msg_op == TEXT and not self._utf8_ok(src, dst, data[pos:end], last):
                return -1
            if fwd and (k or last):
                if start >= 0 and not rem and not dst.deflate and data[start] == src.out_op | src.fin:
                    # The whole frame is here and goes on unchanged (same opcode, FIN, length).
                    dst.out.append(data if end - start == len(data) else data[start:end])
                    src.out_op = 0
                else:
                    self._send(src, dst, data if k == len(data) else data[pos:end], last)
                if last:
                    stats.messages_to_client += 1
        else:  # from the client: masked, and going to the backend masked with a key of ours
            assert key is not None
            off = src.off & 3
            if off:
                key = key[off:] + key[:off]
            src.off += k
            raw = data[pos:end]
            if src.msg_op == TEXT or dst.deflate:
                plain = _xor(raw, key)
                if src.msg_op == TEXT and not self._utf8_ok(src, dst, plain, last):
                    return -1
                if fwd and (k or last):
                    self._send(src, dst, plain, last)
            elif fwd and (k or last):
                # Binary, not compressed either side: unmask and mask again in one pass.
                b0 = src.out_op | (0x80 if last else 0)
                src.out_op = 0
                new = _new_key()
                if k < 126:
                    head = bytes((b0, 0x80 | k))
                elif k < 0x10000:
                    head = _pack16(b0, 0xFE, k)
                else:
                    head = _pack64(b0, 0xFF, k)
                dst.out.append(head + new + _remask(raw, key, new))
            if fwd and last:
                stats.messages_to_backend += 1
        if last:
            src.msg_op = 0
            src.msg_bytes = 0
            src.utf8 = None
        return end

    def _inflate(self, src: _Hop, dst: _Hop, data: bytes, pos: int, end: int) -> int:
        """`_data` for a compressed message: inflate slice by slice while there is room."""
        k = end - pos
        raw = data[pos:end]
        key = src.key
        if key is not None:
            off = src.off & 3
            if off:
                key = key[off:] + key[:off]
            raw = _xor(raw, key)
        z = src.zin
        if z is None:
            z = src.zin = zlib.decompressobj(-src.zin_bits)
        fwd = dst.state == OPEN and not dst.failed
        used = sum(map(len, dst.out)) if fwd else 0
        room = self._buffer
        parts: list[bytes] = []
        used_in = 0
        try:
            while used_in < k and used < room:
                got = z.decompress(raw[used_in : used_in + DEFLATE_SLICE] if k > DEFLATE_SLICE else raw)
                used_in += DEFLATE_SLICE
                if got:
                    parts.append(got)
                    used += len(got)
            if used_in > k:
                used_in = k
            rem = src.remaining - used_in
            last = not rem and src.fin
            if last:
                parts.append(z.decompress(_SYNC_TAIL) + z.flush())
                if src.zin_reset:
                    src.zin = None
        except zlib.error:
            self._protocol_error(src, dst, INVALID_DATA, "error in extension")
            return -1
        if used_in < k and not used_in:
            return pos  # no room at all: all of it waits
        src.remaining = rem
        src.off += used_in
        self.stats.data_frames += 1
        plain = b"".join(parts) if len(parts) != 1 else parts[0]
        if self._max_message is not None:
            size = src.msg_bytes + len(plain)
            if size > self._max_message:
                self._too_big(src, dst)
                return -1
            src.msg_bytes = size
        if src.msg_op == TEXT and not self._utf8_ok(src, dst, plain, last):
            return -1
        if fwd and (plain or last):
            self._send(src, dst, plain, last)
            if last:
                if dst is self._client:
                    self.stats.messages_to_client += 1
                else:
                    self.stats.messages_to_backend += 1
        if last:
            src.msg_op = 0
            src.msg_z = False
            src.msg_bytes = 0
            src.utf8 = None
        return pos + used_in

    def _utf8_ok(self, src: _Hop, dst: _Hop, plain: bytes, last: bool) -> bool:
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

    def _send(self, src: _Hop, dst: _Hop, plain: bytes, last: bool) -> None:
        """Queue one frame of src's message for dst, compressed if dst negotiated deflate."""
        op = src.out_op
        src.out_op = 0
        b0 = op | 0x80 if last else op
        if dst.deflate:  # as wsproto does: every message compressed, RSV1 on its first frame
            if op:
                b0 |= 0x40
            z = dst.zout
            if z is None:
                z = dst.zout = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -dst.zout_bits)
            plain = z.compress(plain)
            if last:
                plain = (plain + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
                if dst.zout_reset:
                    dst.zout = None
        dst.out.append(_frame(b0, plain, dst.mask_out))

    def _control(self, src: _Hop, dst: _Hop, op: int, payload: bytes) -> bool:
        """Act on a whole control frame from src; False once src must not be read on."""
        if op == PING:
            if dst.state == OPEN and not dst.failed:
                dst.out.append(_frame(0x80 | PING, payload, dst.mask_out))
            return True
        if op == PONG:
            if payload.startswith(self._marker) and payload in src.own_pings:
                src.own_pings.remove(payload)
                self._pongs.append((src.name, payload))
            elif dst.state == OPEN and not dst.failed:
                dst.out.append(_frame(0x80 | PONG, payload, dst.mask_out))
            return True
        try:
            code, reason = _parse_close(payload)
        except ProtocolError as exc:
            self._protocol_error(src, dst, exc.code, exc.reason)
            return False
        src.state = CLOSED if src.state == LOCAL_CLOSING else REMOTE_CLOSING
        src.stop()  # nothing after a close frame is read
        self._peer_close(src, dst, code, reason)
        return False

    # --- closing ------------------------------------------------------------------------------

    def _send_close(self, hop: _Hop, code: int | None, reason: str) -> None:
        """Send a close frame if this hop may still send one (OPEN or REMOTE_CLOSING)."""
        if hop.failed or hop.state == LOCAL_CLOSING or hop.state == CLOSED:
            return
        hop.out.append(_frame(0x88, close_payload(code, reason), hop.mask_out))
        hop.state = LOCAL_CLOSING if hop.state == OPEN else CLOSED

    def _peer_close(self, src: _Hop, dst: _Hop, code: int | None, reason: str) -> None:
        self.stats.peer_closed(src.name, code, reason)
        if src.state == REMOTE_CLOSING:
            # The peer started closing: pass it on; its answer comes back when the other side
            # answers. If the other side cannot answer any more, answer the peer ourselves.
            if dst.state == OPEN and not dst.failed:
                self._send_close(dst, code, reason)
            else:
                self._send_close(src, code, reason)
        elif src.state == CLOSED and dst.state == REMOTE_CLOSING:
            # The peer answered a close we forwarded to it: complete the other hop with it.
            self._send_close(dst, code, reason)

    def _protocol_error(self, src: _Hop, dst: _Hop, code: int, reason: str) -> None:
        self._send_close(src, code, reason)
        src.failed = True
        src.stop()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(code, f"{src.name} protocol error: {reason}")
        other_code = GOING_AWAY if src is self._client else INTERNAL_ERROR
        other_reason = "client protocol error" if src is self._client else "backend protocol error"
        self._close_other(dst, other_code, other_reason)

    def _too_big(self, src: _Hop, dst: _Hop) -> None:
        reason = f"message over {self._max_message} bytes"
        self._send_close(src, TOO_BIG, reason)
        src.failed = True
        src.stop()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(TOO_BIG, f"{src.name} sent a {reason}")
        self._close_other(dst, GOING_AWAY, f"{src.name} sent a {reason}")

    def _peer_lost(self, src: _Hop, dst: _Hop) -> None:
        """The peer's stream ended. Without a finished closing handshake, it vanished."""
        src.state = CLOSED
        src.failed = True
        src.stop()
        if self.stats.client_close is None and src is self._client:
            self.stats.client_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by("client")
        elif self.stats.backend_close is None and src is self._backend:
            self.stats.backend_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by("backend")
        if src is self._client:
            self._close_other(dst, GOING_AWAY, "client went away")
        else:
            self._close_other(dst, INTERNAL_ERROR, "backend connection lost")

    def _close_other(self, dst: _Hop, code: int, reason: str) -> None:
        if dst.state == OPEN:
            self._send_close(dst, code, reason)
        elif dst.state == REMOTE_CLOSING:
            # The other peer was waiting for an answer to its close: give it its own code back.
            rec = self.stats.client_close if dst is self._client else self.stats.backend_close
            self._send_close(dst, rec.code if rec else code, rec.reason if rec else reason)
