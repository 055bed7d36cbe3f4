"""The relay's one driver (runtime/reactor.py, runtime/link.py) where a readiness loop must do
more than wait for the kernel.

TLS plaintext that OpenSSL already decrypted (`SSLSocket.pending()`) does not make the kernel
socket readable, so a level-triggered poller never reports it; if the side cannot be read at the
moment the decrypted bytes are noticed (rate-limit pause, backpressure), they must still be read
once it can be. Work handed to the next round from outside the loop (`Reactor.soon`) must wake a
sleeping loop. Each TLS case runs on both pollers (epoll, and the portable `selectors` one).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import zlib

import pytest
import trio
from websockets.sync.server import serve
from wsproto.events import AcceptConnection, BytesMessage, Ping, Request

from tests.support import Backend, RawClient, proxy_yaml, start_backend, start_proxy
from wsproxy.protocol.frames import build_frame
from wsproxy.runtime.reactor import SelectorPoller

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: off}\n"
SMALL_READS = "limits: {buffer_bytes: 4096}\n"  # smaller than one TLS record (16 KiB)
BYTE_RATE = "rate_limits: {bytes: {rate: 8KiB/s, burst: 4KiB}, close_after: off}\n"


async def _tls_echo_one_record(nursery, backends, tls_files, extra: str) -> bytes:  # type: ignore[no-untyped-def]
    backends.append(start_backend())
    yaml = proxy_yaml([backends[0].port], tls=(tls_files.cert, tls_files.key), extra=FAST + SMALL_READS + extra)
    proxy = await start_proxy(nursery, yaml)
    client = await RawClient.connect(proxy.port(), ssl_context=tls_files.client_context())
    payload = bytes(range(256)) * 47  # 12 032 bytes: one frame, sent as one TLS record
    await client.send(BytesMessage(data=payload))
    with trio.fail_after(5):
        got = await client.receive_message()
    assert got == payload
    return got


@pytest.fixture(params=["epoll", "selectors"])
def poller(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "selectors":
        monkeypatch.setattr("wsproxy.runtime.reactor.default_poller", SelectorPoller)
    return request.param


async def test_tls_decrypted_bytes_are_read_after_a_rate_limit_pause(nursery, backends, tls_files, poller) -> None:
    """The proxy reads 4 KiB of the 12 KiB record, then 4 KiB more (from OpenSSL's buffer), then
    is over its byte budget for 0.5 s. The last ~3.8 KiB are already decrypted in OpenSSL, the
    kernel socket is empty: after the pause nothing will ever make it readable, so the link must
    ask for a read itself (`Reactor.soon`)."""
    await _tls_echo_one_record(nursery, backends, tls_files, BYTE_RATE)


async def test_tls_small_reads_without_a_pause_echo(nursery, backends, tls_files, poller) -> None:
    """Control: the same record without a rate limit is relayed (the `soon` re-read works while
    the side may be read)."""
    await _tls_echo_one_record(nursery, backends, tls_files, "")


async def test_tls_decrypted_bytes_left_by_the_handshake_read_are_relayed(nursery, backends, tls_files, poller) -> None:
    """Request and a 12 KiB frame in one TLS record: the handshake reads 4 KiB of it, the rest is
    decrypted plaintext in OpenSSL when the link registers the (empty) kernel socket."""
    backends.append(start_backend())
    yaml = proxy_yaml([backends[0].port], tls=(tls_files.cert, tls_files.key), extra=FAST + SMALL_READS)
    proxy = await start_proxy(nursery, yaml)
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    client = RawClient(trio.SSLStream(tcp, tls_files.client_context(), server_hostname="localhost"))
    payload = bytes(range(256)) * 47
    request = client.ws.send(Request(host="127.0.0.1", target="/"))
    await client.stream.send_all(request + build_frame(0x2, payload, mask=True))  # one record
    with trio.fail_after(5):
        assert isinstance(await client.next_event(), AcceptConnection)
        assert await client.receive_message() == payload


def _compressible(n: int) -> bytes:
    """`n` bytes that deflate about 50:1 (one 1 KiB compressed slice inflates to ~50 KiB)."""
    r = random.Random(7)
    return bytes(r.randrange(256) if r.random() < 0.005 else 0 for _ in range(n))


async def test_inflated_backlog_left_by_start_is_finished_without_other_traffic(nursery, backends) -> None:
    """Inspect relay, client deflate: the request and a ~24 KiB compressed message arrive in one
    read, so `Link.start` feeds them and settles from the session's task. Draining the inflated
    backlog takes more than SETTLE_ROUNDS, so the rest is left to `Reactor.soon`; but `soon` does
    not wake a reactor asleep in wait_readable(ep), and nothing else will: the client side is not
    registered (it has a backlog), the backend side only for reading (it never sends).
    """
    got: list[int] = []

    def sink(conn) -> None:  # type: ignore[no-untyped-def]
        for message in conn:
            got.append(len(message))

    # The backend hop is not deflated (big output), and its receive window takes all of it at
    # once: no send of the proxy's is partial, so no writability event will wake the reactor.
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    server = serve(sink, sock=listening, compression=None, max_size=None, ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    backends.append(Backend(server, thread))
    yaml = proxy_yaml(
        [backends[0].port], listener_extra="relay: inspect", extra=FAST + "limits: {buffer_bytes: 32768}\n"
    )
    proxy = await start_proxy(nursery, yaml)
    payload = _compressible(1_200_000)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = (comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
    frame = bytearray(build_frame(0x2, body, mask=True))
    frame[0] |= 0x40  # RSV1: compressed
    request = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    async with stream:
        await stream.send_all(request + bytes(frame))
        head = b""
        with trio.fail_after(3):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" in head, head
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.02)
        assert got == [len(payload)]


@pytest.mark.expect_errors(r"wsproxy\.reactor: .* failed: ending its session only \[RuntimeError: a bug in one\b")
async def test_a_raising_watcher_ends_its_session_while_every_other_session_echoes(
    nursery, backends, caplog, poller
) -> None:
    """A bug in one session's relay (here: its client side's feed raises) reaches the loop. That
    session ends (its client sees the connection close, its log line says "internal error"), the
    traceback is logged once, wsproxy_relay_failures_total counts it, and the four other sessions
    on the same loop go on echoing."""
    caplog.set_level(logging.INFO, logger="wsproxy.session")  # the session log line
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    clients = [await RawClient.connect(proxy.port(), f"/s{i}") for i in range(5)]
    with trio.fail_after(5):
        while len(proxy.server.reactor) < 5:
            await trio.sleep(0.01)
    bad = next(s for s in proxy.server.sessions if s.outcome.path == "/s2")
    assert bad._link is not None

    class BuggyRelay(type(bad._link.relay)):  # type: ignore[misc]
        __slots__ = ()

        def feed_client(self, data: bytes) -> None:
            raise RuntimeError("a bug in one session's relay")

    bad._link.relay.__class__ = BuggyRelay  # this session's relay only
    del bad
    with trio.fail_after(5):
        await clients[2].send(BytesMessage(data=b"boom"))
        await clients[2].expect_eof()
        for _ in range(3):
            for i, client in enumerate(clients):
                if i != 2:
                    await client.send(BytesMessage(data=b"still here %d" % i))
                    assert await client.receive_message() == b"still here %d" % i
    assert len(proxy.server.sessions) == 4 and len(proxy.server.reactor) == 4
    assert proxy.server.reactor.running
    assert b"wsproxy_relay_failures_total 1.0" in proxy.server.metrics.exposition()
    tracebacks = [r for r in caplog.records if r.exc_info and "a bug in one session" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert any("internal error" in r.getMessage() for r in caplog.records if r.name.startswith("wsproxy"))


class RetryCheckingSSLSocket(ssl.SSLSocket):
    """The proxy's server-side TLS socket, checking OpenSSL's rule on every send: a write that
    raised SSLWantWrite/ReadError must be retried with the same bytes, not a longer buffer."""

    wants = 0  # sends OpenSSL answered with want-write/want-read, over every instance
    bad_retries: list[tuple[int, int]] = []  # (length of the failed send, length of its retry)

    def send(self, data, flags: int = 0) -> int:  # type: ignore[no-untyped-def]
        retry = self.__dict__.get("retry_of")
        if retry is not None and bytes(data) != retry:
            RetryCheckingSSLSocket.bad_retries.append((len(retry), len(data)))
        try:
            sent = super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            RetryCheckingSSLSocket.wants += 1
            self.__dict__["retry_of"] = bytes(data)
            raise
        self.__dict__["retry_of"] = None
        return sent


@pytest.mark.parametrize("relay", ["inspect", "passthrough"])
async def test_tls_flood_into_a_slow_reader_retries_each_write_with_the_same_buffer(
    nursery, backends, tls_files, monkeypatch, caplog, relay: str
) -> None:
    """The backend sends 1.5 MiB in 48 KiB messages to a TLS client that reads 16 KiB every 5 ms,
    while the proxy pings the client every 20 ms: its TLS writes keep running into a full socket
    (want-write), and its pings arrive while a write is pending. Every message arrives intact and
    in order, every retried write repeats its buffer exactly, and OpenSSL never says "bad write
    retry"."""
    from wsproxy.runtime import server as server_mod

    plain_context = server_mod.server_ssl_context

    def checking_context(listener, *args):  # type: ignore[no-untyped-def]
        ctx = plain_context(listener, *args)
        ctx.sslsocket_class = RetryCheckingSSLSocket
        return ctx

    monkeypatch.setattr(server_mod, "server_ssl_context", checking_context)
    monkeypatch.setattr(RetryCheckingSSLSocket, "wants", 0)
    monkeypatch.setattr(RetryCheckingSSLSocket, "bad_retries", [])
    count, size = 32, 48 * 1024

    def flood(conn) -> None:  # type: ignore[no-untyped-def]
        for i in range(count):
            conn.send(bytes([i]) * size)
        with contextlib.suppress(Exception):
            conn.recv()

    backends.append(start_backend(flood))
    extra = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: 0.02s, timeout: 10s}\n"
    yaml = proxy_yaml(
        [backends[0].port], tls=(tls_files.cert, tls_files.key), listener_extra=f"relay: {relay}", extra=extra
    )
    proxy = await start_proxy(nursery, yaml)
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window: the proxy's writes wait
    client = RawClient(trio.SSLStream(tcp, tls_files.client_context(), server_hostname="localhost"))
    await client.send(Request(host="127.0.0.1", target="/"))
    got: list[bytes] = []
    parts: list[bytes] = []
    with trio.fail_after(30):
        assert isinstance(await client.next_event(), AcceptConnection)
        while len(got) < count:
            data = await client.stream.receive_some(16384)
            assert data, "the proxy closed the client mid-flood"
            client.ws.receive_data(data)
            for event in client.ws.events():
                if isinstance(event, Ping):
                    await client.send(event.response())
                elif isinstance(event, BytesMessage):
                    parts.append(bytes(event.data))
                    if event.message_finished:
                        got.append(b"".join(parts))
                        parts.clear()
            await trio.sleep(0.005)
    assert [len(m) for m in got] == [size] * count
    assert all(m == bytes([i]) * size for i, m in enumerate(got)), "a message arrived damaged or out of order"
    assert RetryCheckingSSLSocket.wants > 0, "no TLS write ever waited: the test did not test the retry"
    assert RetryCheckingSSLSocket.bad_retries == []
    assert "bad write retry" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]
