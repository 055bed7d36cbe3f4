"""The codec's public pieces one by one: build→parse round trips, masking, the mask-key source,
per-hop deflate, and the Side enum both relays, the heartbeat, metrics and the log speak.

test_frames.py holds the parser against a reference serializer and bad streams; these tests pin
what the relays rely on from the codec that is new with it (remask, key phases, MaskKeys,
encode_frame/frame_head, HopDeflate) and that the one name for a side changes no text.
"""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage
from wsproto.extensions import PerMessageDeflate

from wsproxy.observe.metrics import Metrics
from wsproxy.observe.session_log import SessionRecord, text_line
from wsproxy.protocol.deflate import DEFLATE_SLICE, HopDeflate, negotiated_deflate
from wsproxy.protocol.frames import (
    HEADER,
    NEED_DATA,
    PAYLOAD,
    FrameParser,
    MaskKeys,
    ProtocolError,
    apply_mask,
    build_frame,
    encode_frame,
    frame_head,
    key_at,
    remask,
)
from wsproxy.protocol.heartbeat import PeerDead, Schedule, SendPing
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay
from wsproxy.protocol.sides import SIDES, Side

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_POOL = bytes((i * 131 + 7) % 256 for i in range(70_000))


def _parse_all(chunks: list[bytes], *, masked: bool) -> list[tuple[int, bool, int, bytes | None, bytes]]:
    """(opcode, fin, rsv, mask, unmasked payload) of every frame in a stream fed in `chunks`."""
    p = FrameParser(masked=masked, rsv1_allowed=True)
    out: list[tuple[int, bool, int, bytes | None, bytes]] = []
    payload = b""
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            kind, end = p.next_event(chunk, pos)
            assert kind in (HEADER, PAYLOAD, NEED_DATA), p.error_reason
            if kind == HEADER:
                payload = b""
            elif kind == PAYLOAD:
                payload += chunk[pos:end]
            if kind in (HEADER, PAYLOAD) and not p.remaining:
                out.append((p.opcode, p.fin, p.rsv, p.mask, apply_mask(payload, p.mask) if p.mask else payload))
            pos = end
    assert p.at_boundary
    return out


frames_st = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 9, 10]),
        st.integers(0, 70_000),
        st.integers(0, len(_POOL)),
    ).map(lambda t: (t[0], _POOL[t[2] : t[2] + (t[1] if t[0] < 8 else min(t[1], 125))])),
    min_size=1,
    max_size=6,
)


@FAST
@given(frames=frames_st, masked=st.booleans(), seed=st.integers(0, 2**32))
def test_built_frames_split_at_random_points_parse_back_identically(frames, masked, seed):
    keys = MaskKeys(random_bytes=random.Random(seed).randbytes)
    wire = b"".join(build_frame(op, payload, mask=masked, keys=keys) for op, payload in frames)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 30))))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    got = _parse_all(chunks, masked=masked)
    assert [(op, payload) for op, _, _, _, payload in got] == frames
    assert all(fin and rsv == 0 and (mask is not None) == masked for _, fin, rsv, mask, _ in got)


@FAST
@given(b0=st.sampled_from([0x81, 0x82, 0xC1, 0x02, 0x89]), n=st.sampled_from([0, 1, 125, 126, 65535, 65536, 65537]))
def test_encode_frame_round_trips_first_byte_length_and_key(b0, n):
    payload = _POOL[:n] if b0 & 0x0F < 8 else _POOL[: min(n, 125)]
    for key in (None, b"\x01\x02\x03\x04"):
        wire = encode_frame(b0, payload, key)
        assert wire.startswith(frame_head(b0, len(payload), key))
        p = FrameParser(masked=key is not None, rsv1_allowed=True)
        kind, end = p.next_event(wire, 0)
        assert kind == HEADER and p.length == len(payload) and p.mask == key
        assert (0x80 if p.fin else 0) | p.rsv | p.opcode == b0
        body = wire[end:]
        assert (apply_mask(body, key) if key else body) == payload


@given(data=st.binary(max_size=2000), key=st.binary(min_size=4, max_size=4), other=st.binary(min_size=4, max_size=4))
def test_masking_twice_is_the_identity_and_remask_is_unmask_then_mask(data, key, other):
    assert apply_mask(apply_mask(data, key), key) == data
    assert remask(apply_mask(data, key), key, other) == apply_mask(data, other)


@pytest.mark.parametrize("n", [511, 512, 513, 4096, 65537])  # both sides of the big-int/translate switch
def test_apply_mask_is_xor_on_both_paths(n):
    data, key = _POOL[:n], b"\xa5\x0f\xf0\x5a"
    assert apply_mask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))


@given(data=st.binary(min_size=1, max_size=300), cut=st.integers(0, 300), key=st.binary(min_size=4, max_size=4))
def test_key_at_continues_the_mask_from_any_offset(data, cut, key):
    cut = min(cut, len(data))
    assert apply_mask(data[:cut], key) + apply_mask(data[cut:], key_at(key, cut)) == apply_mask(data, key)


def test_mask_keys_come_from_the_given_source_in_order_and_refill():
    calls: list[int] = []
    given: list[bytes] = []

    def source(n: int) -> bytes:
        calls.append(n)
        given.append(random.Random(len(calls)).randbytes(n))
        return given[-1]

    keys = MaskKeys(random_bytes=source, pool_keys=64)
    got = [keys.next() for _ in range(16 + 64 + 64)]
    assert calls == [64, 256, 256]  # starts small, grows to pool_keys * 4 bytes
    assert b"".join(got) == b"".join(given)  # every byte used once, in order


def test_mask_keys_refuse_a_source_that_gives_the_wrong_length():
    keys = MaskKeys(random_bytes=lambda n: b"abc")
    with pytest.raises(ValueError):
        keys.next()


def test_relays_mask_with_the_key_source_they_are_given():
    """A deterministic source makes the proxy's frames to the backend reproducible."""
    for relay_cls in (PassthroughRelay, InspectRelay):
        wires = []
        for _ in range(2):
            relay = relay_cls(mask_keys=MaskKeys(random_bytes=random.Random(7).randbytes))
            assert relay.send_ping(Side.BACKEND, b"wsproxy:1")
            relay.close(client_code=1001, backend_code=1001, reason="bye")
            wires.append(relay.take_for_backend())
        assert wires[0] == wires[1]
        keys = MaskKeys(random_bytes=random.Random(7).randbytes)
        assert wires[0][2:6] == keys.next()  # the ping's key is the source's first


def test_inspect_relay_remasks_client_frames_with_keys_from_its_source():
    keys = MaskKeys(random_bytes=random.Random(3).randbytes)
    expected = MaskKeys(random_bytes=random.Random(3).randbytes)
    relay = InspectRelay(mask_keys=keys)
    relay.feed_client(build_frame(2, b"payload", mask=True))
    out = relay.take_for_backend()
    assert out[2:6] == expected.next()
    assert apply_mask(out[6:], out[2:6]) == b"payload"


# --- deflate ---------------------------------------------------------------------------------


def _negotiated(**params: object) -> PerMessageDeflate:
    """A PerMessageDeflate as wsproto leaves it after a handshake that agreed on `params`."""
    client = PerMessageDeflate(**params)  # type: ignore[arg-type]
    server = PerMessageDeflate(**params)  # type: ignore[arg-type]
    offer = client.offer()
    assert isinstance(offer, str)
    answer = server.accept(offer)
    assert isinstance(answer, str)
    client.finalize(answer)
    return server


def test_hop_deflate_inflates_what_wsproto_deflated_with_the_negotiated_window():
    params = {"client_max_window_bits": 9, "server_max_window_bits": 10}
    ext = _negotiated(**params)
    peer = Connection(ConnectionType.CLIENT, extensions=[_negotiated(**params)])
    wire = peer.send(TextMessage("hello " * 500))
    p = FrameParser(masked=True, rsv1_allowed=True)
    kind, end = p.next_event(wire, 0)
    assert kind == HEADER and p.rsv == 0x40
    hop = HopDeflate(ext, client=True)
    plain, used = hop.inflate(apply_mask(wire[end:], p.mask), room=1 << 20, ends_message=True)
    assert plain == b"hello " * 500 and used == len(wire) - end


def test_hop_deflate_stops_at_the_room_and_goes_on_where_it_stopped():
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    bomb = (z.compress(bytes(8 << 20)) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
    hop = HopDeflate(_negotiated(), client=False)
    total, rounds, rest = 0, 0, bomb
    while rest:
        plain, used = hop.inflate(rest, room=64 << 10, ends_message=True)
        assert len(plain) <= (64 << 10) + 1100 * DEFLATE_SLICE  # one slice may pass the room
        assert used > 0
        total += len(plain)
        rest = rest[used:]
        rounds += 1
    assert total == 8 << 20 and rounds > 5


def test_hop_deflate_turns_bad_data_into_1007():
    hop = HopDeflate(_negotiated(), client=True)
    with pytest.raises(ProtocolError) as err:
        hop.inflate(b"\xff\xff\xff\xff" * 8, room=1 << 20, ends_message=True)
    assert err.value.code == 1007


def test_hop_deflate_output_is_what_a_wsproto_peer_reads():
    hop = HopDeflate(_negotiated(server_no_context_takeover=True), client=True)
    peer = Connection(ConnectionType.CLIENT, extensions=[_negotiated(server_no_context_takeover=True)])
    for text in ("first message", "second message"):
        body = hop.deflate(text.encode()[:5], ends_message=False) + hop.deflate(text.encode()[5:], ends_message=True)
        peer.receive_data(encode_frame(0x80 | 0x40 | 1, body, None))
        assert [e.data for e in peer.events() if isinstance(e, TextMessage)] == [text]


def test_only_permessage_deflate_is_accepted_as_a_negotiated_extension():
    assert negotiated_deflate(None) is None
    assert negotiated_deflate([PerMessageDeflate()]) is None  # offered, never enabled
    ext = _negotiated()
    assert negotiated_deflate([ext]) is ext
    with pytest.raises(TypeError):
        negotiated_deflate([ext, _negotiated()])


def test_bytes_message_through_inspect_with_deflate_on_one_side_only():
    relay = InspectRelay(backend_extensions=[_negotiated()])
    relay.feed_client(build_frame(2, b"x" * 3000, mask=True))
    backend = Connection(ConnectionType.SERVER, extensions=[_negotiated()])
    backend.receive_data(relay.take_for_backend())
    assert [e.data for e in backend.events() if isinstance(e, BytesMessage)] == [b"x" * 3000]


# --- one name for a side ------------------------------------------------------------------------


def test_side_is_its_string_and_knows_the_other_side():
    assert SIDES == (Side.CLIENT, Side.BACKEND)
    assert Side.CLIENT == "client" and Side.BACKEND == "backend"
    assert f"{Side.CLIENT}" == str(Side.CLIENT) == "client"
    assert Side.CLIENT.other is Side.BACKEND and Side.BACKEND.other is Side.CLIENT
    assert {"client": 1}[Side.CLIENT] == 1  # a string key finds it, and back


def test_metric_labels_and_log_text_stay_client_and_backend():
    m = Metrics()
    m.ping_sent(Side.CLIENT)
    m.dead_peer(Side.BACKEND)
    m.backpressure_event(Side.BACKEND, "buffer_full")
    text = m.exposition().decode()
    assert 'wsproxy_pings_sent_total{leg="client"} 1.0' in text
    assert 'wsproxy_dead_peers_total{leg="backend"} 1.0' in text
    assert 'side="backend"' in text and "Side." not in text
    line = text_line(
        SessionRecord(
            client="127.0.0.1:5000", listener="l", pool="p", backend="b", path="/", subprotocol=None, status=101,
            duration=1.0, attempts=1, relayed=True, rtt_client=0.002, rtt_backend=0.004,
        )
    )  # fmt: skip
    assert "rtt_client=2.0ms" in line and "rtt_backend=4.0ms" in line


def test_relays_and_the_schedule_take_a_side_or_its_string():
    """A Side equals its string (labels, log text, the config's `heartbeat.legs` names)."""
    s = Schedule(0.0, interval=20.0, timeout=10.0, sides=(Side("client"),))
    (ping,) = s.due(20.0)
    assert isinstance(ping, SendPing) and ping.side is Side.CLIENT
    (dead,) = s.due(30.0)
    assert isinstance(dead, PeerDead) and dead.side is Side.CLIENT and dead.side == "client"
    for relay in (PassthroughRelay(), InspectRelay()):
        assert relay.send_ping("backend", b"wsproxy:x")  # type: ignore[arg-type]
        relay.feed_backend(encode_frame(0x8A, b"wsproxy:x", None))
        assert relay.take_pongs() == [(Side.BACKEND, b"wsproxy:x")]
        relay.abandon("client", other_code=1001, reason="gone")  # type: ignore[arg-type]
        assert relay.client_done and relay.stats.proxy_close is not None
