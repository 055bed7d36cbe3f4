"""Heartbeats, idle and lifetime timeouts, the close and handshake timeouts, idle-dropping middleboxes.

Everything about time runs on `trio.testing.MockClock(autojump_threshold=0)` (the `autojump_clock`
fixture of pytest-trio): a 20 s heartbeat interval takes milliseconds. Under an autojumping clock
every peer must be a trio task in this process (a thread would see virtual time leap under it), so
the client is `RawClient` and the backend is `TrioBackend` below: a wsproto server that echoes,
answers pings unless told not to, records every control frame and close, and can go silent (keep
reading, answer nothing) to play a dead peer. The slowloris test alone runs on the real clock.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import struct
from dataclasses import dataclass, field

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from tests.support import RawClient, free_port, proxy_yaml, start_proxy
from wsproxy.runtime.session import Session

RELAYS = ["passthrough", "inspect"]
MARKER = b"wsproxy:"
SLACK = 1.0  # virtual seconds a deadline may be late by (loopback I/O takes no virtual time)


@pytest.fixture(params=RELAYS)
def relay(request: pytest.FixtureRequest) -> str:
    return request.param


def config(backend_port: int, relay: str, extra: str = "") -> str:
    return proxy_yaml([backend_port], listener_extra=f"relay: {relay}", extra=extra)


# --------------------------------------------------------------------------------------------
# peers: one wsproto endpoint on a trio stream that records everything it sees


@dataclass
class Peer:
    """One end of a WebSocket (client or backend) driven by a reader task.

    Echoes data messages if `echo`; answers pings unless `answer_pings` is False; answers a close
    unless `answer_close` is False. `silent` stops all of that: bytes are still read (so the end
    of the stream is seen) but discarded, as from a peer that has vanished.
    """

    name: str
    stream: trio.abc.Stream
    ws: WSConnection
    echo: bool = False
    answer_pings: bool = True
    answer_close: bool = True
    silent: bool = False
    pending: list[Event] = field(default_factory=list)
    pings: list[tuple[float, bytes]] = field(default_factory=list)
    pongs: list[tuple[float, bytes]] = field(default_factory=list)
    messages: list[tuple[float, str | bytes]] = field(default_factory=list)
    close: CloseConnection | None = None
    close_at: float | None = None
    eof_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)  # a close frame arrived
    eof: trio.Event = field(default_factory=trio.Event)  # the stream ended (the proxy closed it)
    _parts: list = field(default_factory=list)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    _inbox: trio.MemorySendChannel | None = None
    _outbox: trio.MemoryReceiveChannel | None = None

    def __post_init__(self) -> None:
        self._inbox, self._outbox = trio.open_memory_channel(math.inf)

    async def run(self) -> None:
        for ev in self.pending:
            await self._handle(ev)
        self.pending = []
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof_at = trio.current_time()
                self.eof.set()
                return
            if self.silent:
                continue
            self.ws.receive_data(data)
            for ev in self.ws.events():
                await self._handle(ev)

    async def _handle(self, ev: Event) -> None:
        now = trio.current_time()
        if isinstance(ev, Ping):
            self.pings.append((now, bytes(ev.payload)))
            if self.answer_pings and not self.silent:
                await self.send(ev.response())
        elif isinstance(ev, Pong):
            self.pongs.append((now, bytes(ev.payload)))
        elif isinstance(ev, TextMessage | BytesMessage):
            self._parts.append(ev.data)
            if ev.message_finished:
                msg: str | bytes = (
                    "".join(self._parts) if isinstance(ev, TextMessage) else b"".join(bytes(p) for p in self._parts)
                )
                self._parts = []
                self.messages.append((now, msg))
                assert self._inbox is not None
                self._inbox.send_nowait(msg)
                if self.echo and not self.silent:
                    cls = TextMessage if isinstance(msg, str) else BytesMessage
                    await self.send(cls(data=msg))
        elif isinstance(ev, CloseConnection):
            self.close, self.close_at = ev, now
            self.closed.set()
            if self.answer_close and not self.silent and self.ws.state is ConnectionState.REMOTE_CLOSING:
                await self.send(ev.response())

    async def send(self, event: Event) -> None:
        async with self._lock:
            # if the proxy has dropped us, the reader sees the end of the stream
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(self.ws.send(event))

    async def receive(self) -> str | bytes:
        assert self._outbox is not None
        return await self._outbox.receive()

    async def roundtrip(self, text: str) -> str | bytes:
        await self.send(TextMessage(data=text))
        return await self.receive()

    def proxy_pings(self) -> list[tuple[float, bytes]]:
        return [(t, p) for t, p in self.pings if p.startswith(MARKER)]


class TrioBackend:
    """A wsproto server in this trio run; each accepted connection becomes a `Peer` (echoing)."""

    def __init__(self) -> None:
        self.port = 0
        self.peers: list[Peer] = []
        self._send, self._recv = trio.open_memory_channel[Peer](math.inf)
        self.configure: dict[str, object] = {}  # attributes set on every new Peer

    async def start(self, nursery: trio.Nursery) -> TrioBackend:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        pending: list[Event] = []
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
            events = list(ws.events())
            if events and isinstance(events[0], Request):
                await stream.send_all(ws.send(AcceptConnection()))
                pending = events[1:]
                break
        peer = Peer("backend", stream, ws, echo=True, pending=pending)
        for key, value in self.configure.items():
            setattr(peer, key, value)
        self.peers.append(peer)
        self._send.send_nowait(peer)
        await peer.run()

    async def next_peer(self) -> Peer:
        return await self._recv.receive()


async def open_client(nursery: trio.Nursery, port: int, **options: object) -> Peer:
    """Handshake with RawClient, then hand its stream and events to a `Peer` reader task."""
    raw = await RawClient.connect(port)
    assert raw.accept is not None, f"the proxy refused the handshake: {raw.reject}"
    peer = Peer("client", raw.stream, raw.ws, pending=list(raw.pending))
    for key, value in options.items():
        setattr(peer, key, value)
    nursery.start_soon(peer.run)
    return peer


@dataclass
class Pair:
    client: Peer
    backend: Peer
    t0: float  # virtual time the session opened


async def open_pair(nursery: trio.Nursery, proxy_port: int, backend: TrioBackend, **client_options: object) -> Pair:
    client = await open_client(nursery, proxy_port, **client_options)
    t0 = trio.current_time()
    peer = await backend.next_peer()
    return Pair(client, peer, t0)


async def setup(
    nursery: trio.Nursery, relay: str, extra: str, **client_options: object
) -> tuple[TrioBackend, int, Pair]:
    backend = await TrioBackend().start(nursery)
    proxy = await start_proxy(nursery, config(backend.port, relay, extra))
    pair = await open_pair(nursery, proxy.port(), backend, **client_options)
    return backend, proxy.port(), pair


HB = "heartbeat: {interval: 20s, timeout: 10s, legs: both}\n"


# --------------------------------------------------------------------------------------------
# heartbeats


async def test_idle_session_gets_a_proxy_ping_on_each_leg_after_the_interval(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    await trio.sleep(19.5)
    assert pair.client.pings == [] and pair.backend.pings == []
    await trio.sleep(2)
    for peer in (pair.client, pair.backend):
        assert len(peer.pings) == 1, f"{peer.name} pings: {peer.pings}"
        when, payload = peer.pings[0]
        assert payload.startswith(MARKER)
        assert 20 - 0.01 <= when - pair.t0 <= 20 + SLACK


async def test_proxy_pings_repeat_while_the_session_stays_idle(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    await trio.sleep(101)
    for peer in (pair.client, pair.backend):
        times = [t - pair.t0 for t, _ in peer.proxy_pings()]
        assert len(times) == 5, f"{peer.name}: {times}"
        assert len({p for _, p in peer.proxy_pings()}) == 5  # a fresh payload each time
    assert await pair.client.roundtrip("still here") == "still here"


async def test_pongs_to_proxy_pings_are_swallowed(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    await trio.sleep(65)
    assert len(pair.client.proxy_pings()) >= 3 and len(pair.backend.proxy_pings()) >= 3
    # each peer answered its pings; no pong (and no ping) crossed to the other peer
    assert pair.client.pongs == [] and pair.backend.pongs == []
    assert pair.client.pings == pair.client.proxy_pings()
    assert pair.backend.pings == pair.backend.proxy_pings()
    client_payloads = {p for _, p in pair.client.pings}
    backend_payloads = {p for _, p in pair.backend.pings}
    assert not client_payloads & backend_payloads


async def test_peer_pings_and_pongs_pass_end_to_end(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    with trio.fail_after(5):
        await pair.client.send(Ping(payload=b"from-client"))
        while not pair.client.pongs:
            await trio.sleep(0.01)
        assert pair.backend.pings[-1][1] == b"from-client"
        assert pair.client.pongs == [(pair.client.pongs[0][0], b"from-client")]
        await pair.backend.send(Ping(payload=b"from-backend"))
        while not pair.backend.pongs:
            await trio.sleep(0.01)
        assert pair.client.pings[-1][1] == b"from-backend"
        assert pair.backend.pongs[0][1] == b"from-backend"


async def test_unsolicited_pong_from_the_client_reaches_the_backend(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    await pair.client.send(Pong(payload=b"unsolicited"))
    await pair.client.send(TextMessage(data="after"))
    with trio.fail_after(5):
        assert await pair.backend.receive() == "after"
    assert [p for _, p in pair.backend.pongs] == [b"unsolicited"]


async def test_unsolicited_pong_from_the_backend_reaches_the_client(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB)
    await pair.backend.send(Pong(payload=b"heartbeat-of-my-own"))
    await pair.backend.send(TextMessage(data="after"))
    with trio.fail_after(5):
        assert await pair.client.receive() == "after"
    assert [p for _, p in pair.client.pongs] == [b"heartbeat-of-my-own"]


async def test_client_ping_that_looks_like_the_proxys_still_gets_its_pong(autojump_clock, nursery, relay) -> None:
    """Only pongs that answer the proxy's own pings are swallowed; a peer's ping is end to end
    whatever its payload (another wsproxy in front of this one marks its pings the same way)."""
    _, _, pair = await setup(nursery, relay, HB)
    payload = MARKER + b"\x00\x00\x00\x01abcd"
    await pair.client.send(Ping(payload=payload))
    await pair.client.send(TextMessage(data="after"))
    with trio.fail_after(5):
        assert await pair.client.receive() == "after"  # the echo comes after the backend's pong
    assert [p for _, p in pair.backend.pings] == [payload]
    assert [p for _, p in pair.client.pongs] == [payload]


async def test_dead_client_gets_backend_a_1001_and_its_socket_closed(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, HB, silent=True)
    with trio.fail_after(60):
        await pair.backend.closed.wait()
        await pair.client.eof.wait()
    assert pair.backend.close is not None and pair.backend.close.code == 1001
    assert pair.backend.close_at is not None and pair.client.eof_at is not None
    # pinged at 20 s of silence, dead 10 s later
    assert 30 - 0.01 <= pair.backend.close_at - pair.t0 <= 30 + SLACK
    assert 30 - 0.01 <= pair.client.eof_at - pair.t0 <= 30 + SLACK
    with trio.fail_after(10):
        await pair.backend.eof.wait()  # the backend answered the close: its socket closes too


async def test_dead_backend_gets_client_a_1011_and_its_socket_closed(autojump_clock, nursery, relay) -> None:
    backend = await TrioBackend().start(nursery)
    backend.configure = {"silent": True}
    proxy = await start_proxy(nursery, config(backend.port, relay, HB))
    pair = await open_pair(nursery, proxy.port(), backend)
    with trio.fail_after(60):
        await pair.client.closed.wait()
        await pair.backend.eof.wait()
    assert pair.client.close is not None and pair.client.close.code == 1011
    assert pair.client.close_at is not None and pair.backend.eof_at is not None
    assert 30 - 0.01 <= pair.client.close_at - pair.t0 <= 30 + SLACK
    assert 30 - 0.01 <= pair.backend.eof_at - pair.t0 <= 30 + SLACK
    with trio.fail_after(10):
        await pair.client.eof.wait()


async def test_dead_peer_is_logged_with_leg_and_silence(autojump_clock, nursery, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    _, _, pair = await setup(nursery, relay, HB, silent=True)
    with trio.fail_after(60):
        await pair.client.eof.wait()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("wsproxy")]
    assert any("client" in ln and "30.0s" in ln for ln in lines), lines


async def test_peer_that_sends_data_but_never_pongs_is_not_dead(autojump_clock, nursery, relay) -> None:
    """Traffic after a ping proves the peer lives, even if its pong is not back yet."""
    _, _, pair = await setup(nursery, relay, HB, answer_pings=False)
    for _ in range(8):  # pinged 20 s into each silence, a message 5 s later, never a pong
        await trio.sleep(25)
        assert await pair.client.roundtrip("tick") == "tick"
    assert pair.backend.close is None and pair.client.close is None
    assert len(pair.client.proxy_pings()) == 8


@pytest.mark.parametrize("direction", ["backend_to_client", "client_to_backend"])
async def test_peer_receiving_one_long_slow_frame_is_not_declared_dead(
    autojump_clock, nursery, relay, direction
) -> None:
    """One 100 KiB frame trickles in at 2 KiB/s for 50 s to a peer that only reads. Its
    leg is silent, so it is pinged; if the proxy cannot put the ping on the wire before that
    frame ends, the peer has no chance to answer and must not be judged dead for it."""
    _, _, pair = await setup(nursery, relay, HB)
    if direction == "backend_to_client":
        sender, receiver = pair.backend, pair.client
    else:
        sender, receiver = pair.client, pair.backend
    sender.answer_pings = False  # never interleave a pong into the raw frame below
    masked = sender is pair.client
    size = 100 * 1024
    header = struct.pack("!BBQ", 0x82, (0x80 if masked else 0) | 127, size) + (b"\0\0\0\0" if masked else b"")
    async with sender._lock:
        await sender.stream.send_all(header)
    for _ in range(50):
        if receiver.close is not None or sender.close is not None:
            break
        async with sender._lock:
            await sender.stream.send_all(b"x" * 2048)
        await trio.sleep(1)
    assert receiver.close is None, f"{receiver.name} got {receiver.close} at {receiver.close_at - pair.t0:.0f}s"
    assert sender.close is None, f"{sender.name} got {sender.close} at {sender.close_at - pair.t0:.0f}s"
    with trio.fail_after(5):
        assert await receiver.receive() == b"x" * size
    with trio.fail_after(30):
        while not receiver.proxy_pings():
            await trio.sleep(1)


async def test_legs_client_pings_only_the_client(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, "heartbeat: {interval: 20s, timeout: 10s, legs: client}\n")
    await trio.sleep(101)
    assert len(pair.client.proxy_pings()) == 5
    assert pair.backend.pings == []


async def test_legs_backend_pings_only_the_backend(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, "heartbeat: {interval: 20s, timeout: 10s, legs: backend}\n")
    await trio.sleep(101)
    assert len(pair.backend.proxy_pings()) == 5
    assert pair.client.pings == []


async def test_legs_client_does_not_kill_a_silent_backend(autojump_clock, nursery, relay) -> None:
    backend = await TrioBackend().start(nursery)
    backend.configure = {"silent": True}
    proxy = await start_proxy(nursery, config(backend.port, relay, "heartbeat: {interval: 20s, legs: client}\n"))
    pair = await open_pair(nursery, proxy.port(), backend)
    await trio.sleep(200)
    assert pair.client.close is None and pair.backend.eof_at is None


@pytest.mark.parametrize("heartbeat", ["heartbeat: {interval: off}\n", "heartbeat: {legs: none}\n"])
async def test_heartbeat_off_sends_no_pings(autojump_clock, nursery, relay, heartbeat) -> None:
    _, _, pair = await setup(nursery, relay, heartbeat)
    await trio.sleep(300)
    assert pair.client.pings == [] and pair.backend.pings == []
    assert await pair.client.roundtrip("alive") == "alive"


async def test_heartbeat_off_does_not_kill_silent_peers(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, "heartbeat: {interval: off}\n", silent=True)
    await trio.sleep(300)
    assert pair.backend.close is None and pair.client.eof_at is None


async def test_session_log_has_rtt_of_each_leg(autojump_clock, nursery, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.session")
    _, _, pair = await setup(nursery, relay, HB)
    await trio.sleep(21)
    assert pair.client.proxy_pings() and pair.backend.proxy_pings()
    await pair.client.send(CloseConnection(code=1000))
    with trio.fail_after(10):
        await pair.client.eof.wait()
        while not [r for r in caplog.records if r.name == "wsproxy.session" and "rtt_" in r.getMessage()]:
            await trio.sleep(0.01)
    line = next(r.getMessage() for r in caplog.records if r.name == "wsproxy.session" and "rtt_" in r.getMessage())
    assert "rtt_client=" in line and "rtt_backend=" in line


async def test_session_log_has_no_rtt_before_any_pong(autojump_clock, nursery, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.session")
    _, _, pair = await setup(nursery, relay, HB)
    await trio.sleep(5)
    await pair.client.send(CloseConnection(code=1000))
    with trio.fail_after(10):
        await pair.client.eof.wait()
        while not [r for r in caplog.records if r.getMessage().startswith("session ")]:
            await trio.sleep(0.01)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("session "))
    assert "rtt_client" not in line and "rtt_backend" not in line


# --------------------------------------------------------------------------------------------
# idle timeout


IDLE = "timeouts: {idle: 60s}\n" + HB


async def test_idle_session_is_closed_with_1001_on_both_sides(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, IDLE)
    with trio.fail_after(120):
        await pair.client.closed.wait()
        await pair.backend.closed.wait()
    for peer in (pair.client, pair.backend):
        assert peer.close is not None and peer.close.code == 1001
        assert "idle" in (peer.close.reason or "")
        assert peer.close_at is not None and 60 - 0.01 <= peer.close_at - pair.t0 <= 60 + SLACK
    with trio.fail_after(10):
        await pair.client.eof.wait()
        await pair.backend.eof.wait()


async def test_idle_timeout_works_with_heartbeats_off(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, "timeouts: {idle: 60s}\nheartbeat: {interval: off}\n")
    with trio.fail_after(120):
        await pair.client.closed.wait()
        await pair.backend.closed.wait()
    assert pair.client.close is not None and pair.client.close.code == 1001
    assert pair.backend.close is not None and pair.backend.close.code == 1001
    assert pair.client.close_at is not None and 60 - 0.01 <= pair.client.close_at - pair.t0 <= 60 + SLACK


async def test_pings_and_pongs_do_not_keep_an_idle_session_alive(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, IDLE)

    async def chatter() -> None:
        for i in range(12):  # a ping each way every 5 s until 55 s, and an unsolicited pong
            await pair.client.send(Ping(payload=b"c%d" % i))
            await pair.backend.send(Ping(payload=b"b%d" % i))
            await pair.client.send(Pong(payload=b"p%d" % i))
            await trio.sleep(5)

    nursery.start_soon(chatter)
    with trio.fail_after(120):
        await pair.client.closed.wait()
    assert pair.client.close is not None and pair.client.close.code == 1001
    assert pair.client.close_at is not None and 60 - 0.01 <= pair.client.close_at - pair.t0 <= 60 + SLACK
    assert len(pair.backend.pings) >= 10  # the chatter did get through


async def test_a_data_message_postpones_the_idle_timeout(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, IDLE)
    await trio.sleep(40)
    assert await pair.client.roundtrip("keep me") == "keep me"
    await trio.sleep(30)  # 70 s since the start, 30 s since data
    assert pair.client.close is None
    assert await pair.client.roundtrip("still") == "still"  # at 70 s: the next deadline is 130 s
    with trio.fail_after(120):
        await pair.client.closed.wait()
    assert pair.client.close is not None and pair.client.close.code == 1001
    assert pair.client.close_at is not None and 130 - 0.01 <= pair.client.close_at - pair.t0 <= 130 + SLACK


async def test_a_message_from_the_backend_postpones_the_idle_timeout(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, IDLE)
    await trio.sleep(50)
    await pair.backend.send(TextMessage(data="push"))
    assert await pair.client.receive() == "push"
    with trio.fail_after(120):
        await pair.client.closed.wait()
    assert pair.client.close_at is not None and 110 - 0.01 <= pair.client.close_at - pair.t0 <= 110 + SLACK


async def test_a_slowly_streamed_message_is_not_idle(autojump_clock, nursery, relay) -> None:
    """Fragments of one long message are data flowing: the session is not idle while they arrive."""
    _, _, pair = await setup(nursery, relay, IDLE)
    for _ in range(10):  # one fragment every 20 s for 200 s
        if pair.client.close is not None:
            break
        await pair.client.send(BytesMessage(data=b"x" * 100, message_finished=False))
        await trio.sleep(20)
    assert pair.client.close is None, f"closed at {pair.client.close_at - pair.t0:.1f}s: {pair.client.close}"
    assert pair.backend.close is None
    await pair.client.send(BytesMessage(data=b"end", message_finished=True))
    with trio.fail_after(5):
        assert await pair.backend.receive() == b"x" * 1000 + b"end"


# --------------------------------------------------------------------------------------------
# max lifetime


LIFETIME = "timeouts: {max_lifetime: 100s, max_lifetime_jitter: 10%}\n" + HB


async def test_session_is_closed_with_1001_within_the_jittered_lifetime(autojump_clock, nursery, relay) -> None:
    _, _, pair = await setup(nursery, relay, LIFETIME)

    async def busy() -> None:  # data does not extend a lifetime
        while pair.client.close is None:
            await pair.client.send(TextMessage(data="tick"))
            await trio.sleep(10)

    nursery.start_soon(busy)
    with trio.fail_after(200):
        await pair.client.closed.wait()
        await pair.backend.closed.wait()
    for peer in (pair.client, pair.backend):
        assert peer.close is not None and peer.close.code == 1001
        assert peer.close_at is not None and 90 - 0.01 <= peer.close_at - pair.t0 <= 100 + 0.01
    with trio.fail_after(10):
        await pair.client.eof.wait()
        await pair.backend.eof.wait()


async def test_sessions_opened_together_close_at_spread_out_times(autojump_clock, nursery, relay) -> None:
    backend = await TrioBackend().start(nursery)
    proxy = await start_proxy(nursery, config(backend.port, relay, LIFETIME))
    pairs = [await open_pair(nursery, proxy.port(), backend) for _ in range(20)]
    t0 = min(p.t0 for p in pairs)
    assert max(p.t0 for p in pairs) - t0 < 0.01
    with trio.fail_after(200):
        for p in pairs:
            await p.client.closed.wait()
    times = sorted(p.client.close_at - t0 for p in pairs if p.client.close_at is not None)
    assert len(times) == 20
    assert all(90 - 0.01 <= t <= 100 + 0.01 for t in times), times
    assert all(p.client.close is not None and p.client.close.code == 1001 for p in pairs)
    # uniform jitter over 10 s: 20 sessions spread over far more than an instant
    assert len({round(t, 3) for t in times}) >= 15, times
    assert times[-1] - times[0] >= 3.0, times


async def test_a_closed_session_is_freed_long_before_its_lifetime_deadline(autojump_clock, nursery, relay) -> None:
    """Sessions that end early must not stay referenced (with their relay and buffers) until a
    deadline hours away: with a 1 h lifetime, a busy proxy would otherwise hold an hour of churn."""
    backend = await TrioBackend().start(nursery)
    extra = "timeouts: {max_lifetime: 1h}\nheartbeat: {interval: off}\n"
    proxy = await start_proxy(nursery, config(backend.port, relay, extra))
    for _ in range(10):
        pair = await open_pair(nursery, proxy.port(), backend)
        assert await pair.client.roundtrip("hi") == "hi"
        await pair.client.send(CloseConnection(code=1000))
        with trio.fail_after(10):
            await pair.client.eof.wait()
            while proxy.server.sessions:
                await trio.sleep(0.01)
    del pair
    await trio.sleep(1)
    gc.collect()
    snapshot = proxy.server.snapshot
    alive = sum(1 for o in gc.get_objects() if isinstance(o, Session) and o.snapshot is snapshot)
    assert alive == 0, f"{alive} of 10 closed sessions are still referenced"


# --------------------------------------------------------------------------------------------
# close timeout


async def test_close_timeout_drops_both_sockets_when_the_backend_never_answers(autojump_clock, nursery, relay) -> None:
    backend = await TrioBackend().start(nursery)
    backend.configure = {"answer_close": False}
    proxy = await start_proxy(nursery, config(backend.port, relay, "timeouts: {close: 2s}\n" + HB))
    pair = await open_pair(nursery, proxy.port(), backend)
    await trio.sleep(1)
    sent_at = trio.current_time()
    await pair.client.send(CloseConnection(code=1000, reason="bye"))
    with trio.fail_after(30):
        await pair.backend.closed.wait()
        await pair.client.eof.wait()
        await pair.backend.eof.wait()
    assert pair.backend.close is not None and pair.backend.close.code == 1000
    assert pair.client.eof_at is not None and pair.backend.eof_at is not None
    assert 2 - 0.01 <= pair.client.eof_at - sent_at <= 2 + SLACK
    assert 2 - 0.01 <= pair.backend.eof_at - sent_at <= 2 + SLACK


async def test_close_timeout_drops_a_client_that_never_answers_the_proxys_close(autojump_clock, nursery, relay) -> None:
    extra = "timeouts: {close: 2s, idle: 30s}\nheartbeat: {interval: off}\n"
    _, _, pair = await setup(nursery, relay, extra, answer_close=False)
    with trio.fail_after(60):
        await pair.client.closed.wait()
        await pair.client.eof.wait()
    assert pair.client.close_at is not None and pair.client.eof_at is not None
    assert 2 - 0.01 <= pair.client.eof_at - pair.client.close_at <= 2 + SLACK


# --------------------------------------------------------------------------------------------
# slowloris (real clock)


async def test_slowloris_client_is_cut_off_at_the_handshake_timeout(nursery) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([free_port()], extra="timeouts: {handshake: 0.5s}\n"))
    request = (
        b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    start = trio.current_time()
    sent = 0
    answer = b""
    ended_at: float | None = None

    async def drip() -> None:
        nonlocal sent
        for i in range(len(request)):
            try:
                await stream.send_all(request[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            sent += 1
            await trio.sleep(0.1)

    async with stream, trio.open_nursery() as inner:
        inner.start_soon(drip)
        with trio.fail_after(5):
            while True:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    break
                answer += data
        ended_at = trio.current_time()
        inner.cancel_scope.cancel()
    elapsed = ended_at - start
    assert 0.4 <= elapsed <= 1.0, f"cut off after {elapsed:.2f}s"
    assert sent < len(request) // 2  # long before the request would have been complete
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer


# --------------------------------------------------------------------------------------------
# an idle-dropping middlebox (NAT, corporate proxy) between client and proxy


class Middlebox:
    """A TCP relay that drops (closes both sides of) any flow silent for `idle_drop` seconds."""

    def __init__(self, target_port: int, idle_drop: float) -> None:
        self.target_port = target_port
        self.idle_drop = idle_drop
        self.port = 0
        self.dropped: list[float] = []

    async def start(self, nursery: trio.Nursery) -> Middlebox:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        last = trio.current_time()

        async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            nonlocal last
            while True:
                try:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    last = trio.current_time()
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            scope.cancel()

        async def watchdog() -> None:
            while True:
                await trio.sleep_until(last + self.idle_drop)
                if trio.current_time() - last >= self.idle_drop:
                    self.dropped.append(trio.current_time())
                    scope.cancel()
                    return

        async with trio.open_nursery() as relay_nursery:
            scope = relay_nursery.cancel_scope
            relay_nursery.start_soon(copy, downstream, upstream)
            relay_nursery.start_soon(copy, upstream, downstream)
            relay_nursery.start_soon(watchdog)
        await trio.aclose_forcefully(downstream)
        await trio.aclose_forcefully(upstream)


async def test_heartbeats_keep_a_session_open_through_an_idle_dropping_middlebox(
    autojump_clock, nursery, relay
) -> None:
    backend = await TrioBackend().start(nursery)
    proxy = await start_proxy(nursery, config(backend.port, relay, HB))
    box = await Middlebox(proxy.port(), idle_drop=30).start(nursery)
    pair = await open_pair(nursery, box.port, backend)
    await trio.sleep(150)
    assert box.dropped == []
    assert pair.client.eof_at is None and pair.client.close is None
    with trio.fail_after(5):
        assert await pair.client.roundtrip("after 150 s") == "after 150 s"


async def test_without_heartbeats_an_idle_dropping_middlebox_kills_the_session(autojump_clock, nursery, relay) -> None:
    backend = await TrioBackend().start(nursery)
    proxy = await start_proxy(nursery, config(backend.port, relay, "heartbeat: {interval: off}\n"))
    box = await Middlebox(proxy.port(), idle_drop=30).start(nursery)
    pair = await open_pair(nursery, box.port, backend)
    with trio.fail_after(150):
        await pair.client.eof.wait()
    assert len(box.dropped) == 1 and 30 - 0.01 <= box.dropped[0] - pair.t0 <= 30 + SLACK
    # the proxy saw its client vanish: the backend is told the client went away
    with trio.fail_after(10):
        await pair.backend.closed.wait()
    assert pair.backend.close is not None and pair.backend.close.code == 1001
