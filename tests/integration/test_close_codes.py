"""Close codes end to end: normal closes both ways, peers that vanish, peers that break the protocol.

RFC 6455 as the spec reads it: a close code and reason pass end to end and the closing handshake
completes on both hops; a peer lost without a close makes the proxy send the other peer 1001
(client gone) or 1011 (backend lost) promptly; a protocol error gets the offending peer 1002/1007
and the other peer 1001 (client at fault) or 1011 (backend at fault); both sockets end closed.
Misbehaving backends are raw trio servers that complete a real 101 and then send exactly the
bytes a test asks for.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.frame_protocol import CloseReason

from tests.integration.test_relay import (
    RELAY_LISTENER_YAML,
    Recorder,
    frame,
    recording_echo,
    relay_yaml,
    wait_sessions_gone,
    wait_thread_event,
)
from tests.support import RawClient, start_backend, start_proxy
from wsproxy.protocol.handshake import accept_key

PROMPTLY = 2.0  # seconds: "promptly" for a peer lost or a protocol error
# The close timeout is longer than PROMPTLY, so a proxy that only cuts a session when that timer
# fires fails these tests instead of passing them slowly.
TIMEOUTS = "timeouts: {handshake: 1s, connect: 1s, close: 4s}\n"


@pytest.fixture(params=sorted(RELAY_LISTENER_YAML))
def relay_mode(request: pytest.FixtureRequest) -> str:
    return request.param


def reason_of_123_bytes() -> str:
    reason = "🎉" + "ü" * 58 + "end"  # 4 + 116 + 3 bytes: the longest reason a close frame can carry
    assert len(reason.encode()) == 123
    return reason


REASON_123 = reason_of_123_bytes()


# --------------------------------------------------------------------------------------------
# helpers


async def receive_close(client: RawClient) -> CloseConnection:
    """The proxy's close frame; answered if the proxy started the handshake and still listens.

    Events skipped on the way are kept in client.control.
    """
    while True:
        ev = await client.next_event()
        if not isinstance(ev, CloseConnection):
            client.control.append(ev)
        else:
            if client.ws.state.name == "REMOTE_CLOSING":
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.stream.send_all(client.ws.send(ev.response()))
            return ev


def reset(stream: trio.SocketStream) -> None:
    """Make the next close an RST instead of a FIN."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FrameReader:
    """Reads an HTTP head, then WebSocket frames, from a trio stream (the raw backend's side)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof = True
                return False
            self.buf += data
        return True

    async def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            if not await self._fill(len(self.buf) + 1):
                raise AssertionError("the proxy closed before sending its upgrade request")
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        return head

    async def read_frame(self) -> RawFrame | None:
        if not await self._fill(2):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            if not await self._fill(4):
                return None
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not await self._fill(10):
                return None
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            if not await self._fill(pos + 4):
                return None
            key, pos = bytes(self.buf[pos : pos + 4]), pos + 4
        if not await self._fill(pos + n):
            return None
        payload = bytes(self.buf[pos : pos + n])
        del self.buf[: pos + n]
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return RawFrame(fin=bool(b0 & 0x80), opcode=b0 & 0x0F, masked=masked, payload=payload)


@dataclass
class RawFrame:
    fin: bool
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == 0x8
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


@dataclass
class RawBackend:
    port: int
    frames: list[RawFrame] = field(default_factory=list)  # what the proxy sent after the 101
    finished: trio.Event = field(default_factory=trio.Event)  # the proxy's stream ended (or we ended it)
    acted_at: float | None = None  # when the script did its misdeed

    def closes(self) -> list[RawFrame]:
        return [f for f in self.frames if f.opcode == 0x8]


Script = Callable[[trio.SocketStream, FrameReader, RawBackend], Awaitable[bool]]


async def start_raw_backend(nursery: trio.Nursery, script: Script) -> RawBackend:
    """A backend that answers one real 101, runs `script`, then records frames until EOF.

    The script returns True to keep reading what the proxy sends, False if it ended the stream.
    """
    backend = RawBackend(port=0)

    async def handle(stream: trio.SocketStream) -> None:
        reader = FrameReader(stream)
        try:
            head = await reader.read_head()
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            if await script(stream, reader, backend):
                while (f := await reader.read_frame()) is not None:
                    backend.frames.append(f)
        finally:
            backend.finished.set()
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    backend.port = listeners[0].socket.getsockname()[1]
    return backend


def after_first_frame(action: Callable[[trio.SocketStream], Awaitable[bool]]) -> Script:
    """A script that waits for the client's first frame (so the session is up), then acts."""

    async def script(stream: trio.SocketStream, reader: FrameReader, backend: RawBackend) -> bool:
        f = await reader.read_frame()
        assert f is not None
        backend.frames.append(f)
        backend.acted_at = trio.current_time()
        return await action(stream)

    return script


def sends(data: bytes) -> Callable[[trio.SocketStream], Awaitable[bool]]:
    async def action(stream: trio.SocketStream) -> bool:
        await stream.send_all(data)
        return True

    return action


async def closes_tcp(stream: trio.SocketStream) -> bool:
    await stream.aclose()
    return False


async def resets_tcp(stream: trio.SocketStream) -> bool:
    reset(stream)
    await stream.aclose()
    return False


async def closes_tcp_mid_message(stream: trio.SocketStream) -> bool:
    await stream.send_all(frame(0x1, b"half a mess", fin=False, mask=False))
    await trio.sleep(0.05)
    await stream.aclose()
    return False


# --------------------------------------------------------------------------------------------
# normal closes, both directions


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_client_close_code_and_reason_reach_backend_and_handshake_completes(
    nursery, backends, relay_mode, code
) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="hi"))
        assert await client.receive_message() == "hi"
        answer = await client.close(code, REASON_123)
    # the proxy's answering close carries the backend's answer: the same code and reason
    assert (answer.code, answer.reason) == (code, REASON_123)
    with trio.fail_after(PROMPTLY):
        await client.expect_eof()
    assert await wait_thread_event(rec.ended, PROMPTLY)
    assert (rec.close_code, rec.close_reason) == (code, REASON_123)
    await wait_sessions_gone(proxy)


async def test_client_close_without_status_reaches_backend_as_1005(nursery, backends, relay_mode) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        answer = await client.close(CloseReason.NO_STATUS_RCVD)
        await client.expect_eof()
    assert answer.code == CloseReason.NO_STATUS_RCVD
    assert await wait_thread_event(rec.ended, PROMPTLY)
    assert rec.close_code == 1005


@pytest.mark.parametrize(
    ("code", "reason"), [(4000, "bye"), (1000, ""), (1001, "going away"), (3000, REASON_123), (4999, "é")]
)
async def test_backend_close_code_and_reason_reach_client_and_handshake_completes(
    nursery, backends, relay_mode, code, reason
) -> None:
    seen: dict[str, object] = {}
    done = Recorder()

    def handler(conn: ServerConnection) -> None:
        try:
            conn.recv()
            t0 = time.monotonic()
            conn.close(code, reason)
            seen["close_took"] = time.monotonic() - t0
            seen["answer"] = (conn.close_code, conn.close_reason)
        finally:
            done.ended.set()

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="close please"))
        got = await client.wait_close()  # answers it
    assert (got.code, got.reason or "") == (code, reason)
    with trio.fail_after(PROMPTLY):
        await client.expect_eof()
    assert await wait_thread_event(done.ended, 5)
    # the client's answer came back through the proxy, so the backend's handshake completed quickly
    assert seen["answer"] == (code, reason)
    assert seen["close_took"] < PROMPTLY
    await wait_sessions_gone(proxy)


async def test_simultaneous_closes_from_both_peers_end_both_hops(nursery, relay_mode) -> None:
    async def close_at_once(stream: trio.SocketStream) -> bool:
        await stream.send_all(frame(0x8, struct.pack("!H", 4002) + b"backend first", mask=False))
        return True

    backend = await start_raw_backend(nursery, after_first_frame(close_at_once))
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="go"))
        await client.send(CloseConnection(code=4001, reason="client too"))
        got = await receive_close(client)
        await client.expect_eof()
    assert got.code in (4001, 4002)
    with trio.fail_after(PROMPTLY):
        await backend.finished.wait()
    assert [f.close_code for f in backend.closes()] in ([4001], [4002])
    await wait_sessions_gone(proxy)


# --------------------------------------------------------------------------------------------
# a peer lost without a close


@pytest.mark.parametrize("how", ["fin", "rst", "fin-mid-message", "rst-mid-message"])
async def test_client_gone_without_close_gives_backend_1001_promptly(nursery, backends, relay_mode, how) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="hi"))
        assert await client.receive_message() == "hi"
        if how.endswith("mid-message"):
            await client.send(TextMessage(data="never fini", message_finished=False))
            await trio.sleep(0.05)
    if how.startswith("rst"):
        reset(client.stream)
    await client.stream.aclose()
    assert await wait_thread_event(rec.ended, PROMPTLY), "the backend did not hear about the client promptly"
    assert rec.close_code == 1001
    await wait_sessions_gone(proxy, PROMPTLY)


@pytest.mark.parametrize(
    "action", [closes_tcp, resets_tcp, closes_tcp_mid_message], ids=["fin", "rst", "fin-mid-message"]
)
async def test_backend_lost_without_close_gives_client_1011_promptly(nursery, relay_mode, action) -> None:
    backend = await start_raw_backend(nursery, after_first_frame(action))
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="die now"))
        await backend.finished.wait()
    assert backend.acted_at is not None
    with trio.fail_after(PROMPTLY):
        got = await receive_close(client)
        await client.expect_eof()
    assert got.code == 1011
    await wait_sessions_gone(proxy, PROMPTLY)


async def test_backend_handler_crash_reaches_client_as_1011(nursery, backends, relay_mode) -> None:
    def handler(conn: ServerConnection) -> None:
        conn.recv()
        raise RuntimeError("backend bug (expected by the test)")

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="crash"))
        got = await receive_close(client)
    assert got.code == 1011
    with trio.fail_after(PROMPTLY):
        await client.expect_eof()
    await wait_sessions_gone(proxy, PROMPTLY)


# --------------------------------------------------------------------------------------------
# protocol errors


CLIENT_PROTOCOL_ERRORS = {
    "unmasked-frame": (frame(0x1, b"hello", mask=False), 1002),
    "invalid-utf8-text": (frame(0x1, b"ok \xff\xfe"), 1007),
    "invalid-utf8-across-fragments": (frame(0x1, b"\xe2\x98", fin=False) + frame(0x0, b"x"), 1007),
    "rsv1-without-extension": (frame(0x1, b"hello", rsv=4), 1002),
    "rsv2": (frame(0x2, b"hello", rsv=2), 1002),
    "rsv3": (frame(0x2, b"hello", rsv=1), 1002),
    "reserved-data-opcode": (frame(0x3, b"hello"), 1002),
    "reserved-control-opcode": (frame(0xB, b"hello"), 1002),
    "continuation-without-start": (frame(0x0, b"hello"), 1002),
    "new-message-inside-fragmented-one": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
    "fragmented-ping": (frame(0x9, b"ping", fin=False), 1002),
    "ping-over-125-bytes": (frame(0x9, b"x" * 126), 1002),
    "close-with-1-byte-payload": (frame(0x8, b"\x03"), 1002),
    "close-with-code-1005-on-the-wire": (frame(0x8, struct.pack("!H", 1005)), 1002),
    "close-with-code-999": (frame(0x8, struct.pack("!H", 999)), 1002),
    "close-with-invalid-utf8-reason": (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),
}


# Payload validity (UTF-8 in text messages) is judged by the inspect relay, which reads every
# payload; the passthrough relay forwards payloads as they arrive without unmasking them (issue
# 11), so there the receiving endpoint fails the connection with its own 1007, which passes end
# to end (test_passthrough_leaves_invalid_utf8_to_the_endpoint below).
PAYLOAD_CASES = {"invalid-utf8-text", "invalid-utf8-across-fragments"}


def _mode_cases(table: dict) -> list[tuple[str, str]]:
    return [
        (mode, case)
        for mode in sorted(RELAY_LISTENER_YAML)
        for case in sorted(table)
        if not (mode == "passthrough" and case in PAYLOAD_CASES)
    ]


async def _client_sends_after_one_echo(nursery, backends, relay_mode: str, data: bytes):  # type: ignore[no-untyped-def]
    """One good echo through a recording backend, then `data` raw from the client; the close the
    client got (after the connection ended), the backend's recorder, and the proxy."""
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="fine so far"))
        assert await client.receive_message() == "fine so far"
    await client.send_raw(data)
    with trio.fail_after(PROMPTLY):
        got = await receive_close(client)
        await client.expect_eof()
    return got, rec, proxy


@pytest.mark.parametrize(("relay_mode", "case"), _mode_cases(CLIENT_PROTOCOL_ERRORS))
async def test_client_protocol_error_gets_client_rfc_code_and_backend_1001(nursery, backends, relay_mode, case) -> None:
    data, expected = CLIENT_PROTOCOL_ERRORS[case]
    got, rec, proxy = await _client_sends_after_one_echo(nursery, backends, relay_mode, data)
    assert got.code == expected
    assert await wait_thread_event(rec.ended, PROMPTLY)
    assert rec.close_code == 1001
    assert rec.messages == ["fine so far"]  # nothing of the bad frame reached the backend
    await wait_sessions_gone(proxy, PROMPTLY)


BACKEND_PROTOCOL_ERRORS = {
    "masked-frame": (frame(0x1, b"hello", mask=True), 1002),
    "reserved-data-opcode": (frame(0x3, b"hello", mask=False), 1002),
    "reserved-control-opcode": (frame(0xB, b"", mask=False), 1002),
    "rsv1-without-extension": (frame(0x1, b"hello", rsv=4, mask=False), 1002),
    "invalid-utf8-text": (frame(0x1, b"\xc3\x28", mask=False), 1007),
    "continuation-without-start": (frame(0x0, b"hello", mask=False), 1002),
    "ping-over-125-bytes": (frame(0x9, b"x" * 126, mask=False), 1002),
    "close-with-code-1006-on-the-wire": (frame(0x8, struct.pack("!H", 1006), mask=False), 1002),
}


@pytest.mark.parametrize(("relay_mode", "case"), _mode_cases(BACKEND_PROTOCOL_ERRORS))
async def test_backend_protocol_error_gets_backend_rfc_code_and_client_1011(nursery, relay_mode, case) -> None:
    data, expected = BACKEND_PROTOCOL_ERRORS[case]
    backend = await start_raw_backend(nursery, after_first_frame(sends(data)))
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="misbehave"))
    with trio.fail_after(PROMPTLY):
        got = await receive_close(client)
        await client.expect_eof()
        await backend.finished.wait()
    assert got.code == 1011
    closes = backend.closes()
    assert [f.close_code for f in closes] == [expected]
    assert all(f.masked for f in backend.frames), "the proxy's frames to a backend must be masked"
    assert not [ev for ev in client.control if isinstance(ev, TextMessage | BytesMessage)], "bad frame passed on"
    await wait_sessions_gone(proxy, PROMPTLY)


@pytest.mark.parametrize("case", sorted(PAYLOAD_CASES))
async def test_passthrough_leaves_invalid_utf8_to_the_endpoint(nursery, backends, case) -> None:
    """Passthrough forwards the bad text; the backend (the websockets library) fails the
    connection with 1007, and that close reaches the client end to end."""
    data, expected = CLIENT_PROTOCOL_ERRORS[case]
    got, rec, proxy = await _client_sends_after_one_echo(nursery, backends, "passthrough", data)
    assert got.code == expected == 1007
    assert await wait_thread_event(rec.ended, PROMPTLY)
    assert rec.messages == ["fine so far"]  # the backend refused the bad message itself
    await wait_sessions_gone(proxy, PROMPTLY)


async def test_client_close_while_backend_streams_completes_both_handshakes(nursery, backends, relay_mode) -> None:
    rec = Recorder()

    def handler(conn: ServerConnection) -> None:
        i = 0
        try:
            while True:
                conn.send(f"stream {i}")
                i += 1
        except ConnectionClosed as exc:
            rec.close_code = exc.rcvd.code if exc.rcvd else 1006
            rec.notes["clean"] = exc.rcvd_then_sent is not None
        finally:
            rec.ended.set()

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        first = [await client.receive_message() for _ in range(50)]
        assert first == [f"stream {i}" for i in range(50)]
        await client.send(CloseConnection(code=1000, reason="enough"))
        got = await receive_close(client)  # messages already in flight are skipped on the way
    assert (got.code, got.reason) == (1000, "enough")
    streamed: list[str] = []
    part = ""
    for ev in client.control:
        if isinstance(ev, TextMessage):
            part += ev.data
            if ev.message_finished:
                streamed.append(part)
                part = ""
    assert streamed == [f"stream {i}" for i in range(50, 50 + len(streamed))]  # in order, none lost mid-way
    with trio.fail_after(PROMPTLY):
        await client.expect_eof()
    assert await wait_thread_event(rec.ended, PROMPTLY)
    assert rec.close_code == 1000
    assert rec.notes["clean"]
    await wait_sessions_gone(proxy, PROMPTLY)


async def test_backend_close_without_status_reaches_client_and_is_answered(nursery, relay_mode) -> None:
    async def close_without_status(stream: trio.SocketStream) -> bool:
        await stream.send_all(frame(0x8, b"", mask=False))
        return True

    backend = await start_raw_backend(nursery, after_first_frame(close_without_status))
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="go"))
        got = await receive_close(client)
    assert got.code == CloseReason.NO_STATUS_RCVD
    with trio.fail_after(PROMPTLY):
        await client.expect_eof()
        await backend.finished.wait()
    assert [f.payload for f in backend.closes()] == [b""]  # answered, and without a status either
    await wait_sessions_gone(proxy, PROMPTLY)


async def test_client_vanishing_during_backend_close_still_ends_backend_handshake_promptly(
    nursery, backends, relay_mode
) -> None:
    seen: dict[str, object] = {}
    done = Recorder()

    def handler(conn: ServerConnection) -> None:
        try:
            conn.recv()
            t0 = time.monotonic()
            conn.close(4000, "bye")
            seen["close_took"] = time.monotonic() - t0
            seen["answer"] = conn.close_code
        finally:
            done.ended.set()

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="close please"))
        while not isinstance(await client.next_event(), CloseConnection):
            pass
    reset(client.stream)
    await client.stream.aclose()  # never answers the backend's close
    assert await wait_thread_event(done.ended, 5)
    assert seen["close_took"] < PROMPTLY, "the backend waited for an answer that the proxy should have given"
    assert seen["answer"] != 1006, "the backend's hop was cut without a close frame"
    await wait_sessions_gone(proxy, PROMPTLY)


async def test_backend_vanishing_during_client_close_still_answers_client_promptly(nursery, relay_mode) -> None:
    async def script(stream: trio.SocketStream, reader: FrameReader, backend: RawBackend) -> bool:
        while (f := await reader.read_frame()) is not None:
            backend.frames.append(f)
            if f.opcode == 0x8:
                backend.acted_at = trio.current_time()
                await stream.aclose()  # no answer: the backend is gone
                return False
        return False

    backend = await start_raw_backend(nursery, script)
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(CloseConnection(code=4100, reason="leaving"))
        await backend.finished.wait()
    with trio.fail_after(PROMPTLY):
        got = await receive_close(client)
        await client.expect_eof()
    assert [f.close_code for f in backend.closes()] == [4100]
    assert got.code in (4100, 1011), got
    await wait_sessions_gone(proxy, PROMPTLY)


@pytest.mark.parametrize("bad", ["reserved-opcode", "rsv2", "unmasked-frame"])
async def test_replies_in_flight_reach_the_client_before_its_protocol_error_close(nursery, relay_mode, bad) -> None:
    """The backend's answers to the client's valid messages were on their way when the client
    broke the protocol: the backend hears first (1001), its replies still reach the client,
    then the client gets its RFC code once the backend's close arrived."""

    async def answer_late(stream: trio.SocketStream, reader: FrameReader, backend: RawBackend) -> bool:
        for _ in range(2):
            f = await reader.read_frame()
            assert f is not None
            backend.frames.append(f)
        await trio.sleep(0.3)  # the replies leave after the client's bad frame reached the proxy
        for f in list(backend.frames):
            await stream.send_all(frame(0x1, b"re:" + f.payload, mask=False))
        while (f := await reader.read_frame()) is not None:
            backend.frames.append(f)
            if f.opcode == 0x8:
                await stream.send_all(frame(0x8, f.payload[:2], mask=False))
                return False
        return False

    backend = await start_raw_backend(nursery, answer_late)
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode, timeouts=TIMEOUTS))
    client = await RawClient.connect(proxy.port())
    raw = {
        "reserved-opcode": frame(0x3, b""),
        "rsv2": frame(0x2, b"hello", rsv=2),
        "unmasked-frame": frame(0x1, b"hello", mask=False),
    }[bad]
    with trio.fail_after(5):
        await client.send(TextMessage(data="q1"))
        await client.send(TextMessage(data="q2"))
        await client.stream.send_all(raw)
        assert await client.receive_message() == "re:q1"
        assert await client.receive_message() == "re:q2"
        got = await receive_close(client)
    assert got.code == 1002
    assert [f.close_code for f in backend.closes()] == [1001]
    await client.stream.aclose()
    await wait_sessions_gone(proxy, PROMPTLY)
