"""frames.py: any split of a frame stream parses the same; bad streams earn the right close code."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from wsproxy.protocol import frames
from wsproxy.protocol.frames import (
    BINARY,
    CLOSE,
    CONTINUATION,
    ERROR,
    HEADER,
    NEED_DATA,
    PAYLOAD,
    PING,
    PONG,
    TEXT,
    FrameParser,
    ProtocolError,
    apply_mask,
    build_close,
    build_frame,
    build_ping,
    parse_close,
    valid_wire_close_code,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A pool of payload bytes to slice from, so big payloads cost no generation time.
_POOL = bytes((i * 131 + 7) % 256 for i in range(140_000))


@dataclass(frozen=True)
class F:
    """One frame as the test builds it and as the parser must report it."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    mask: bytes | None = None

    def encode(self) -> bytes:
        """Reference serializer, independent of frames.build_frame."""
        n = len(self.payload)
        b0 = (0x80 if self.fin else 0) | self.rsv | self.opcode
        m = 0x80 if self.mask is not None else 0
        if n < 126:
            head = bytes((b0, m | n))
        elif n < 65536:
            head = bytes((b0, m | 126)) + struct.pack("!H", n)
        else:
            head = bytes((b0, m | 127)) + struct.pack("!Q", n)
        if self.mask is None:
            return head + self.payload
        stream = (self.mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(self.payload) ^ int.from_bytes(stream)).to_bytes(n)
        return head + self.mask + body


def run(parser: FrameParser, chunks: list[bytes]) -> tuple[list[F], int, bytes]:
    """Drive the parser like the relay does; return frames, error code, the bytes it covered."""
    got: list[F] = []
    covered = bytearray()
    cur: dict | None = None
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            kind, end = parser.next_event(chunk, pos)
            assert pos <= end <= len(chunk)
            assert len(parser._held) <= frames.MAX_HEADER
            if kind == HEADER:
                assert end > pos
                covered += parser.prefix + chunk[pos:end]
                cur = {
                    "opcode": parser.opcode,
                    "fin": parser.fin,
                    "rsv": parser.rsv,
                    "mask": parser.mask,
                    "payload": bytearray(),
                    "length": parser.length,
                }
                got.append(cur)  # type: ignore[arg-type]
            elif kind == PAYLOAD:
                assert end > pos
                assert cur is not None
                cur["payload"] += chunk[pos:end]
                covered += chunk[pos:end]
            elif kind == NEED_DATA:
                assert end == len(chunk)
            else:
                assert kind == ERROR
                return [_frame(g) for g in got], parser.error_code, bytes(covered)
            pos = end
    return [_frame(g) for g in got], 0, bytes(covered)


def _frame(g: dict) -> F:
    raw = bytes(g["payload"])
    assert len(raw) <= g["length"]
    payload = apply_mask(raw, g["mask"]) if g["mask"] is not None else raw
    return F(g["opcode"], payload, g["fin"], g["rsv"], g["mask"])


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# --- strategies ---------------------------------------------------------------------------

sizes = st.one_of(
    st.integers(0, 140),
    st.sampled_from([125, 126, 127, 65535, 65536, 70_000]),
)


@st.composite
def payloads(draw: st.DrawFn, max_size: int | None = None) -> bytes:
    n = draw(sizes if max_size is None else st.integers(0, max_size))
    start = draw(st.integers(0, 1000))
    return _POOL[start : start + n]


@st.composite
def streams(draw: st.DrawFn, masked: bool, deflate: bool = False, big: bool = True) -> list[F]:
    """Valid frames: messages of 1-4 fragments with control frames between fragments."""
    out: list[F] = []

    def key() -> bytes | None:
        return draw(st.binary(min_size=4, max_size=4)) if masked else None

    def control() -> F:
        op = draw(st.sampled_from([PING, PONG, CLOSE]))
        body = draw(payloads(max_size=125)) if op != CLOSE else b"\x03\xe8bye"
        return F(op, body, mask=key())

    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            out.append(control())
        nfrag = draw(st.integers(1, 4))
        rsv = 0x40 if deflate and draw(st.booleans()) else 0
        for i in range(nfrag):
            op = draw(st.sampled_from([TEXT, BINARY])) if i == 0 else CONTINUATION
            out.append(
                F(
                    op,
                    draw(payloads(None if big else 200)),
                    i == nfrag - 1,
                    rsv if i == 0 else 0,
                    key(),
                ),
            )
            if i < nfrag - 1 and draw(st.booleans()):
                out.append(control())
    return out


# --- properties -----------------------------------------------------------------------------


@FAST
@given(data=st.data(), masked=st.booleans(), deflate=st.booleans())
def test_any_split_gives_the_same_frames_and_payload(data, masked, deflate):
    model = data.draw(streams(masked, deflate))
    wire = b"".join(f.encode() for f in model)
    cuts = data.draw(st.lists(st.integers(0, max(len(wire), 1)), max_size=40))
    got, err, covered = run(FrameParser(masked=masked, rsv1_allowed=deflate), split_at(wire, cuts))
    assert err == 0
    assert got == model
    assert covered == wire  # header bytes + payload ranges are exactly the stream


@FAST
@given(data=st.data())
def test_byte_at_a_time_matches_whole(data):
    model = data.draw(streams(masked=True).filter(lambda s: sum(len(f.payload) for f in s) < 3000))
    wire = b"".join(f.encode() for f in model)
    whole, _, _ = run(FrameParser(masked=True), [wire])
    trickled, _, _ = run(FrameParser(masked=True), [wire[i : i + 1] for i in range(len(wire))])
    assert whole == trickled == model


def _largest_message(stream: list[F]) -> int:
    largest = total = 0
    for f in stream:
        if f.opcode < 8:
            total = len(f.payload) + (total if f.opcode == CONTINUATION else 0)
            largest = max(largest, total)
    return largest


def _h(b0: int, b1: int, ext: bytes = b"", mask: bytes | None = b"abcd") -> bytes:
    return bytes((b0, b1)) + ext + (mask or b"")


# (name, masked parser?, rsv1 allowed?, max bytes, bad bytes after a valid prefix, code)
BAD = [
    *[
        (f"reserved opcode {op:#x}", True, False, None, _h(0x80 | op, 0x80), 1002)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ],
    ("control payload over 125", True, False, None, _h(0x89, 0x80 | 126, b"\x00\x7e"), 1002),
    ("fragmented ping", True, False, None, _h(0x09, 0x80), 1002),
    ("fragmented close", True, False, None, _h(0x08, 0x80), 1002),
    (
        "64-bit length with top bit",
        True,
        False,
        None,
        _h(0x82, 0x80 | 127, b"\x80" + b"\x00" * 7),
        1002,
    ),
    ("continuation without message", True, False, None, _h(0x80, 0x80), 1002),
    ("text inside a message", True, False, None, _h(0x01, 0x80) + _h(0x81, 0x80), 1002),
    ("unmasked client frame", True, False, None, _h(0x81, 0x00, mask=None), 1002),
    ("masked backend frame", False, False, None, _h(0x81, 0x80), 1002),
    ("rsv1 without extension", True, False, None, _h(0xC1, 0x80), 1002),
    ("rsv2", True, True, None, _h(0xA1, 0x80), 1002),
    ("rsv3", True, True, None, _h(0x91, 0x80), 1002),
    ("rsv1 on continuation", True, True, None, _h(0x41, 0x80) + _h(0xC0, 0x80), 1002),
    ("rsv1 on ping", True, True, None, _h(0xC9, 0x80), 1002),
    ("16-bit length under 126", True, False, None, _h(0x82, 0x80 | 126, b"\x00\x7d"), 1002),
    ("64-bit length under 65536", True, False, None, _h(0x82, 0x80 | 127, bytes(8)), 1002),
    ("message over the limit", True, False, 100, _h(0x82, 0x80 | 101) + bytes(101), 1009),
    (
        "fragments over the limit",
        True,
        False,
        100,
        _h(0x02, 0x80 | 60) + bytes(60) + _h(0x80, 0x80 | 41),
        1009,
    ),
]


@pytest.mark.parametrize(
    ("masked", "rsv1", "limit", "bad", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_invalid_stream_earns_its_close_code(data, masked, rsv1, limit, bad, code):
    prefix = data.draw(
        streams(masked, big=False).filter(
            lambda s: all(f.opcode != CLOSE for f in s) and _largest_message(s) <= (limit or 1 << 20)
        )
    )
    good = b"".join(f.encode() for f in prefix)
    wire = good + bad + data.draw(st.binary(max_size=20))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    got, err, _ = run(FrameParser(masked=masked, rsv1_allowed=rsv1, max_message_bytes=limit), split_at(wire, cuts))
    assert err == code
    assert got[: len(prefix)] == prefix


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=20),
    masked=st.booleans(),
)
def test_garbage_never_raises_or_hangs(garbage, cuts, masked):
    _, err, _ = run(FrameParser(masked=masked, max_message_bytes=1000), split_at(garbage, cuts))
    assert err in (0, 1002, 1009)


def test_after_an_error_the_parser_stays_failed():
    p = FrameParser(masked=True)
    assert p.next_event(b"\x83\x80abcd")[0] == ERROR
    assert p.next_event(F(BINARY, b"x", mask=b"abcd").encode())[0] == ERROR


def test_error_is_seen_from_the_first_two_bytes():
    # No need to wait for a 64-bit length and a mask key to know an opcode is reserved.
    p = FrameParser(masked=True)
    assert p.next_event(b"\x83\xff") == (ERROR, 0)
    assert p.error_code == 1002


def test_payload_is_not_buffered():
    """A 1 MB frame fed in pieces: the parser holds nothing but counts down."""
    p = FrameParser(masked=False)
    head = b"\x82\x7f" + struct.pack("!Q", 1 << 20)
    assert p.next_event(head) == (HEADER, 10)
    piece = bytes(65536)
    for _ in range(16):
        assert p.next_event(piece) == (PAYLOAD, 65536)
        assert p._held == b""
    assert p.remaining == 0 and p.at_boundary


# --- known frames from wsproto's serializer -----------------------------------------------


def _one(parser: FrameParser, wire: bytes) -> F:
    got, err, _ = run(parser, [wire])
    assert err == 0 and len(got) == 1
    return got[0]


@pytest.mark.parametrize("client", [True, False], ids=["masked", "unmasked"])
def test_wsproto_frames_parse(client):
    proto = FrameProtocol(client=client, extensions=[])
    parser = FrameParser(masked=client)
    text = _one(parser, bytes(proto.send_data("héllo")))
    assert (text.opcode, text.fin, text.payload) == (TEXT, True, "héllo".encode())
    assert (text.mask is not None) is client
    big = _one(parser, bytes(proto.send_data(b"\x01" * 70_000)))
    assert (big.opcode, len(big.payload), big.payload[:3]) == (BINARY, 70_000, b"\x01\x01\x01")
    mid = _one(parser, bytes(proto.send_data(b"a" * 300, fin=False)))
    assert (mid.opcode, mid.fin, len(mid.payload)) == (BINARY, False, 300)
    assert parser.in_message
    end = _one(parser, bytes(proto.send_data(b"b", fin=True)))
    assert (end.opcode, end.fin, end.payload) == (CONTINUATION, True, b"b")
    assert not parser.in_message and parser.message_bytes == 301
    assert _one(parser, bytes(proto.ping(b"p"))).payload == b"p"
    assert _one(parser, bytes(proto.pong(b"q"))).opcode == PONG
    close = _one(parser, bytes(proto.close(4001, "done")))
    assert parse_close(close.payload) == (4001, "done")


def test_wsproto_deflate_frames_have_rsv1_on_the_first_frame_only():
    client, server = PerMessageDeflate(), PerMessageDeflate()
    client.finalize(server.accept(client.offer()))
    proto = FrameProtocol(client=True, extensions=[client])
    parser = FrameParser(masked=True, rsv1_allowed=True)
    first = _one(parser, bytes(proto.send_data("x" * 500, fin=False)))
    rest = _one(parser, bytes(proto.send_data("y" * 500, fin=True)))
    assert first.rsv == 0x40 and rest.rsv == 0
    # The same bytes are illegal where the extension was not negotiated.
    _, err, _ = run(FrameParser(masked=True), [bytes(proto.send_data("z"))])
    assert err == 1002


# --- close payloads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000, 4999],
)
def test_valid_close_codes(code):
    assert parse_close(struct.pack("!H", code) + "bye ✓".encode()) == (code, "bye ✓")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_protocol_errors(code):
    with pytest.raises(ProtocolError) as exc:
        parse_close(struct.pack("!H", code))
    assert exc.value.code == 1002


def test_close_payload_edge_cases():
    assert parse_close(b"") == (None, "")
    with pytest.raises(ProtocolError) as one_byte:
        parse_close(b"\x03")
    assert one_byte.value.code == 1002
    with pytest.raises(ProtocolError) as bad_utf8:
        parse_close(b"\x03\xe8\xff\xfe")
    assert bad_utf8.value.code == 1007


def test_close_code_validity_matches_wsproto():
    """The inspect relay (wsproto) and the passthrough relay must agree on every code."""
    for code in range(0, 5100):
        proto = FrameProtocol(client=False, extensions=[])
        proto.receive_bytes(F(CLOSE, struct.pack("!H", code), mask=b"\x01\x02\x03\x04").encode())
        try:
            list(proto.received_frames())
            wsproto_ok = True
        except ParseFailed:
            wsproto_ok = False
        assert valid_wire_close_code(code) is wsproto_ok, code


# --- building and masking -----------------------------------------------------------------


@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_apply_mask_is_xor_with_the_key(payload, key):
    masked = apply_mask(payload, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert apply_mask(masked, key) == payload


def test_built_close_towards_backend_is_masked_and_valid():
    backend = Connection(ConnectionType.SERVER)  # rejects unmasked frames
    backend.receive_data(build_close(1001, "going away", mask=True))
    assert list(backend.events()) == [CloseConnection(1001, "going away")]


def test_built_close_towards_client_is_unmasked_and_valid():
    client = Connection(ConnectionType.CLIENT)  # rejects masked frames
    client.receive_data(build_close(1011, "", mask=False))
    assert list(client.events()) == [CloseConnection(1011, "")]


@pytest.mark.parametrize("code", [None, 1005, 1006])
def test_no_code_builds_an_empty_close(code):
    assert build_close(code, "ignored", mask=False) == b"\x88\x00"


def test_close_reason_is_cut_at_a_character_boundary():
    frame = build_close(1000, "é" * 100, mask=False)
    assert len(frame) <= 2 + 125
    code, reason = parse_close(frame[2:])
    assert code == 1000 and reason == "é" * 61


def test_built_ping_towards_backend_is_masked_with_a_fresh_key():
    a = build_ping(b"wsproxy:1", mask=True)
    assert a[1] & 0x80
    assert len({build_ping(b"wsproxy:1", mask=True)[2:6] for _ in range(8)}) > 1
    backend = Connection(ConnectionType.SERVER)
    backend.receive_data(a)
    assert list(backend.events()) == [Ping(b"wsproxy:1")]
    with pytest.raises(ValueError):
        build_ping(bytes(126), mask=True)


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_build_frame_lengths_round_trip(n):
    wire = build_frame(BINARY, _POOL[:n], mask=True)
    assert _one(FrameParser(masked=True), wire).payload == _POOL[:n]
