"""The relay's one driver (runtime/reactor.py, runtime/link.py) where a readiness loop must do
more than wait for the kernel.

TLS plaintext that OpenSSL already decrypted (`SSLSocket.pending()`) does not make the kernel
socket readable, so a level-triggered poller never reports it; if the side cannot be read at the
moment the decrypted bytes are noticed (rate-limit pause, backpressure), they must still be read
once it can be. Work handed to the next round from outside the loop (`Reactor.soon`) must wake a
sleeping loop. Each TLS case runs on both pollers (epoll, and the portable `selectors` one).
"""

from __future__ import annotations

import random
import socket
import threading
import zlib

import pytest
import trio
from websockets.sync.server import serve
from wsproto.events import AcceptConnection, BytesMessage, Request

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
