"""PassthroughRelay between two real wsproto peers in memory, and parity with InspectRelay.

The shared scenarios run against both relays (InspectRelay with no extensions) to show they
behave the same at the relay.Relay interface; the rest cover what only the passthrough relay
does (verbatim frames, end-to-end deflate, own pings and pongs, size limits).
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from wsproxy.protocol.frames import HEADER, PAYLOAD, PING, FrameParser, build_frame
from wsproxy.protocol.relay import CloseRecord
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay

BOTH = [
    pytest.param(InspectRelay, id="inspect"),
    pytest.param(PassthroughRelay, id="passthrough"),
]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLOSED = ConnectionState.CLOSED
OPEN = ConnectionState.OPEN


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut data anywhere: single bytes, header-splitting small pieces, big reads."""
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 1000, 70_000))
        out.append(data[pos : pos + n])
        pos += n
    return out


class Peer:
    """A wsproto endpoint plus what it has seen, with whole messages reassembled."""

    def __init__(self, conn: Connection, *, auto: bool) -> None:
        self.conn = conn
        self.auto = auto  # answer pings and closes like a well-behaved application
        self.seen: list[tuple] = []
        self._parts: list = []

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the relay; return what this peer sends back automatically."""
        assert self.conn.state is not CLOSED, "relay sent bytes after the closing handshake"
        self.conn.receive_data(data)
        reply = b""
        for ev in self.conn.events():
            if isinstance(ev, Message):
                self._parts.append(ev.data)
                if ev.message_finished:
                    kind = "text" if isinstance(ev, TextMessage) else "bytes"
                    joined = "".join(self._parts) if kind == "text" else b"".join(self._parts)
                    self.seen.append((kind, joined))
                    self._parts = []
            elif isinstance(ev, Ping):
                self.seen.append(("ping", bytes(ev.payload)))
                if self.auto and self.conn.state is ConnectionState.OPEN:
                    reply += self.conn.send(ev.response())
            elif isinstance(ev, Pong):
                self.seen.append(("pong", bytes(ev.payload)))
            elif isinstance(ev, CloseConnection):
                self.seen.append(("close", int(ev.code), ev.reason or ""))
                if self.auto and self.conn.state is ConnectionState.REMOTE_CLOSING:
                    reply += self.conn.send(ev.response())
        return reply


class Rig:
    """client (wsproto CLIENT) <-> relay <-> backend (wsproto SERVER), all in memory."""

    def __init__(
        self,
        relay,
        *,
        seed: int = 0,
        auto: bool = True,
        client_ext: list | None = None,
        backend_ext: list | None = None,
    ) -> None:
        self.relay = relay
        self.rng = random.Random(seed)
        self.client = Peer(Connection(ConnectionType.CLIENT, extensions=client_ext), auto=auto)
        self.backend = Peer(Connection(ConnectionType.SERVER, extensions=backend_ext), auto=auto)

    def client_sends(self, *events, pump: bool = True) -> None:
        self.client_raw(b"".join(self.client.conn.send(e) for e in events), pump=pump)

    def backend_sends(self, *events, pump: bool = True) -> None:
        self.backend_raw(b"".join(self.backend.conn.send(e) for e in events), pump=pump)

    def client_raw(self, data: bytes, *, pump: bool = True) -> None:
        for chunk in split(data, self.rng):
            self.relay.feed_client(chunk)
        if pump:
            self.pump()

    def backend_raw(self, data: bytes, *, pump: bool = True) -> None:
        for chunk in split(data, self.rng):
            self.relay.feed_backend(chunk)
        if pump:
            self.pump()

    def pump(self) -> None:
        """Deliver queued bytes both ways until nothing moves (auto answers included)."""
        for _ in range(20):
            to_backend = self.relay.take_for_backend()
            to_client = self.relay.take_for_client()
            if not to_backend and not to_client:
                return
            if to_backend:
                reply = self.backend.receive(to_backend)
                if reply:
                    self.backend_raw(reply, pump=False)
            if to_client:
                reply = self.client.receive(to_client)
                if reply:
                    self.client_raw(reply, pump=False)
        raise AssertionError("relay never went quiet")

    @property
    def both_done(self) -> bool:
        return self.relay.client_done and self.relay.backend_done


def _peer(rig: Rig, who: str) -> Peer:
    return rig.client if who == "client" else rig.backend


# --- shared scenarios: both relays behave the same ----------------------------------------


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize("seed", range(3))
def test_messages_pass_both_ways(relay_cls, seed):
    rig = Rig(relay_cls(), seed=seed)
    rig.client_sends(TextMessage("héllo"), BytesMessage(b"\x00" * 70_000))
    rig.client_sends(
        TextMessage("frag", message_finished=False),
        Ping(b"between fragments"),
        TextMessage("mented ✓", message_finished=True),
    )
    rig.backend_sends(BytesMessage(b"b" * 200), TextMessage(""))
    assert rig.backend.seen == [
        ("text", "héllo"),
        ("bytes", b"\x00" * 70_000),
        ("ping", b"between fragments"),
        ("text", "fragmented ✓"),
    ]
    assert rig.client.seen == [("pong", b"between fragments"), ("bytes", b"b" * 200), ("text", "")]
    s = rig.relay.stats
    assert (s.messages_to_backend, s.messages_to_client) == (3, 2)
    assert s.client_bytes_in > 70_000 and s.backend_bytes_in > 200
    assert not rig.relay.closing


@pytest.mark.parametrize("relay_cls", BOTH)
def test_pings_and_pongs_pass_end_to_end(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.client_sends(Ping(b"c1"))
    rig.backend_sends(Pong(b"c1"), Ping(b""))
    rig.client_sends(Pong(b""), Pong(b"unsolicited"))
    assert rig.backend.seen == [("ping", b"c1"), ("pong", b""), ("pong", b"unsolicited")]
    assert rig.client.seen == [("pong", b"c1"), ("ping", b"")]


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize("seed", range(3))
def test_client_close_code_and_reason_reach_backend_and_handshake_completes(relay_cls, seed):
    rig = Rig(relay_cls(), seed=seed)
    rig.client_sends(CloseConnection(4000, "bye ✓"))
    assert rig.backend.seen == [("close", 4000, "bye ✓")]
    assert rig.client.seen == [("close", 4000, "bye ✓")]  # the backend's answer, passed back
    assert rig.client.conn.state is CLOSED and rig.backend.conn.state is CLOSED
    assert rig.both_done and rig.relay.closing
    s = rig.relay.stats
    assert s.client_close == CloseRecord(4000, "bye ✓")
    assert s.backend_close == CloseRecord(4000, "bye ✓")
    assert s.first_closer == "client" and s.proxy_close is None


@pytest.mark.parametrize("relay_cls", BOTH)
def test_backend_close_code_reaches_client_and_handshake_completes(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.backend_sends(CloseConnection(1012, "restarting"))
    assert rig.client.seen == [("close", 1012, "restarting")]
    assert not rig.relay.backend_done and not rig.relay.client_done and rig.relay.closing
    rig.client_sends(CloseConnection(1000, "ok"))
    assert rig.backend.seen == [("close", 1000, "ok")]
    assert rig.both_done
    s = rig.relay.stats
    assert (s.backend_close, s.client_close) == (
        CloseRecord(1012, "restarting"),
        CloseRecord(1000, "ok"),
    )
    assert s.first_closer == "backend"


@pytest.mark.parametrize("relay_cls", BOTH)
def test_close_without_a_code_stays_without_a_code(relay_cls):
    rig = Rig(relay_cls())
    rig.client_sends(CloseConnection(CloseReason.NO_STATUS_RCVD))  # an empty close
    assert rig.backend.seen == [("close", 1005, "")]
    assert rig.relay.stats.client_close == CloseRecord(None, "")
    assert rig.both_done


@pytest.mark.parametrize("relay_cls", BOTH)
def test_crossing_closes_complete_both_hops(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.client_sends(CloseConnection(1000, "client"), pump=False)
    rig.backend_sends(CloseConnection(1001, "backend"), pump=False)
    rig.pump()
    assert rig.backend.seen == [("close", 1000, "client")]
    assert rig.client.seen == [("close", 1001, "backend")]
    assert rig.both_done


@pytest.mark.parametrize("relay_cls", BOTH)
def test_data_after_the_other_side_closed_is_dropped(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.backend_sends(CloseConnection(1000))
    # Sent before the client read the backend's close (wsproto itself would refuse by now).
    rig.client_raw(_client_frame(0x1, b"too late") + _client_frame(0x9, b"late"))
    rig.client_sends(CloseConnection(1000))
    assert rig.backend.seen == [("close", 1000, "")]
    assert rig.relay.stats.messages_to_backend == 0
    assert rig.both_done


@pytest.mark.parametrize("relay_cls", BOTH)
def test_client_lost_gives_backend_1001(relay_cls):
    rig = Rig(relay_cls())
    rig.client_sends(TextMessage("hi"))
    rig.relay.feed_client(b"")
    assert rig.relay.client_done and not rig.relay.backend_done
    rig.pump()  # the backend answers the 1001
    assert rig.backend.seen == [("text", "hi"), ("close", 1001, "client went away")]
    assert rig.both_done
    s = rig.relay.stats
    assert s.client_close == CloseRecord(1006, "connection lost") and s.first_closer == "client"


@pytest.mark.parametrize("relay_cls", BOTH)
def test_backend_lost_gives_client_1011(relay_cls):
    rig = Rig(relay_cls())
    rig.relay.feed_backend(b"")
    rig.pump()
    assert rig.client.seen == [("close", 1011, "backend connection lost")]
    assert rig.both_done
    assert rig.relay.stats.backend_close == CloseRecord(1006, "connection lost")
    # the client's 1011 is the proxy's close (an alert on proxy closes sees a crashed backend);
    # the client only echoed it
    assert rig.relay.stats.proxy_close == CloseRecord(1011, "backend connection lost")
    assert rig.relay.stats.client_close == CloseRecord(1011, "backend connection lost")


@pytest.mark.parametrize("relay_cls", BOTH)
def test_backend_lost_while_client_waits_for_close_answer_gets_its_code_back(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.client_sends(CloseConnection(4001, "leaving"))
    rig.relay.feed_backend(b"")
    rig.pump()
    assert rig.client.seen == [("close", 4001, "leaving")]
    assert rig.both_done
    assert rig.relay.stats.proxy_close is None  # the client's own close went back: not the proxy's word


@pytest.mark.parametrize("relay_cls", BOTH)
def test_stream_end_after_the_handshake_changes_nothing(relay_cls):
    rig = Rig(relay_cls())
    rig.client_sends(CloseConnection(1000))
    before = (rig.relay.stats.client_close, rig.relay.stats.backend_close)
    rig.relay.feed_client(b"")
    rig.relay.feed_backend(b"")
    assert (rig.relay.stats.client_close, rig.relay.stats.backend_close) == before
    assert rig.relay.take_for_client() == b"" and rig.relay.take_for_backend() == b""


@pytest.mark.parametrize("relay_cls", BOTH)
def test_proxy_close_sends_each_side_its_code(relay_cls):
    rig = Rig(relay_cls())
    rig.relay.close(client_code=1001, backend_code=1001, reason="shutting down")
    assert rig.relay.closing
    rig.pump()
    assert rig.client.seen == [("close", 1001, "shutting down")]
    assert rig.backend.seen == [("close", 1001, "shutting down")]
    assert rig.both_done
    s = rig.relay.stats
    assert s.first_closer == "proxy" and s.proxy_close == CloseRecord(1001, "shutting down")


def _client_frame(opcode: int, payload: bytes, b0_extra: int = 0) -> bytes:
    frame = bytearray(build_frame(opcode, payload, mask=True))
    frame[0] |= b0_extra
    return bytes(frame)


# (name, from client?, bad bytes, code for the sender, code for the other side)
PROTOCOL_ERRORS = [
    ("reserved opcode", True, _client_frame(0x3, b""), 1002, 1001),
    ("rsv1 not negotiated", True, _client_frame(0x1, b"x", 0x40), 1002, 1001),
    ("unmasked client frame", True, build_frame(0x1, b"x", mask=False), 1002, 1001),
    ("continuation first", True, _client_frame(0x0, b"x"), 1002, 1001),
    ("close code 1005 on the wire", True, _client_frame(0x8, struct.pack("!H", 1005)), 1002, 1001),
    ("1-byte close", True, _client_frame(0x8, b"\x03"), 1002, 1001),
    ("bad utf-8 close reason", True, _client_frame(0x8, b"\x03\xe8\xff"), 1007, 1001),
    ("masked backend frame", False, build_frame(0x2, b"x", mask=True), 1002, 1011),
    ("fragmented backend ping", False, b"\x09\x00", 1002, 1011),
    ("backend close code 999", False, build_frame(0x8, b"\x03\xe7", mask=False), 1002, 1011),
]


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize(
    ("from_client", "bad", "sender_code", "other_code"),
    [pytest.param(*case[1:], id=case[0]) for case in PROTOCOL_ERRORS],
)
def test_protocol_error_closes_sender_with_its_code_and_other_side_1001_or_1011(
    relay_cls, from_client, bad, sender_code, other_code
):
    rig = Rig(relay_cls())
    sender, other = (rig.client, rig.backend) if from_client else (rig.backend, rig.client)
    good = (rig.client if from_client else rig.backend).conn.send(TextMessage("before"))
    (rig.client_raw if from_client else rig.backend_raw)(good + bad)
    assert other.seen[0] == ("text", "before")
    assert sender.seen[0][:2] == ("close", sender_code)
    assert other.seen[1][:2] == ("close", other_code)
    assert rig.relay.client_done if from_client else rig.relay.backend_done
    assert rig.both_done  # the other side answered its close
    s = rig.relay.stats
    assert s.first_closer == "proxy" and s.proxy_close is not None
    assert s.proxy_close.code == sender_code


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize("from_client", [True, False], ids=["client", "backend"])
def test_message_over_the_limit_gets_1009_and_the_other_side_1001(relay_cls, from_client):
    rig = Rig(relay_cls(max_message_bytes=1000))
    send = rig.client_sends if from_client else rig.backend_sends
    sender, other = (rig.client, rig.backend) if from_client else (rig.backend, rig.client)
    send(BytesMessage(b"a" * 1000))
    send(
        BytesMessage(b"a" * 600, message_finished=False),
        BytesMessage(b"a" * 401, message_finished=True),
    )
    name = "client" if from_client else "backend"
    assert other.seen == [
        ("bytes", b"a" * 1000),
        ("close", 1001, f"{name} sent a message over 1000 bytes"),
    ]
    assert sender.seen[0][:2] == ("close", 1009)
    assert rig.both_done
    assert rig.relay.stats.proxy_close == CloseRecord(1009, f"{name} sent a message over 1000 bytes")


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize("leg", ["client", "backend"])
def test_own_pings_reach_the_peer_and_their_pongs_are_swallowed(relay_cls, leg):
    rig = Rig(relay_cls())
    assert rig.relay.send_ping(leg, b"wsproxy:7")
    rig.pump()  # the peer answers automatically
    peer, other = (rig.client, rig.backend) if leg == "client" else (rig.backend, rig.client)
    assert peer.seen == [("ping", b"wsproxy:7")]
    assert other.seen == []  # the pong was ours: not forwarded
    assert rig.relay.take_pongs() == [(leg, b"wsproxy:7")]
    assert rig.relay.take_pongs() == []


@pytest.mark.parametrize("relay_cls", BOTH)
def test_only_pongs_answering_our_own_pings_are_swallowed(relay_cls):
    rig = Rig(relay_cls(ping_marker=b"lb!"), auto=False)
    assert rig.relay.send_ping("backend", b"lb!1")
    rig.pump()
    # Ours; one with the marker we never sent; one without; ours again (already answered).
    rig.backend_sends(Pong(b"lb!1"), Pong(b"lb!2"), Pong(b"wsproxy:1"), Pong(b"lb!1"))
    assert rig.client.seen == [("pong", b"lb!2"), ("pong", b"wsproxy:1"), ("pong", b"lb!1")]
    assert rig.relay.take_pongs() == [("backend", b"lb!1")]


@pytest.mark.parametrize("relay_cls", BOTH)
def test_a_pong_from_the_other_leg_is_not_taken_for_ours(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    assert rig.relay.send_ping("backend", b"wsproxy:9")
    rig.pump()
    rig.client_sends(Pong(b"wsproxy:9"))  # the client never got that ping
    assert rig.backend.seen == [("ping", b"wsproxy:9"), ("pong", b"wsproxy:9")]
    assert rig.relay.take_pongs() == []


@pytest.mark.parametrize("relay_cls", BOTH)
def test_no_ping_to_a_closing_peer(relay_cls):
    relay = relay_cls()
    relay.close(client_code=1001, backend_code=1001, reason="bye")
    assert relay.send_ping("backend", b"wsproxy:1") is False
    assert relay.send_ping("client", b"wsproxy:1") is False


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize(("side", "other_code"), [("client", 1001), ("backend", 1011)], ids=["client", "backend"])
def test_abandoned_peer_gets_nothing_and_the_other_side_the_given_code(relay_cls, side, other_code):
    rig = Rig(relay_cls())
    rig.relay.send_ping(side, b"wsproxy:1")  # queued for the peer, never delivered
    rig.relay.abandon(side, other_code=other_code, reason=f"{side} did not answer")
    gone, other = (rig.client, rig.backend) if side == "client" else (rig.backend, rig.client)
    assert (rig.relay.take_for_client if side == "client" else rig.relay.take_for_backend)() == b""
    rig.pump()
    assert other.seen == [("close", other_code, f"{side} did not answer")]
    assert gone.seen == []
    assert rig.both_done
    s = rig.relay.stats
    assert s.first_closer == "proxy"
    assert s.proxy_close == CloseRecord(other_code, f"{side} did not answer")
    rig.relay.abandon(side, other_code=1011, reason="again")  # a second call changes nothing
    assert s.proxy_close == CloseRecord(other_code, f"{side} did not answer")


@FAST
@given(
    script=st.lists(
        st.tuples(
            st.sampled_from(["client", "backend"]),
            st.sampled_from(["text", "bytes", "frag", "ping", "own_ping"]),
            st.integers(0, 3000),
        ),
        max_size=8,
    ),
    ending=st.sampled_from(
        [
            "client_close",
            "backend_close",
            "client_lost",
            "backend_lost",
            "proxy_close",
            "abandon_client",
            "abandon_backend",
            "none",
        ]
    ),
    limit=st.sampled_from([None, 2000]),
    seed=st.integers(0, 2**16),
)
def test_both_relays_deliver_the_same_events(script, ending, limit, seed):
    """Random traffic and a random ending: each peer sees the same thing through either relay."""
    results = []
    for relay_cls in (InspectRelay, PassthroughRelay):
        rig = Rig(relay_cls(max_message_bytes=limit), seed=seed)
        pongs = []
        for who, kind, size in script:
            send = rig.client_sends if who == "client" else rig.backend_sends
            if kind != "own_ping" and _peer(rig, who).conn.state is not OPEN:
                continue  # that peer has been closed by now; it sends nothing more
            if kind == "text":
                send(TextMessage("ü" * (size // 2)))
            elif kind == "bytes":
                send(BytesMessage(bytes(size)))
            elif kind == "frag":
                send(
                    BytesMessage(b"a" * size, message_finished=False),
                    Ping(b"mid"),
                    BytesMessage(b"b", message_finished=True),
                )
            elif kind == "ping":
                send(Ping(str(size).encode()))
            else:
                rig.relay.send_ping(who, b"wsproxy:%d" % size)
                rig.pump()
            pongs += rig.relay.take_pongs()
        if ending == "client_close" and rig.client.conn.state is OPEN:
            rig.client_sends(CloseConnection(4004, "done"))
        elif ending == "backend_close" and rig.backend.conn.state is OPEN:
            rig.backend_sends(CloseConnection(1000))
        elif ending == "client_lost":
            rig.relay.feed_client(b"")
        elif ending == "backend_lost":
            rig.relay.feed_backend(b"")
        elif ending == "proxy_close":
            rig.relay.close(client_code=1001, backend_code=1012, reason="bye")
        elif ending.startswith("abandon_"):
            rig.relay.abandon(ending[8:], other_code=1001, reason="stuck")
        rig.pump()
        s = rig.relay.stats
        results.append(
            (
                rig.client.seen,
                rig.backend.seen,
                rig.relay.client_done,
                rig.relay.backend_done,
                rig.relay.closing,
                s.client_bytes_in,
                s.backend_bytes_in,
                s.messages_to_backend,
                s.messages_to_client,
                s.client_close,
                s.backend_close,
                s.proxy_close,
                s.first_closer,
                pongs,
            )
        )
    assert results[0] == results[1]


# --- passthrough only -----------------------------------------------------------------------


def test_frames_are_forwarded_verbatim_with_the_clients_mask():
    relay = PassthroughRelay()
    client = Connection(ConnectionType.CLIENT)
    wire = client.send(TextMessage("x" * 1000)) + client.send(Ping(b"p"))
    for chunk in split(wire, random.Random(1)):
        relay.feed_client(chunk)
    assert relay.take_for_backend() == wire
    backend = Connection(ConnectionType.SERVER)
    out = backend.send(BytesMessage(b"y" * 70_000))
    relay.feed_backend(out)
    assert relay.take_for_client() == out


def test_whole_chunk_of_payload_is_passed_on_without_copying():
    relay = PassthroughRelay()
    relay.feed_backend(b"\x82\x7f" + struct.pack("!Q", 1 << 20))
    relay.take_for_client()
    chunk = bytes(65536)
    relay.feed_backend(chunk)
    assert relay.take_for_client() is chunk


def _deflate_pair() -> tuple[list, list]:
    client, backend = PerMessageDeflate(), PerMessageDeflate()
    client.finalize(backend.accept(client.offer()))
    return [client], [backend]


def test_permessage_deflate_passes_end_to_end():
    client_ext, backend_ext = _deflate_pair()
    rig = Rig(PassthroughRelay(deflate=True), client_ext=client_ext, backend_ext=backend_ext)
    rig.client_sends(TextMessage("compress me " * 500), BytesMessage(b"\x00" * 50_000))
    rig.backend_sends(TextMessage("and me " * 500))
    rig.client_sends(CloseConnection(1000))
    assert rig.backend.seen == [
        ("text", "compress me " * 500),
        ("bytes", b"\x00" * 50_000),
        ("close", 1000, ""),
    ]
    assert rig.client.seen == [("text", "and me " * 500), ("close", 1000, "")]
    assert rig.relay.stats.client_bytes_in < 5_000  # it really went compressed
    assert rig.both_done


def test_compressed_frames_without_negotiated_deflate_are_a_protocol_error():
    client_ext, _ = _deflate_pair()
    rig = Rig(PassthroughRelay(deflate=False), client_ext=client_ext)
    rig.client_sends(TextMessage("compress me " * 50))
    assert rig.client.seen[0][:2] == ("close", 1002)
    assert rig.backend.seen == [("close", 1001, "client protocol error")]


def _frames_of(stream: bytes, *, masked: bool) -> list[tuple[int, int, int]]:
    """(opcode, start, end) of each frame in a stream, by our own parser."""
    p = FrameParser(masked=masked)
    out, pos, start = [], 0, 0
    while pos < len(stream):
        kind, end = p.next_event(stream, pos)
        assert kind in (HEADER, PAYLOAD), kind
        if kind == HEADER:
            start = pos
        if not p.remaining:
            out.append((p.opcode, start, end))
        pos = end
    return out


@pytest.mark.parametrize("to", ["backend", "client"])
def test_ping_injected_while_a_long_frame_is_half_through_waits_for_its_end(to):
    relay = PassthroughRelay()
    if to == "backend":
        frame = Connection(ConnectionType.CLIENT).send(BytesMessage(b"z" * 100_000))
        feed, take = relay.feed_client, relay.take_for_backend
    else:
        frame = Connection(ConnectionType.SERVER).send(BytesMessage(b"z" * 100_000))
        feed, take = relay.feed_backend, relay.take_for_client
    feed(frame[:40_000])
    assert relay.send_ping(to, b"wsproxy:hb")
    assert relay.ping_waiting(to)
    assert take() == frame[:40_000]  # no ping inside the frame
    feed(frame[40_000:99_000])
    assert take() == frame[40_000:99_000]
    assert relay.ping_waiting(to)
    feed(frame[99_000:] + frame)  # the first frame ends, a second one starts
    assert not relay.ping_waiting(to)
    out = take()
    first_end = len(frame) - 99_000
    assert out[:first_end] == frame[99_000:]
    ping = out[first_end : len(out) - len(frame)]
    assert out[len(out) - len(frame) :] == frame
    peer = Connection(ConnectionType.SERVER if to == "backend" else ConnectionType.CLIENT)
    peer.receive_data(ping)
    assert list(peer.events()) == [Ping(b"wsproxy:hb")]


@FAST
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    pings_at=st.lists(st.integers(0, 40_000), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_injected_pings_land_only_between_frames(sizes, pings_at, seed):
    relay = PassthroughRelay()
    client = Connection(ConnectionType.CLIENT)
    wire = b"".join(
        client.send(BytesMessage(bytes([i % 256]) * n, message_finished=i % 2 == 0)) for i, n in enumerate(sizes)
    )
    chunks = split(wire, random.Random(seed))
    pings_at = sorted(p % (len(chunks) + 1) for p in pings_at)
    backend_stream = b""
    for i, chunk in enumerate(chunks):
        for j, at in enumerate(pings_at):
            if at == i:
                relay.send_ping("backend", b"wsproxy:%d" % j)
        relay.feed_client(chunk)
        backend_stream += relay.take_for_backend()
    for j, at in enumerate(pings_at):
        if at == len(chunks):
            relay.send_ping("backend", b"wsproxy:%d" % j)
    backend_stream += relay.take_for_backend()
    found = _frames_of(backend_stream, masked=True)
    data_frames = [f for f in found if f[0] != PING]
    assert len(data_frames) == len(sizes)
    assert sum(1 for f in found if f[0] == PING) == len(pings_at)
    # Without the pings, the stream is exactly what the client sent.
    assert b"".join(backend_stream[s:e] for op, s, e in found if op != PING) == wire


def test_proxy_close_waits_for_the_frame_in_flight():
    relay = PassthroughRelay()
    frame = Connection(ConnectionType.SERVER).send(BytesMessage(b"z" * 10_000))
    relay.feed_backend(frame[:5000])
    relay.close(client_code=1001, backend_code=1001, reason="idle")
    assert relay.take_for_client() == frame[:5000]
    relay.feed_backend(frame[5000:])
    out = relay.take_for_client()
    assert out[: len(frame) - 5000] == frame[5000:]
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame + out[len(frame) - 5000 :])
    events = list(client.events())
    assert isinstance(events[0], BytesMessage)
    assert events[-1] == CloseConnection(1001, "idle")


@pytest.mark.parametrize("relay_cls", BOTH)
def test_a_protocol_error_lets_the_other_peers_replies_through_before_its_close(relay_cls):
    """Replies in flight: the backend hears first (1001); what it still sends reaches the client,
    and the client's 1002 follows the backend's close."""
    rig = Rig(relay_cls(), auto=False)
    rig.client_sends(TextMessage("q1"), TextMessage("q2"))
    rig.client_raw(b"\x83\x80abcd")  # a reserved opcode from the client
    assert rig.backend.seen == [("text", "q1"), ("text", "q2"), ("close", 1001, "client protocol error")]
    assert rig.client.seen == [] and not rig.relay.client_done
    rig.client_raw(rig.client.conn.send(TextMessage("ignored")))  # nothing more is read from it
    replies = Connection(ConnectionType.SERVER)  # the backend's replies, sent before it read the close
    rig.backend_raw(replies.send(TextMessage("a1")) + replies.send(TextMessage("a2")))
    assert rig.client.seen == [("text", "a1"), ("text", "a2")]
    rig.backend_raw(b"\x88\x02\x03\xe9")  # then its answer to the 1001
    assert rig.client.seen[2:] == [("close", 1002, rig.relay.stats.proxy_close.reason.split(": ", 1)[1])]
    assert rig.relay.client_done and rig.relay.backend_done
    assert rig.backend.seen[3:] == []


def test_protocol_error_close_to_sender_waits_for_the_frame_towards_it():
    relay = PassthroughRelay()
    frame = Connection(ConnectionType.SERVER).send(BytesMessage(b"z" * 10_000))
    relay.feed_backend(frame[:5000])
    relay.feed_client(b"\x83\x80abcd")  # reserved opcode from the client
    assert relay.take_for_client() == frame[:5000]
    assert not relay.client_done  # its 1002 waits for the backend's replies and close
    relay.feed_backend(frame[5000:] + frame + b"\x88\x02\x03\xe9")  # a reply in flight, then its close
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame[:5000] + relay.take_for_client())
    events = list(client.events())
    assert len(events) == 3 and events[2].code == 1002
    assert relay.client_done


def test_peer_lost_mid_frame_drops_the_other_connection():
    """A cut frame can never be completed, so no valid close can follow it."""
    relay = PassthroughRelay()
    frame = Connection(ConnectionType.CLIENT).send(BytesMessage(b"z" * 10_000))
    relay.feed_client(frame[:5000])
    relay.feed_client(b"")
    assert relay.take_for_backend() == frame[:5000]
    assert relay.backend_done and relay.client_done
    assert relay.stats.client_close == CloseRecord(1006, "connection lost")


def test_text_payload_is_not_validated_in_passthrough():
    """Unlike InspectRelay (1007), bad UTF-8 in a text message is the end peer's business."""
    relay = PassthroughRelay()
    relay.feed_client(_client_frame(0x1, b"\xff\xfe"))
    backend = Connection(ConnectionType.SERVER)
    backend.receive_data(relay.take_for_backend())
    assert next(backend.events()).code == 1007  # the backend itself fails it
    inspect = InspectRelay()
    inspect.feed_client(_client_frame(0x1, b"\xff\xfe"))
    assert inspect.stats.proxy_close.code == 1007


def test_idle_session_holds_no_buffers():
    rig = Rig(PassthroughRelay())
    rig.client_sends(BytesMessage(b"x" * 100_000))
    relay = rig.relay
    assert not hasattr(relay, "__dict__")
    for hop in (relay._client, relay._backend):
        assert hop.out == [] and hop.pending is None and hop.ctl is None
        assert hop.parser._held == b""


def test_header_split_across_reads_is_forwarded_whole():
    relay = PassthroughRelay()
    client = Connection(ConnectionType.CLIENT)
    wire = client.send(BytesMessage(b"q" * 70_000))  # 14-byte header
    out = b""
    for i in range(13):
        relay.feed_client(wire[i : i + 1])
        out += relay.take_for_backend()
    assert out == b""  # nothing forwarded until the header is whole and valid
    relay.feed_client(wire[13:])
    assert relay.take_for_backend() == wire


@pytest.mark.parametrize("relay_cls", BOTH)
def test_bytes_after_a_peers_close_are_ignored(relay_cls):
    rig = Rig(relay_cls(), auto=False)
    rig.client_sends(CloseConnection(1000))
    rig.client_raw(b"\xff\xff garbage that is not a frame")
    assert rig.relay.stats.proxy_close is None
    assert rig.backend.seen == [("close", 1000, "")]


@pytest.mark.parametrize("how", ["lost", "abandoned"])
def test_nothing_more_is_queued_for_a_gone_peer(how):
    relay = PassthroughRelay()
    frame = Connection(ConnectionType.SERVER).send(BytesMessage(b"z" * 10_000))
    relay.feed_backend(frame[:5000])
    assert relay.take_for_client() == frame[:5000]
    if how == "lost":
        relay.feed_client(b"")
    else:
        relay.abandon("client", other_code=1001, reason="stuck")
    relay.feed_backend(frame[5000:] + frame)
    assert relay.take_for_client() == b""
    assert relay.client_done
    backend = Connection(ConnectionType.SERVER)
    backend.receive_data(relay.take_for_backend())
    assert [e.code for e in backend.events()] == [1001]


@pytest.mark.parametrize("relay_cls", BOTH)
def test_data_frames_move_while_a_long_frame_streams_but_not_for_control_frames(relay_cls):
    """The idle timer watches stats.data_frames: every piece of a data frame is activity."""
    relay = relay_cls()
    client = Connection(ConnectionType.CLIENT)
    frame = client.send(BytesMessage(b"z" * 300_000))
    seen = []
    for i in range(0, len(frame), 65_536):
        before = relay.stats.data_frames
        relay.feed_client(frame[i : i + 65_536])
        seen.append(relay.stats.data_frames > before)
    assert all(seen)
    before = relay.stats.data_frames
    relay.feed_client(client.send(Ping(b"x")))
    assert relay.stats.data_frames == before


def test_inspect_relay_inflates_a_compression_bomb_only_as_fast_as_it_is_sent_on():
    """64 KiB of deflate can inflate to ~64 MiB: the relay must hold at most about
    `buffer_bytes` of output plus one slice, keeping the rest of the input as backlog."""
    client_ext, server_ext = _deflate_pair()
    sender = Connection(ConnectionType.CLIENT, extensions=client_ext)
    wire = sender.send(BytesMessage(b"\0" * (32 << 20)))
    assert len(wire) < 64 << 10
    relay = InspectRelay(client_extensions=server_ext, buffer_bytes=64 << 10)
    relay.feed_client(wire)
    received = 0
    rounds = 0
    while True:
        out = relay.take_for_backend()
        assert len(out) <= (64 << 10) + (2 << 20), len(out)
        received += len(out)
        if not relay.backlog("client"):
            break
        relay.resume("client")
        rounds += 1
    assert rounds > 10
    assert received >= 32 << 20
    assert relay.stats.messages_to_backend == 1


@pytest.mark.parametrize("relay_cls", BOTH)
@pytest.mark.parametrize("seed", range(4))
def test_the_client_allowance_holds_whole_messages_beyond_it_and_resumes_in_order(relay_cls, seed):
    rig = Rig(relay_cls(), seed=seed)
    relay = rig.relay
    relay.limit_client(messages=2, nbytes=None)
    rig.client_sends(*(TextMessage(f"m{i}") for i in range(5)), Ping(b"p"))
    assert rig.backend.seen == [("text", "m0"), ("text", "m1")]
    assert relay.client_allowance() == (0, None) and relay.held("client") > 0
    assert not relay.backlog("client")  # nothing may go on until a new allowance
    relay.limit_client(messages=2, nbytes=None)
    assert relay.backlog("client")
    relay.resume("client")
    rig.pump()
    assert [m for _, m, *_ in rig.backend.seen] == ["m0", "m1", "m2", "m3"]
    relay.limit_client(messages=None, nbytes=None)
    relay.resume("client")
    rig.pump()
    assert rig.backend.seen[4:] == [("text", "m4"), ("ping", b"p")]
    assert relay.held("client") == 0 and relay.stats.messages_to_backend == 5


@pytest.mark.parametrize("relay_cls", BOTH)
def test_the_client_byte_allowance_stops_at_the_byte_and_goes_on_where_it_stopped(relay_cls):
    rig = Rig(relay_cls())
    relay = rig.relay
    wire = b"".join(rig.client.conn.send(BytesMessage(bytes([i]) * 100)) for i in range(3))
    relay.limit_client(messages=None, nbytes=150)
    relay.feed_client(wire)
    rig.pump()
    assert relay.client_allowance() == (None, 0) and relay.held("client") == len(wire) - 150
    relay.limit_client(messages=None, nbytes=len(wire))
    relay.resume("client")
    rig.pump()
    assert relay.client_allowance() == (None, 150) and relay.held("client") == 0
    assert [m for _, m in rig.backend.seen] == [bytes([i]) * 100 for i in range(3)]


@pytest.mark.parametrize("relay_cls", BOTH)
def test_a_client_lost_while_held_drops_what_was_held(relay_cls):
    rig = Rig(relay_cls())
    relay = rig.relay
    relay.limit_client(messages=1, nbytes=None)
    rig.client_sends(TextMessage("a"), TextMessage("b"))
    relay.feed_client(b"")
    rig.pump()
    assert relay.held("client") == 0 and not relay.backlog("client")
    assert rig.backend.seen == [("text", "a"), ("close", 1001, "client went away")]
