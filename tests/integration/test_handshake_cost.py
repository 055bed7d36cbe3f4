"""What makes a session's start cheap, kept true: TLS sessions resume on a listener (tickets on,
one context per listener), accepted and backend sockets carry the TCP options the relay needs
(accepted ones inherit them from the tuned listening socket), a connect still in progress is
waited for within its timeout (one already finished is not), and a backend that answers an
unusual but legal 101 (left to h11 by http_head.py) still gets its session relayed."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest
import trio
import trustme
from wsproto.events import TextMessage

from tests.support import RawClient, TLSFiles, proxy_yaml, start_backend, start_proxy
from wsproxy.config import Address
from wsproxy.protocol.handshake import accept_key
from wsproxy.runtime import upstream
from wsproxy.runtime.streams import NOTSENT_LOWAT
from wsproxy.runtime.upstream import UpstreamError

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s}\n"
UPGRADE = (
    b"GET /r HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _upgrade_over_tls(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
    """One TLS connection to the proxy that gets its 101; (the TLS session to resume, whether
    this one resumed). Blocking stdlib TLS: `session=` is the client API resumption needs."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            assert chunk, f"closed before the 101: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert tls.session is not None  # TLS 1.3: the tickets came after the handshake, read with the 101
        return tls.session, tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_a_second_tls_connection_resumes_the_first_ones_session(
    nursery, backends, tls_files: TLSFiles, version: ssl.TLSVersion
) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], tls=(tls_files.cert, tls_files.key), extra=FAST))
    ctx = tls_files.client_context()
    ctx.minimum_version = ctx.maximum_version = version

    def twice() -> tuple[bool, bool]:
        first, first_reused = _upgrade_over_tls(proxy.port(), ctx, None)
        _, second_reused = _upgrade_over_tls(proxy.port(), ctx, first)
        return first_reused, second_reused

    first_reused, second_reused = await trio.to_thread.run_sync(twice)
    assert not first_reused  # the control: a full handshake first
    assert second_reused  # a ticket (or session id) the listener issued and takes back


async def test_client_and_backend_sockets_carry_nodelay_and_the_unsent_watermark(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    client = await RawClient.connect(proxy.port(), "/opts")
    (session,) = proxy.server.sessions
    assert session.backend_stream is not None
    for sock in (session.client_stream.socket, session.backend_stream.socket):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
        assert sock.gettimeout() == 0.0
    await client.send(TextMessage(data="still relays"))
    assert await client.receive_message() == "still relays"


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.0 101 Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0"],
    ids=["http1.0", "content-length"],
)
async def test_a_legal_101_the_direct_reader_leaves_to_h11_is_still_relayed(nursery, status_line: bytes) -> None:
    async def backend(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        key = next(
            ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key")
        )
        await stream.send_all(
            status_line
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_key(key)
            + b"\r\n\r\n"
            + b"\x81\x05hello"  # a frame right behind the 101
        )
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, backend, 0)
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(nursery, proxy_yaml([port], extra=FAST))
    client = await RawClient.connect(proxy.port(), "/legal")
    assert client.accept is not None
    assert await client.receive_message() == "hello"


async def test_a_connect_still_in_progress_is_waited_for_until_the_connect_timeout() -> None:
    """The slow path of upstream.connect: a backend whose accept queue is full drops the SYN, so
    the connect stays in progress (the fast path, a connect already finished, is every other
    test's); it ends at the timeout as a timed-out failure, with its socket closed."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(3):  # more than the accept queue takes; none is accepted
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(full.getsockname())
            fillers.append(filler)
        await trio.sleep(0.05)
        began = trio.current_time()
        with pytest.raises(UpstreamError) as failed:
            await upstream.connect(Address("127.0.0.1", full.getsockname()[1]), timeout=0.3)
        assert failed.value.timeout and "timed out after 0.3s" in failed.value.reason
        assert 0.25 <= trio.current_time() - began < 2
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def test_a_session_resumes_on_a_listener_whose_sni_picked_its_second_certificate(
    nursery, backends, tmp_path
) -> None:
    """Tickets are the listener's (its first context's), so resumption holds when SNI switched
    the connection to another certificate's context."""
    backends.append(start_backend())
    ca = trustme.CA()
    pairs = []
    for stem, name in (("first", "other.example.test"), ("second", "localhost")):
        leaf = ca.issue_cert(name)
        cert, key = tmp_path / f"{stem}-cert.pem", tmp_path / f"{stem}-key.pem"
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        pairs.append(f"{{cert: {cert}, key: {key}}}")
    yaml = (
        f"listeners:\n  - {{address: 127.0.0.1:0, pool: p, tls: {{certs: [{', '.join(pairs)}]}}}}\n"
        f"pools:\n  p:\n    backends: [127.0.0.1:{backends[0].port}]\n{FAST}"
    )
    proxy = await start_proxy(nursery, yaml)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)  # verifies "localhost": only the second certificate passes

    def twice() -> bool:
        first, _ = _upgrade_over_tls(proxy.port(), ctx, None)
        return _upgrade_over_tls(proxy.port(), ctx, first)[1]

    assert await trio.to_thread.run_sync(twice)
