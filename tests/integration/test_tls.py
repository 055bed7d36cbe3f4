"""TLS listeners: a trustme CA the clients verify, ALPN http/1.1 only, TLS 1.2 minimum, isolation.

Every client here verifies the proxy's certificate (server name `localhost`) against the test CA,
so a test passing means a real client would accept the listener, not just that bytes flowed.
"""

from __future__ import annotations

import logging
import re
import ssl
import warnings

import pytest
import trio
from websockets.sync.client import connect
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

from tests.support import RawClient, TLSFiles, proxy_yaml, start_backend, start_proxy
from wsproxy.config import parse_config
from wsproxy.protocol import proxy_protocol
from wsproxy.runtime.server import server_ssl_context

FAST = "timeouts: {handshake: 1s, connect: 1s, close: 0.5s}\n"


async def _tls_proxy(nursery, backends, tls_files: TLSFiles):  # type: ignore[no-untyped-def]
    backends.append(start_backend())
    return await start_proxy(nursery, proxy_yaml([backends[0].port], tls=(tls_files.cert, tls_files.key), extra=FAST))


async def _tls_handshake(port: int, ctx: ssl.SSLContext) -> trio.SSLStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        with trio.fail_after(3):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def _finish(client: RawClient) -> int:
    """Closing handshake, the proxy's EOF, then our socket closed; returns the echoed close code."""
    closed = await client.close(1000, "done")
    with trio.fail_after(3):
        await client.expect_eof()
    await trio.aclose_forcefully(client.stream)
    return closed.code


async def test_tls_echo_with_raw_client_verifying_the_ca(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    client = await RawClient.connect(proxy.port(), "/secure?x=1", ssl_context=tls_files.client_context())
    assert client.accept is not None
    await client.send(TextMessage(data="over tls ✓"))
    assert await client.receive_message() == "over tls ✓"
    await client.send(BytesMessage(data=b"\x00\xff" * 5000))
    assert await client.receive_message() == b"\x00\xff" * 5000
    assert await _finish(client) == 1000
    assert backends[0].requests[0].path == "/secure?x=1"


async def test_tls_echo_with_websockets_client(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    ctx = tls_files.client_context()
    assert proxy.url("/w").startswith("wss://localhost:")

    def talk() -> str:
        with connect(proxy.url("/w"), ssl=ctx, proxy=None, open_timeout=5) as ws:
            ws.send("hello wss")
            return ws.recv(timeout=5)

    assert await trio.to_thread.run_sync(talk) == "hello wss"


async def test_client_not_trusting_the_ca_fails_verification(nursery, backends, tls_files) -> None:
    """The control for the tests above: the certificate really is what the clients verify."""
    proxy = await _tls_proxy(nursery, backends, tls_files)
    with pytest.raises(trio.BrokenResourceError) as info:
        await _tls_handshake(proxy.port(), ssl.create_default_context())
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_alpn_selects_http11_when_client_offers_h2_first(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    ctx = tls_files.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    stream = await _tls_handshake(proxy.port(), ctx)
    async with stream:
        assert stream.selected_alpn_protocol() == "http/1.1"


async def test_alpn_never_selects_h2(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    ctx = tls_files.client_context()
    ctx.set_alpn_protocols(["h2"])
    try:
        stream = await _tls_handshake(proxy.port(), ctx)
    except trio.BrokenResourceError:
        return  # refusing the handshake (no_application_protocol) is also "never h2"
    async with stream:
        assert stream.selected_alpn_protocol() != "h2"


def _legacy_client_context(tls_files: TLSFiles, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = tls_files.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client itself be willing to speak old TLS
    return ctx


@pytest.mark.parametrize("maximum", ["TLSv1", "TLSv1_1"])
async def test_tls_below_1_2_is_refused(nursery, backends, tls_files, maximum: str) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    try:
        ctx = _legacy_client_context(tls_files, getattr(ssl.TLSVersion, maximum))
    except (ValueError, ssl.SSLError):
        ctx = None  # this OpenSSL cannot even configure old TLS; the context check below still runs
    if ctx is not None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await _tls_handshake(proxy.port(), ctx)
        assert isinstance(info.value.__cause__, ssl.SSLError)
    lst = proxy.config.listeners[0]
    assert server_ssl_context(lst).minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_tls_1_2_client_is_accepted(nursery, backends, tls_files) -> None:
    """The control for the refusal test: the same legacy-capable client pinned to 1.2 gets through."""
    proxy = await _tls_proxy(nursery, backends, tls_files)
    ctx = _legacy_client_context(tls_files, ssl.TLSVersion.TLSv1_2)
    stream = await _tls_handshake(proxy.port(), ctx)
    async with stream:
        assert stream.version() == "TLSv1.2"


def test_server_context_requires_tls_1_2_and_offers_only_http11(tls_files) -> None:
    yaml_text = proxy_yaml([9], tls=(tls_files.cert, tls_files.key))
    listener = parse_config(yaml_text).listeners[0]
    ctx = server_ssl_context(listener)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.minimum_version != ssl.TLSVersion.MINIMUM_SUPPORTED


async def test_x_forwarded_proto_https_reaches_backend_over_tls(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    client = await RawClient.connect(
        proxy.port(), "/", ssl_context=tls_files.client_context(), extra_headers=[(b"X-Forwarded-Proto", b"http")]
    )
    assert client.accept is not None
    assert await _finish(client) == 1000
    headers = backends[0].requests[0].headers
    assert headers.get_all("X-Forwarded-Proto") == ["https"]
    forwarded = ",".join(headers.get_all("Forwarded"))
    assert "proto=https" in forwarded.replace(" ", "").lower()


async def test_garbage_instead_of_client_hello_does_not_harm_other_tls_session(nursery, backends, tls_files) -> None:
    proxy = await _tls_proxy(nursery, backends, tls_files)
    good = await RawClient.connect(proxy.port(), "/good", ssl_context=tls_files.client_context())
    await good.send(TextMessage(data="before"))
    assert await good.receive_message() == "before"

    bad = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    async with bad:
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
        with trio.fail_after(2):  # the proxy drops the bad connection promptly
            while True:
                try:
                    if not await bad.receive_some(65536):
                        break
                except trio.BrokenResourceError:
                    break

    await good.send(TextMessage(data="after"))
    assert await good.receive_message() == "after"
    other = await RawClient.connect(proxy.port(), "/other", ssl_context=tls_files.client_context())
    await other.send(TextMessage(data="new session"))
    assert await other.receive_message() == "new session"
    assert await _finish(other) == 1000
    assert await _finish(good) == 1000


async def test_tls_client_that_never_finishes_handshake_is_cut_off(nursery, backends, tls_files) -> None:
    """A client that opens TCP and sends half a ClientHello must not hold a session forever."""
    proxy = await _tls_proxy(nursery, backends, tls_files)
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    async with stream:
        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        with trio.fail_after(3):
            while True:
                try:
                    if not await stream.receive_some(65536):
                        break
                except trio.BrokenResourceError:
                    break
    assert trio.current_time() - start < 3


async def _silent_until_cut(port: int, *, send: bytes = b"", limit: float = 8.0) -> tuple[float, bytes]:
    """Open TCP (send `send`, then nothing); seconds until the proxy hangs up, and what it sent."""
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    async with stream:
        if send:
            await stream.send_all(send)
        with trio.fail_after(limit):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                got += data
    return trio.current_time() - start, got


@pytest.mark.parametrize("send", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"], ids=["silent", "half-hello"])
async def test_one_deadline_covers_the_tls_handshake_and_no_408_is_claimed(
    nursery, backends, tls_files, caplog, send: bytes
) -> None:
    """timeouts.handshake 1 s, timeouts.close 3 s: a client that opens TCP and never finishes TLS
    is cut at 1 s (not 1 + 3 s: no 408 waits for a handshake that never comes), gets no bytes of
    HTTP, and the log says what happened instead of claiming a 408."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    backends.append(start_backend())
    yaml_text = proxy_yaml(
        [backends[0].port],
        tls=(tls_files.cert, tls_files.key),
        extra="timeouts: {handshake: 1s, connect: 1s, close: 3s}\n",
    )
    proxy = await start_proxy(nursery, yaml_text)
    elapsed, got = await _silent_until_cut(proxy.port(), send=send)
    assert 0.9 <= elapsed < 2.5, elapsed
    assert b"HTTP/1.1" not in got
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("wsproxy")]
    assert not any(re.search(r"\b408\b", m) for m in messages), messages  # (a port may hold "408")
    assert any("TLS handshake not complete within 1s" in m for m in messages), messages
    # the listener still serves a normal client afterwards
    client = await RawClient.connect(proxy.port(), ssl_context=tls_files.client_context())
    assert client.accept is not None
    await client.send(TextMessage(data="after"))
    assert await client.receive_message() == "after"
    assert await _finish(client) == 1000


async def test_a_tls_client_silent_after_its_handshake_gets_408_at_the_same_deadline(
    nursery, backends, tls_files
) -> None:
    backends.append(start_backend())
    yaml_text = proxy_yaml(
        [backends[0].port],
        tls=(tls_files.cert, tls_files.key),
        extra="timeouts: {handshake: 1s, connect: 1s, close: 3s}\n",
    )
    proxy = await start_proxy(nursery, yaml_text)
    start = trio.current_time()
    stream = await _tls_handshake(proxy.port(), tls_files.client_context())
    async with stream:
        got = b""
        with trio.fail_after(5):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                got += data
    assert got.startswith(b"HTTP/1.1 408")
    assert trio.current_time() - start < 2.5


class _HeaderFirst(trio.abc.Stream):
    """A TCP stream whose first send carries `header` too: the PROXY header and the TLS
    ClientHello reach the proxy in one segment, as from a load balancer in front."""

    def __init__(self, inner: trio.SocketStream, header: bytes) -> None:
        self.inner = inner
        self.header = header

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        header, self.header = self.header, b""
        await self.inner.send_all(header + bytes(data))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("relay", ["passthrough", "inspect"])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_tls_after_a_proxy_header_relays_on_the_readiness_loop(
    nursery, backends, tls_files, relay: str, version: str
) -> None:
    """PROXY header and ClientHello in one segment: the header is read to its last byte and no
    further, so TLS runs on the accepted socket itself and the session relays on the one driver
    (its link drives the very SSLSocket of the handshake), with the header's client address."""
    backends.append(start_backend())
    yaml = proxy_yaml(
        [backends[0].port],
        tls=(tls_files.cert, tls_files.key),
        listener_extra=f"proxy_protocol: true\nrelay: {relay}",
        extra=FAST,
    )
    proxy = await start_proxy(nursery, yaml)
    header = proxy_protocol.build(version, ("198.51.100.7", 40000), ("127.0.0.1", proxy.port()))
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    client = RawClient(
        trio.SSLStream(_HeaderFirst(tcp, header), tls_files.client_context(), server_hostname="localhost")
    )
    with trio.fail_after(5):
        await client.send(Request(host="127.0.0.1", target="/"))
        assert isinstance(await client.next_event(), AcceptConnection)
        for size in (10, 20_000, 70_000):  # one record, several records, more than one read
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            await client.send(BytesMessage(data=payload))
            assert await client.receive_message() == payload
        while not proxy.server.sessions or next(iter(proxy.server.sessions))._link is None:
            await trio.sleep(0.01)
    session = next(iter(proxy.server.sessions))
    assert session.client_addr == ("198.51.100.7", 40000)
    assert isinstance(session.client_stream.socket, ssl.SSLSocket)
    assert session._link is not None and session._link.client.sock is session.client_stream.socket
    assert len(proxy.server.reactor) == 1
    await client.close()
