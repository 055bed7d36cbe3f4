"""InspectRelay, sans-I/O: bytes fed in, frames checked where they come out.

The relay parses each hop itself (no wsproto on the hot path), so these tests feed it raw frame
streams cut anywhere and read what it queued: with our own frame parser (to see the frames and
their masks as they are on the wire) or with a real wsproto peer (to see what an endpoint makes of
them, deflate included). Parity with the wsproto-based relay it replaced is checked against
wsproto itself: the close code and reason a bad stream earns are the ones wsproto gives.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from wsproxy.protocol.frames import ERROR, HEADER, NEED_DATA, PAYLOAD, FrameParser, apply_mask
from wsproxy.protocol.relay import CloseRecord
from wsproxy.protocol.relay_inspect import InspectRelay

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ----------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, key: bytes | None = b"k3y!") -> bytes:
    """A frame as a peer would send it: masked with `key` (a client's) or not (key=None)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if key is not None else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if key is None:
        return head + payload
    return head + key + apply_mask(payload, key)


def wire_frames(
    data: bytes, *, masked: bool, parser: FrameParser | None = None
) -> list[tuple[int, bool, int, bytes | None, bytes]]:
    """(opcode, fin, rsv, mask key, unmasked payload) of every frame in a relay's output; the
    output must be a valid stream, whole frames only. Pass `parser` to go on with a stream."""
    parser = parser or FrameParser(masked=masked, rsv1_allowed=True)
    out: list[tuple[int, bool, int, bytes | None, bytes]] = []
    pos, payload = 0, b""
    while pos < len(data):
        kind, end = parser.next_event(data, pos)
        assert kind not in (ERROR, NEED_DATA), parser.error_reason or "a cut frame"
        if kind == HEADER:
            payload = b""
        elif kind == PAYLOAD:
            payload += data[pos:end]
        if (kind == PAYLOAD or (kind == HEADER and parser.length == 0)) and not parser.remaining:
            body = apply_mask(payload, parser.mask) if parser.mask else payload
            out.append((parser.opcode, parser.fin, parser.rsv, parser.mask, body))
        pos = end
    assert parser.at_boundary
    return out


def messages(frames: list[tuple[int, bool, int, bytes | None, bytes]]) -> list[tuple[int, bytes]]:
    """Data messages (opcode, payload joined across fragments) and control frames, in order."""
    out: list[tuple[int, bytes]] = []
    op, parts = 0, []
    for opcode, fin, _, _, payload in frames:
        if opcode >= 8:
            out.append((opcode, payload))
            continue
        if opcode:
            op, parts = opcode, []
        parts.append(payload)
        if fin:
            out.append((op, b"".join(parts)))
    return out


def split(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 5, 13, 200, 4096, 70_000))
        out.append(data[pos : pos + n])
        pos += n
    return out


class Peer:
    """A wsproto endpoint reading what the relay queued for it."""

    def __init__(self, kind: ConnectionType, extensions: list | None = None) -> None:
        self.conn = Connection(kind, extensions=extensions)
        self.parts: list = []

    def read(self, data: bytes) -> list[tuple]:
        self.conn.receive_data(data)
        seen: list[tuple] = []
        for ev in self.conn.events():
            if isinstance(ev, Message):
                self.parts.append(ev.data)
                if ev.message_finished:
                    joined = "".join(self.parts) if isinstance(ev, TextMessage) else b"".join(self.parts)
                    seen.append(("text" if isinstance(ev, TextMessage) else "bytes", joined))
                    self.parts = []
            elif isinstance(ev, Ping | Pong):
                seen.append((type(ev).__name__.lower(), bytes(ev.payload)))
            elif isinstance(ev, CloseConnection):
                seen.append(("close", int(ev.code), ev.reason or ""))
        return seen


def deflate_pair(**params) -> tuple[PerMessageDeflate, PerMessageDeflate]:
    """(the client's side, the server's side) of one negotiated permessage-deflate."""
    client, server = PerMessageDeflate(**params), PerMessageDeflate()
    answer = server.accept(f"permessage-deflate; {client.offer()}")  # both parse past the name
    client.finalize(f"permessage-deflate; {answer}")
    for name in ("client_max_window_bits", "server_max_window_bits"):
        assert getattr(client, name) == getattr(server, name) == params.get(name, 15)
    for name in ("client_no_context_takeover", "server_no_context_takeover"):
        assert getattr(client, name) == getattr(server, name) == params.get(name, False)
    return client, server


def closes(data: bytes, *, masked: bool) -> list[tuple[int, str]]:
    out = []
    for op, _, _, _, payload in wire_frames(data, masked=masked):
        if op == 8:
            code = struct.unpack("!H", payload[:2])[0] if payload else 1005
            out.append((code, payload[2:].decode()))
    return out


# --- split reads, streaming, re-framing ---------------------------------------------------------


def other_answers(relay: InspectRelay, *, client_at_fault: bool) -> None:
    """The other peer answers the close the proxy sent it on a protocol error: only then does
    the erring peer get its own close (the other's replies in flight reach it first)."""
    if client_at_fault:
        relay.feed_backend(frame(8, struct.pack("!H", 1001), key=None))
    else:
        relay.feed_client(frame(8, struct.pack("!H", 1011)))


def test_header_and_payload_split_anywhere_and_many_frames_per_read():
    stream = (
        frame(2, b"a" * 70_000)
        + frame(1, "héllo".encode())
        + frame(9, b"ping")
        + frame(2, b"")
        + frame(2, bytes(range(256)) * 3)
    )
    for cut in (1, 2, 3, 7, 13, len(stream)):
        relay = InspectRelay()
        out = b""
        for i in range(0, len(stream), cut):
            relay.feed_client(stream[i : i + cut])
            out += relay.take_for_backend()
        assert messages(wire_frames(out, masked=True)) == [
            (2, b"a" * 70_000),
            (1, "héllo".encode()),
            (9, b"ping"),
            (2, b""),
            (2, bytes(range(256)) * 3),
        ]
        assert relay.stats.messages_to_backend == 4
        assert relay.take_for_client() == b"" and not relay.closing


def test_frames_to_the_backend_each_get_a_fresh_mask_key():
    relay = InspectRelay()
    relay.feed_client(frame(2, b"same payload") * 50)
    got = wire_frames(relay.take_for_backend(), masked=True)
    keys = [key for _, _, _, key, _ in got]
    assert len(got) == 50 and all(key and len(key) == 4 for key in keys)
    assert len(set(keys)) > 45  # random 32-bit keys: a repeat among 50 is rare, many are impossible
    assert b"k3y!" not in keys
    assert {payload for *_, payload in got} == {b"same payload"}


def test_a_whole_backend_frame_passes_to_the_client_unchanged():
    relay = InspectRelay()
    wire = frame(2, b"x" * 1000, key=None) + frame(1, b"text", key=None)
    relay.feed_backend(wire)
    assert relay.take_for_client() == wire
    assert relay.stats.messages_to_client == 2


def test_a_large_frame_streams_in_pieces_and_is_never_held_whole():
    size = 4 << 20
    payload = bytes(range(256)) * (size // 256)
    wire = frame(2, payload)
    relay = InspectRelay()
    peer = Peer(ConnectionType.SERVER)
    got = b""
    pieces = 0
    for i in range(0, len(wire), 65_536):
        relay.feed_client(wire[i : i + 65_536])
        out = relay.take_for_backend()
        assert 0 < len(out) <= 65_536 + 14  # each read goes on at once, as a frame of its own
        pieces += 1
        got += out
    assert pieces > 60
    assert peer.read(got) == [("bytes", payload)]
    assert relay.stats.messages_to_backend == 1


def test_fragmented_message_keeps_its_opcode_boundaries_and_order():
    relay = InspectRelay()
    stream = (
        frame(1, b"frag", fin=False)
        + frame(9, b"between")
        + frame(0, b"men", fin=False)
        + frame(0, b"ted", fin=True)
        + frame(2, b"next")
    )
    relay.feed_client(stream)
    got = wire_frames(relay.take_for_backend(), masked=True)
    assert [(op, fin, body) for op, fin, _, _, body in got] == [
        (1, False, b"frag"),
        (9, True, b"between"),
        (0, False, b"men"),
        (0, True, b"ted"),
        (2, True, b"next"),
    ]
    assert relay.stats.messages_to_backend == 2


def test_an_empty_first_fragment_still_gives_the_message_its_opcode():
    relay = InspectRelay()
    relay.feed_backend(frame(1, b"", fin=False, key=None) + frame(0, b"abc", key=None))
    assert Peer(ConnectionType.CLIENT).read(relay.take_for_client()) == [("text", "abc")]


def test_control_frame_split_across_reads_is_forwarded_whole():
    relay = InspectRelay()
    wire = frame(2, b"d" * 10, fin=False) + frame(9, b"p" * 100) + frame(0, b"e" * 10)
    out = b""
    for i in range(len(wire)):
        relay.feed_client(wire[i : i + 1])
        out += relay.take_for_backend()
    got = wire_frames(out, masked=True)
    assert [(op, body) for op, _, _, _, body in got if op == 9] == [(9, b"p" * 100)]
    assert messages(got) == [(9, b"p" * 100), (2, b"d" * 10 + b"e" * 10)]


def test_mask_phase_carries_across_reads_of_one_frame():
    payload = bytes(range(251)) * 40
    wire = frame(2, payload, key=b"\x01\x82\x43\xf4")
    relay = InspectRelay()
    out = b""
    for cut in (3, 9, 10, 11, 17, 1000, 1001, 5000):  # every phase of the key
        relay.feed_client(wire[:cut])
        wire = wire[cut:]
        out += relay.take_for_backend()
    relay.feed_client(wire)
    out += relay.take_for_backend()
    assert messages(wire_frames(out, masked=True)) == [(2, payload)]


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A valid client frame stream and the messages (and pings) it carries."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    wire = b""
    expected: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "binary", "ping"]))
        if kind == "ping":
            body = draw(st.binary(max_size=125))
            wire += frame(9, body, key=rng.randbytes(4))
            expected.append((9, body))
            continue
        if kind == "text":
            body = draw(st.text(max_size=300)).encode()
        else:
            body = rng.randbytes(draw(st.sampled_from([0, 1, 5, 125, 126, 600, 65_535, 65_536, 70_001])))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for i, part in enumerate(parts):  # fragments may split a UTF-8 character: still valid
            op = (1 if kind == "text" else 2) if i == 0 else 0
            wire += frame(op, part, fin=i == len(parts) - 1, key=rng.randbytes(4))
            if i < len(parts) - 1 and draw(st.booleans()):
                wire += frame(9, b"mid", key=rng.randbytes(4))
                expected.append((9, b"mid"))
        expected.append((1 if kind == "text" else 2, body))
    return wire, expected


@FAST
@given(stream=client_streams(), cuts=st.lists(st.integers(0, 300_000), max_size=12))
def test_any_split_of_a_client_stream_gives_the_backend_the_same_messages(stream, cuts):
    wire, expected = stream
    points = sorted({c % (len(wire) + 1) for c in cuts})
    relay = InspectRelay()
    out = b""
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        if b > a:
            relay.feed_client(wire[a:b])
            out += relay.take_for_backend()
    whole = InspectRelay()
    whole.feed_client(wire)
    assert messages(wire_frames(out, masked=True)) == expected
    assert messages(wire_frames(whole.take_for_backend(), masked=True)) == expected
    assert relay.stats.proxy_close is None and not relay.closing
    assert relay.stats.messages_to_backend == sum(1 for op, _ in expected if op < 8)


@FAST
@given(stream=client_streams(), seed=st.integers(0, 2**16))
def test_any_split_of_a_backend_stream_gives_the_client_the_same_messages(stream, seed):
    wire, expected = stream
    # The same frames unmasked, as a backend sends them.
    unmasked = b"".join(frame(op, body, fin=fin, key=None) for op, fin, _, _, body in wire_frames(wire, masked=True))
    relay = InspectRelay()
    out = b""
    for chunk in split(unmasked, random.Random(seed)):
        relay.feed_backend(chunk)
        out += relay.take_for_client()
    assert messages(wire_frames(out, masked=False)) == expected


# --- UTF-8 -------------------------------------------------------------------------------------


def test_utf8_character_split_across_fragments_and_reads_is_valid():
    text = "€uro ✓ 𝄞".encode()
    relay = InspectRelay()
    stream = frame(1, text[:1], fin=False) + frame(0, text[1:9], fin=False) + frame(0, text[9:])
    for i in range(len(stream)):
        relay.feed_client(stream[i : i + 1])
    assert relay.stats.proxy_close is None
    assert Peer(ConnectionType.SERVER).read(relay.take_for_backend()) == [("text", "€uro ✓ 𝄞")]


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([b"ok\xff"], id="invalid byte"),
        pytest.param([b"\xe2\x82", b"A"], id="bad continuation in the next fragment"),
        pytest.param([b"abc\xe2\x82"], id="cut character at the end of the message"),
        pytest.param([b"\xed\xa0\x80"], id="surrogate"),
    ],
)
@pytest.mark.parametrize("from_client", [True, False], ids=["client", "backend"])
def test_invalid_utf8_in_text_gets_1007_and_the_other_side_1001_or_1011(parts, from_client):
    relay = InspectRelay()
    key = b"abcd" if from_client else None
    wire = b"".join(frame(0 if i else 1, p, fin=i == len(parts) - 1, key=key) for i, p in enumerate(parts))
    (relay.feed_client if from_client else relay.feed_backend)(wire)
    other_answers(relay, client_at_fault=from_client)
    to_sender = relay.take_for_client() if from_client else relay.take_for_backend()
    to_other = relay.take_for_backend() if from_client else relay.take_for_client()
    assert [c for c, _ in closes(to_sender, masked=not from_client)] == [1007]
    assert closes(to_other, masked=from_client)[-1][0] == (1001 if from_client else 1011)
    assert relay.stats.proxy_close is not None and relay.stats.proxy_close.code == 1007
    assert relay.client_done if from_client else relay.backend_done


def test_binary_messages_are_not_checked_for_utf8():
    relay = InspectRelay()
    relay.feed_client(frame(2, b"\xff\xfe"))
    assert relay.stats.proxy_close is None
    assert messages(wire_frames(relay.take_for_backend(), masked=True)) == [(2, b"\xff\xfe")]


# --- protocol errors: the codes and reasons wsproto gave ---------------------------------------


BAD_CLIENT_STREAMS = [
    ("reserved opcode", frame(0x3, b"")),
    ("reserved control opcode", frame(0xB, b"")),
    ("fragmented ping", frame(0x9, b"", fin=False)),
    ("control over 125", b"\x89\xfe\x00\x7e" + b"k3y!" + bytes(126)),
    ("16-bit length for 5 bytes", b"\x82\xfe\x00\x05k3y!" + bytes(5)),
    ("64-bit length for 200 bytes", b"\x82\xff" + struct.pack("!Q", 200) + b"k3y!" + bytes(200)),
    ("64-bit length msb", b"\x82\xff" + struct.pack("!Q", (1 << 63) | 70_000) + b"k3y!"),
    ("rsv1 without deflate", frame(0x1, b"x", rsv=0x40)),
    ("rsv2", frame(0x2, b"x", rsv=0x20)),
    ("unmasked", frame(0x2, b"x", key=None)),
    ("continuation first", frame(0x0, b"x")),
    ("new message inside a message", frame(0x1, b"a", fin=False) + frame(0x2, b"b")),
    ("text inside a message", frame(0x2, b"a", fin=False) + frame(0x1, b"b")),
    ("1-byte close", frame(0x8, b"\x03")),
    ("close code 999", frame(0x8, struct.pack("!H", 999))),
    ("close code 5000", frame(0x8, struct.pack("!H", 5000))),
    ("close code 1005", frame(0x8, struct.pack("!H", 1005))),
    ("close code 1015", frame(0x8, struct.pack("!H", 1015))),
    ("close code 1004", frame(0x8, struct.pack("!H", 1004))),
    ("close code 2999", frame(0x8, struct.pack("!H", 2999))),
    ("bad utf-8 close reason", frame(0x8, b"\x03\xe8\xff")),
    ("bad utf-8 text", frame(0x1, b"ab\xc3\x28")),
]


@pytest.mark.parametrize("bad", [pytest.param(b, id=name) for name, b in BAD_CLIENT_STREAMS])
def test_a_bad_client_stream_gets_the_close_wsproto_gives(bad):
    reference = Connection(ConnectionType.SERVER)
    reference.receive_data(bad)
    want = [e for e in reference.events() if isinstance(e, CloseConnection)]
    assert want and want[0].code in (1002, 1007)
    relay = InspectRelay()
    relay.feed_client(frame(2, b"before") + bad)
    assert relay.take_for_client() == b""  # the backend hears first; its replies may still come
    other_answers(relay, client_at_fault=True)
    assert closes(relay.take_for_client(), masked=False) == [(int(want[0].code), want[0].reason)]
    to_backend = relay.take_for_backend()
    assert messages(wire_frames(to_backend, masked=True))[0] == (2, b"before")
    assert closes(to_backend, masked=True) == [(1001, "client protocol error")]
    assert relay.stats.proxy_close == CloseRecord(int(want[0].code), f"client protocol error: {want[0].reason}")
    assert relay.client_done and relay.closing


def test_a_masked_backend_frame_gets_1002_and_the_client_1011():
    relay = InspectRelay()
    relay.feed_backend(frame(2, b"x"))
    other_answers(relay, client_at_fault=False)
    assert closes(relay.take_for_backend(), masked=True) == [(1002, "client received unexpected masked frame")]
    assert closes(relay.take_for_client(), masked=False) == [(1011, "backend protocol error")]


def test_bytes_after_a_protocol_error_are_ignored():
    relay = InspectRelay()
    relay.feed_client(frame(0x3) + frame(2, b"never"))
    relay.take_for_backend()
    relay.feed_client(frame(2, b"never either"))
    assert relay.take_for_backend() == b""


# --- closing ------------------------------------------------------------------------------------


def test_close_passes_end_to_end_and_the_answer_completes_both_hops():
    relay = InspectRelay()
    relay.feed_client(frame(8, struct.pack("!H", 4000) + "bye ✓".encode()))
    assert closes(relay.take_for_backend(), masked=True) == [(4000, "bye ✓")]
    assert relay.closing and not relay.client_done and not relay.backend_done
    relay.feed_client(frame(2, b"after the close"))  # ignored: nothing follows a close
    relay.feed_backend(frame(8, struct.pack("!H", 4000) + "bye ✓".encode(), key=None))
    assert closes(relay.take_for_client(), masked=False) == [(4000, "bye ✓")]
    assert relay.take_for_backend() == b""
    assert relay.client_done and relay.backend_done
    assert relay.stats.client_close == CloseRecord(4000, "bye ✓")
    assert relay.stats.first_closer == "client"


def test_data_from_a_peer_we_sent_a_close_to_still_passes_until_its_answer():
    relay = InspectRelay()
    relay.feed_backend(frame(8, struct.pack("!H", 1001), key=None))  # backend closes first
    relay.take_for_client()
    relay.feed_client(frame(2, b"late"))  # the client had not seen it yet; the backend is closing
    assert relay.take_for_backend() == b""
    relay.close(client_code=1001, backend_code=1001, reason="stop")  # both hops closing already
    assert relay.take_for_client() == b""


# --- permessage-deflate per hop -----------------------------------------------------------------


def deliver(relay: InspectRelay, side: str, data: bytes, size: int = 2048) -> bytes:
    """Feed `data` from `side` in reads of `size` like the session does (taking what is queued
    for the other side after each, working off any backlog); return all of that."""
    feed = relay.feed_client if side == "client" else relay.feed_backend
    take = relay.take_for_backend if side == "client" else relay.take_for_client
    out = b""
    for i in range(0, len(data), size):
        feed(data[i : i + size])
        out += take()
        while relay.backlog(side):
            relay.resume(side)
            out += take()
    return out


def test_deflate_on_each_hop_with_its_own_parameters():
    # Small windows and no context takeover both ways on both hops: a relay that compressed with
    # a wider window than its peer inflates with, or kept context its peer drops, breaks the
    # peer's inflater (messages arrive in many reads, so they go on in many frames).
    client_side, client_hop = deflate_pair(
        client_no_context_takeover=True,
        client_max_window_bits=9,
        server_no_context_takeover=True,
        server_max_window_bits=10,
    )
    backend_hop, backend_side = deflate_pair(client_no_context_takeover=True, client_max_window_bits=9)
    assert backend_hop.server_max_window_bits == 15 and not backend_hop.server_no_context_takeover
    relay = InspectRelay(client_extensions=[client_hop], backend_extensions=[backend_hop])
    client = Peer(ConnectionType.CLIENT, [client_side])
    backend = Peer(ConnectionType.SERVER, [backend_side])
    rng = random.Random(5)
    blocks = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ✓") for _ in range(3000)) for _ in range(12)]
    text = "".join(b + b for b in blocks)  # each block again 3000+ bytes on: found by a wide window only
    blob = b"\x00\x01\x02" * 20_000
    events = (TextMessage(text), TextMessage(text), BytesMessage(blob))
    to_backend = deliver(relay, "client", b"".join(client.conn.send(e) for e in events))
    frames = wire_frames(to_backend, masked=True)
    assert len(frames) > 10
    assert all(rsv == 0x40 for op, _, rsv, _, _ in frames if op)  # compressed anew for the backend
    assert len(to_backend) < 2 * len(text.encode())  # compressed: the texts alone are more
    assert backend.read(to_backend) == [("text", text), ("text", text), ("bytes", blob)]
    to_client = deliver(relay, "backend", b"".join(backend.conn.send(e) for e in events))
    assert len(wire_frames(to_client, masked=False)) > 10
    assert len(to_client) < 2 * len(text.encode())
    assert client.read(to_client) == [("text", text), ("text", text), ("bytes", blob)]
    assert relay.stats.messages_to_backend == 3 and relay.stats.messages_to_client == 3
    assert relay.stats.proxy_close is None


@pytest.mark.parametrize("hop", ["client", "backend"])
def test_deflate_on_one_hop_only(hop):
    client_side, client_hop = deflate_pair()
    backend_hop, backend_side = deflate_pair()
    if hop == "client":
        relay = InspectRelay(client_extensions=[client_hop])
        client = Peer(ConnectionType.CLIENT, [client_side])
        backend = Peer(ConnectionType.SERVER)
    else:
        relay = InspectRelay(backend_extensions=[backend_hop])
        client = Peer(ConnectionType.CLIENT)
        backend = Peer(ConnectionType.SERVER, [backend_side])
    text = "ünïcode " * 1000
    relay.feed_client(client.conn.send(TextMessage(text)))
    out = relay.take_for_backend()
    assert all(rsv == (0x40 if hop == "backend" else 0) for op, _, rsv, _, _ in wire_frames(out, masked=True))
    assert backend.read(out) == [("text", text)]
    relay.feed_backend(backend.conn.send(TextMessage(text)))
    assert client.read(relay.take_for_client()) == [("text", text)]


def test_rsv1_on_a_hop_without_deflate_is_a_protocol_error():
    _, client_hop = deflate_pair()
    relay = InspectRelay(client_extensions=[client_hop])  # the backend hop has none
    relay.feed_backend(frame(1, b"x", rsv=0x40, key=None))
    other_answers(relay, client_at_fault=False)
    assert closes(relay.take_for_backend(), masked=True) == [(1002, "Reserved bit set unexpectedly")]
    assert closes(relay.take_for_client(), masked=False) == [(1011, "backend protocol error")]


def test_rsv1_on_a_continuation_or_control_frame_is_a_protocol_error_with_deflate():
    for bad in (frame(2, b"", fin=False) + frame(0, b"x", rsv=0x40), frame(9, b"", rsv=0x40)):
        _, client_hop = deflate_pair()
        relay = InspectRelay(client_extensions=[client_hop])
        relay.feed_client(bad)
        other_answers(relay, client_at_fault=True)
        assert closes(relay.take_for_client(), masked=False) == [(1002, "error in extension")]


def test_corrupt_compressed_data_gets_1007():
    _, client_hop = deflate_pair()
    relay = InspectRelay(client_extensions=[client_hop])
    relay.feed_client(frame(2, b"\xff\xff\xff\xff not deflate", rsv=0x40))
    other_answers(relay, client_at_fault=True)
    assert closes(relay.take_for_client(), masked=False) == [(1007, "error in extension")]
    assert closes(relay.take_for_backend(), masked=True) == [(1001, "client protocol error")]


def test_a_ping_between_compressed_fragments_does_not_break_the_message():
    _, client_hop = deflate_pair()
    relay = InspectRelay(client_extensions=[client_hop])
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    body = ("fragmented and compressed " * 100).encode()
    data = (z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
    half = len(data) // 2
    relay.feed_client(frame(1, data[:half], fin=False, rsv=0x40) + frame(9, b"p") + frame(0, data[half:]))
    assert Peer(ConnectionType.SERVER).read(relay.take_for_backend()) == [("ping", b"p"), ("text", body.decode())]


def test_size_limit_counts_the_inflated_message():
    client_side, client_hop = deflate_pair()
    relay = InspectRelay(client_extensions=[client_hop], max_message_bytes=10_000)
    client = Connection(ConnectionType.CLIENT, extensions=[client_side])
    relay.feed_client(client.send(BytesMessage(bytes(10_000))))
    assert relay.stats.proxy_close is None
    wire = client.send(BytesMessage(bytes(10_001)))
    assert len(wire) < 100
    relay.feed_client(wire)
    other_answers(relay, client_at_fault=True)
    assert closes(relay.take_for_client(), masked=False) == [(1009, "message over 10000 bytes")]
    assert closes(relay.take_for_backend(), masked=True) == [(1001, "client sent a message over 10000 bytes")]


@pytest.mark.parametrize("from_client", [True, False], ids=["client", "backend"])
def test_an_uncompressed_frame_over_the_limit_is_refused_before_any_of_it_goes_on(from_client):
    relay = InspectRelay(max_message_bytes=1000)
    key = b"abcd" if from_client else None
    feed = relay.feed_client if from_client else relay.feed_backend
    to_other = relay.take_for_backend if from_client else relay.take_for_client
    to_sender = relay.take_for_client if from_client else relay.take_for_backend
    feed(frame(2, b"a" * 600, fin=False, key=key))
    assert [(op, body) for op, _, _, _, body in wire_frames(to_other(), masked=from_client)] == [(2, b"a" * 600)]
    feed(frame(0, b"b" * 401, key=key)[:50])  # only the start of the frame that crosses the limit
    name = "client" if from_client else "backend"
    got = wire_frames(to_other(), masked=from_client)
    assert [(op, body) for op, _, _, _, body in got] == [
        (8, struct.pack("!H", 1001) + f"{name} sent a message over 1000 bytes".encode())
    ]
    other_answers(relay, client_at_fault=from_client)
    assert closes(to_sender(), masked=not from_client) == [(1009, "message over 1000 bytes")]
    assert relay.stats.proxy_close == CloseRecord(1009, f"{name} sent a message over 1000 bytes")


def test_compression_bomb_waits_as_backlog_and_arrives_whole():
    client_side, client_hop = deflate_pair()
    client = Connection(ConnectionType.CLIENT, extensions=[client_side])
    size = 24 << 20
    wire = client.send(BytesMessage(b"\0" * size)) + client.send(TextMessage("after"))
    assert len(wire) < 32 << 10
    buffer = 64 << 10
    relay = InspectRelay(client_extensions=[client_hop], buffer_bytes=buffer)
    assert relay.may_backlog
    relay.feed_client(wire)
    backend = Peer(ConnectionType.SERVER)
    digest, total, rounds = hashlib.sha256(), 0, 0
    seen = []
    parser = FrameParser(masked=True)
    while True:
        out = relay.take_for_backend()
        assert len(out) <= buffer + (1100 << 10), len(out)  # at most one slice past the room
        for op, _, _, _, body in wire_frames(out, masked=True, parser=parser):
            if op == 2 or (op == 0 and total < size):
                digest.update(body)
                total += len(body)
        seen += [e for e in backend.read(out) if e[0] == "text"]
        if not relay.backlog("client"):
            break
        relay.resume("client")
        rounds += 1
    assert rounds > 10
    assert total == size and digest.digest() == hashlib.sha256(b"\0" * size).digest()
    assert seen == [("text", "after")]
    assert relay.stats.messages_to_backend == 2


def test_no_backlog_possible_without_deflate():
    relay = InspectRelay(buffer_bytes=1024)
    assert not relay.may_backlog
    relay.feed_client(frame(2, bytes(100_000)))
    assert not relay.backlog("client")


# --- pings and pongs ----------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["client", "backend"])
def test_pong_to_the_proxys_own_ping_is_swallowed_others_pass(to):
    relay = InspectRelay()
    assert relay.send_ping(to, b"wsproxy:7")
    masked_out = to == "backend"
    sent = wire_frames((relay.take_for_backend if masked_out else relay.take_for_client)(), masked=masked_out)
    assert [(op, body) for op, _, _, _, body in sent] == [(9, b"wsproxy:7")]
    key = b"abcd" if to == "client" else None
    feed = relay.feed_client if to == "client" else relay.feed_backend
    other = relay.take_for_backend if to == "client" else relay.take_for_client
    feed(frame(10, b"wsproxy:7", key=key))
    assert relay.take_pongs() == [(to, b"wsproxy:7")]
    assert other() == b""
    feed(frame(10, b"wsproxy:7", key=key))  # answered already: this one is the peer's business
    feed(frame(10, b"unsolicited", key=key))
    assert relay.take_pongs() == []
    assert [(op, body) for op, _, _, _, body in wire_frames(other(), masked=to == "client")] == [
        (10, b"wsproxy:7"),
        (10, b"unsolicited"),
    ]


def test_pings_pass_end_to_end_in_both_directions():
    relay = InspectRelay()
    relay.feed_client(frame(9, b"from client"))
    relay.feed_backend(frame(9, b"from backend", key=None))
    assert messages(wire_frames(relay.take_for_backend(), masked=True)) == [(9, b"from client")]
    assert messages(wire_frames(relay.take_for_client(), masked=False)) == [(9, b"from backend")]
    assert not relay.ping_waiting("client") and not relay.ping_waiting("backend")


def test_no_ping_once_a_hop_is_closing():
    relay = InspectRelay()
    relay.close(client_code=1001, backend_code=1001, reason="bye")
    assert not relay.send_ping("client", b"wsproxy:1")
    assert not relay.send_ping("backend", b"wsproxy:1")


def test_data_frames_counts_every_piece_of_data_but_not_control_frames():
    relay = InspectRelay()
    wire = frame(2, bytes(200_000))
    before = relay.stats.data_frames
    relay.feed_client(wire[:100])
    assert relay.stats.data_frames > before
    before = relay.stats.data_frames
    relay.feed_client(wire[100:])
    assert relay.stats.data_frames > before
    before = relay.stats.data_frames
    relay.feed_client(frame(9, b"x") + frame(10, b"y"))
    assert relay.stats.data_frames == before
