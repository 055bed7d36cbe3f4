"""The bad-handshake matrix: raw request bytes (or a misbehaving backend) -> the HTTP status.

Every row goes through a real proxy on 127.0.0.1 to a real backend. A rejected request must be
answered with `Connection: close`, the proxy must then close the TCP connection, and (for
client-side errors) the backend must never see the request.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from tests.support import free_port, proxy_yaml, start_backend, start_proxy

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FAST = "timeouts: {handshake: 0.5s, connect: 0.5s, close: 0.5s}\nlimits: {max_header_bytes: 1024}\n"


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# --------------------------------------------------------------------------------------------
# building requests and reading answers


_BASE: list[tuple[bytes, bytes]] = [
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


def _request(
    *,
    start: bytes = b"GET / HTTP/1.1",
    replace: dict[bytes, bytes] | None = None,
    drop: tuple[bytes, ...] = (),
    extra: tuple[tuple[bytes, bytes], ...] = (),
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A request line plus the valid Upgrade headers, with some replaced, dropped or added."""
    replace = {k.lower(): v for k, v in (replace or {}).items()}
    drop_low = {d.lower() for d in drop}
    out: list[tuple[bytes, bytes]] = []
    for name, value in _BASE if headers is None else headers:
        low = name.lower()
        if low in drop_low:
            continue
        out.append((name, replace.pop(low, value)))
    out += [(k, v) for k, v in replace.items()]
    out += list(extra)
    return start + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in out) + b"\r\n"


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    closed: bool  # the proxy closed the TCP connection (EOF or reset) after answering
    elapsed: float

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None

    def connection_tokens(self) -> set[bytes]:
        return {t.strip().lower() for k, v in self.headers if k == b"connection" for t in v.split(b",")}


def _parse(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    if any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers):
        body = _dechunk(body)
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


async def _exchange(port: int, data: bytes, *, wait: float = 2.0) -> Answer:
    """Send `data`; read the answer. After a 101 stop at the head; otherwise read until EOF."""
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    raw = b""
    closed = False
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                raw += chunk
                if raw.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in raw:
                    break
    status, headers, body = _parse(raw)
    return Answer(status, headers, body, closed, trio.current_time() - start)


def _assert_rejected_and_closed(answer: Answer, status: int) -> None:
    assert answer.status == status, f"expected {status}, got {answer.status}"
    assert b"close" in answer.connection_tokens(), f"no Connection: close in {answer.headers}"
    assert answer.closed, "the proxy kept the TCP connection open after rejecting the request"


# --------------------------------------------------------------------------------------------
# the client-side table

OVERSIZED = b"X-Filler", b"a" * 3000  # well over limits.max_header_bytes (1024) in FAST


CLIENT_TABLE = [
    pytest.param(_request(), 101, id="valid-upgrade"),
    pytest.param(_request(replace={b"Upgrade": b"WebSocket"}), 101, id="upgrade-token-mixed-case"),
    pytest.param(_request(replace={b"Upgrade": b"WEBSOCKET", b"Connection": b"UPGRADE"}), 101, id="tokens-upper-case"),
    pytest.param(_request(replace={b"Connection": b"keep-alive, Upgrade"}), 101, id="connection-keep-alive-upgrade"),
    pytest.param(_request(replace={b"Connection": b"Upgrade,keep-alive"}), 101, id="connection-upgrade-keep-alive"),
    pytest.param(
        _request(
            headers=[
                (b"host", b"127.0.0.1"),
                (b"upgrade", b"websocket"),
                (b"connection", b"upgrade"),
                (b"sec-websocket-key", KEY),
                (b"sec-websocket-version", b"13"),
            ]
        ),
        101,
        id="header-names-lower-case",
    ),
    pytest.param(_request(drop=(b"Sec-WebSocket-Key",)), 400, id="key-missing"),
    pytest.param(_request(replace={b"Sec-WebSocket-Key": b"not base64 at all!!"}), 400, id="key-not-base64"),
    pytest.param(
        _request(replace={b"Sec-WebSocket-Key": base64.b64encode(b"fifteen bytes!!")}), 400, id="key-15-bytes"
    ),
    pytest.param(
        _request(replace={b"Sec-WebSocket-Key": base64.b64encode(b"seventeen bytes!!")}), 400, id="key-17-bytes"
    ),
    pytest.param(_request(replace={b"Sec-WebSocket-Key": KEY.rstrip(b"=")}), 400, id="key-unpadded"),
    pytest.param(_request(extra=((b"Sec-WebSocket-Key", KEY),)), 400, id="key-twice"),
    pytest.param(_request(drop=(b"Upgrade",)), 400, id="upgrade-header-missing"),
    pytest.param(_request(replace={b"Upgrade": b"h2c"}), 400, id="upgrade-without-websocket-token"),
    pytest.param(_request(replace={b"Connection": b"keep-alive"}), 400, id="connection-without-upgrade"),
    pytest.param(_request(drop=(b"Connection",)), 400, id="connection-header-missing"),
    pytest.param(_request(drop=(b"Host",)), 400, id="host-missing"),
    pytest.param(_request(extra=((b"Host", b"other.example"),)), 400, id="host-twice"),
    pytest.param(_request(replace={b"Host": b""}), 400, id="host-empty"),
    pytest.param(_request(start=b"POST / HTTP/1.1", extra=((b"Content-Length", b"0"),)), 400, id="post"),
    pytest.param(_request(start=b"PUT / HTTP/1.1", extra=((b"Content-Length", b"0"),)), 400, id="put"),
    pytest.param(_request(start=b"GET / HTTP/1.0"), 400, id="http-1.0"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n", 400, id="garbage-bytes"),
    pytest.param(b"THIS IS NOT HTTP\r\n\r\n", 400, id="garbage-request-line"),
    pytest.param(_request(replace={b"Sec-WebSocket-Version": b"8"}), 426, id="version-8"),
    pytest.param(_request(replace={b"Sec-WebSocket-Version": b"14"}), 426, id="version-14"),
    pytest.param(_request(extra=(OVERSIZED,)), 431, id="headers-over-max-header-bytes"),
]


@pytest.mark.parametrize(("request_bytes", "status"), CLIENT_TABLE)
async def test_handshake_table_status(nursery, backends, request_bytes: bytes, status: int) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    answer = await _exchange(proxy.port(), request_bytes)
    assert answer.status == status, f"expected {status}, got {answer.status}: {answer.body[:200]!r}"
    if status == 101:
        assert answer.header(b"sec-websocket-accept") == _accept(KEY)
        assert b"upgrade" in answer.connection_tokens()
        assert (answer.header(b"upgrade") or b"").lower() == b"websocket"
        assert len(backends[0].requests) == 1
    else:
        _assert_rejected_and_closed(answer, status)
        assert backends[0].requests == [], "a rejected request reached the backend"


async def test_wrong_version_answer_names_version_13(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    answer = await _exchange(proxy.port(), _request(replace={b"Sec-WebSocket-Version": b"8"}))
    _assert_rejected_and_closed(answer, 426)
    assert answer.header(b"sec-websocket-version") == b"13"


async def test_plain_http_get_gets_426_with_short_text_body_with_http_reject(nursery, backends) -> None:
    """`listeners[].http: reject`: a plain request is not proxied (test_http_proxy.py: `proxy`)."""
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra="http: reject"))
    answer = await _exchange(proxy.port(), b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n")
    _assert_rejected_and_closed(answer, 426)
    assert backends[0].requests == []
    assert (answer.header(b"content-type") or b"").startswith(b"text/plain")
    assert 0 < len(answer.body) <= 300
    assert answer.header(b"content-length") == str(len(answer.body)).encode()
    answer.body.decode("utf-8")  # readable text


async def test_headers_over_limit_sent_in_pieces_get_431(nursery, backends) -> None:
    """The limit holds however the bytes arrive (here: 200-byte writes, a little apart)."""
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    data = _request(extra=(OVERSIZED,))
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    raw = b""
    async with stream:
        try:
            for i in range(0, len(data), 200):
                await stream.send_all(data[i : i + 200])
                await trio.sleep(0.005)
        except trio.BrokenResourceError:
            pass
        with trio.move_on_after(2):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                raw += chunk
    assert _parse(raw)[0] == 431
    assert backends[0].requests == []


# --------------------------------------------------------------------------------------------
# handshake timeout on the client side


async def _read_all(stream: trio.SocketStream, into: bytearray, done: trio.Event) -> None:
    try:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            into += chunk
    finally:
        done.set()


async def test_half_request_then_stall_is_cut_off_with_408(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        got = bytearray()
        done = trio.Event()
        with trio.move_on_after(3):
            await _read_all(stream, got, done)
    elapsed = trio.current_time() - start
    assert done.is_set(), "the proxy did not close a stalled connection within 3 s"
    assert 0.4 <= elapsed < 3
    status, headers, _ = _parse(bytes(got))
    assert status == 408
    assert (b"connection", b"close") in headers
    assert backends[0].requests == []


async def test_silent_client_is_cut_off_with_408(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    async with stream:
        got = bytearray()
        done = trio.Event()
        with trio.move_on_after(3):
            await _read_all(stream, got, done)
    assert done.is_set(), "the proxy did not close a silent connection within 3 s"
    assert 0.4 <= trio.current_time() - start < 3
    assert _parse(bytes(got))[0] == 408


async def test_slowloris_client_is_cut_off_on_time(nursery, backends) -> None:
    """One byte every 0.2 s: the deadline bounds the whole head, not the gap between bytes."""
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    data = _request()
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    got = bytearray()
    done = trio.Event()

    async def drip() -> None:
        for i in range(len(data)):
            try:
                await stream.send_all(data[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(0.2)

    async with stream:
        with trio.move_on_after(3):
            async with trio.open_nursery() as inner:
                inner.start_soon(drip)
                await _read_all(stream, got, done)
                inner.cancel_scope.cancel()
    assert done.is_set(), "the proxy let a slowloris client hold the connection for 3 s"
    assert 0.4 <= trio.current_time() - start < 3
    assert _parse(bytes(got))[0] == 408, f"unexpected answer {bytes(got)[:100]!r}"
    assert backends[0].requests == []


# --------------------------------------------------------------------------------------------
# backend-side statuses: a raw trio backend that answers whatever a row says


@dataclass
class RawBackend:
    port: int
    heads: list[bytes] = field(default_factory=list)


async def _start_raw_backend(
    nursery: trio.Nursery, respond: Callable[[bytes], bytes | None], *, close_after: bool = False
) -> RawBackend:
    """A TCP backend: reads one request head, sends `respond(head)` (None: says nothing)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = RawBackend(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    head += chunk
                backend.heads.append(head)
                out = respond(head)
                if out is not None:
                    await stream.send_all(out)
                if close_after:
                    return
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    await nursery.start(trio.serve_listeners, handle, listeners)
    return backend


def _key_of(head: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    raise AssertionError("the proxy sent no Sec-WebSocket-Key")


def _switching(head: bytes, *, accept: bytes | None = None, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + (accept if accept is not None else _accept(_key_of(head)))
        + b"\r\n"
        + extra
        + b"\r\n"
    )


def _normal(status: bytes, body: bytes, extra: bytes = b"") -> Callable[[bytes], bytes]:
    def respond(head: bytes) -> bytes:
        return (
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n"
            + extra
            + b"\r\n"
            + body
        )

    return respond


async def test_no_backend_listening_gives_502(nursery) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([free_port()], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 502)


async def test_backend_that_never_answers_gives_504_on_time(nursery) -> None:
    backend = await _start_raw_backend(nursery, lambda head: None)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request(), wait=4)
    _assert_rejected_and_closed(answer, 504)
    assert 0.4 <= answer.elapsed < 3
    assert len(backend.heads) == 1


async def test_backend_closing_without_answer_gives_502(nursery) -> None:
    backend = await _start_raw_backend(nursery, lambda head: None, close_after=True)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 502)


async def test_backend_answering_garbage_gives_502(nursery) -> None:
    backend = await _start_raw_backend(nursery, lambda head: b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 502)


PASSTHROUGH_TABLE = [
    pytest.param(
        _normal(b"401 Unauthorized", b"token expired\n", b'WWW-Authenticate: Bearer realm="chat"\r\n'),
        401,
        b"token expired\n",
        id="401",
    ),
    pytest.param(_normal(b"403 Forbidden", b"origin not allowed"), 403, b"origin not allowed", id="403"),
    pytest.param(_normal(b"404 Not Found", b"no such room: /chat/42\n"), 404, b"no such room: /chat/42\n", id="404"),
    pytest.param(_normal(b"503 Service Unavailable", b"draining", b"Retry-After: 7\r\n"), 503, b"draining", id="503"),
]


@pytest.mark.parametrize(("respond", "status", "body"), PASSTHROUGH_TABLE)
async def test_backend_http_response_status_and_body_reach_client(nursery, respond, status, body) -> None:
    backend = await _start_raw_backend(nursery, respond)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, status)
    assert answer.body == body
    assert len(backend.heads) == 1, "the proxy retried a backend that answered with a normal HTTP response"


async def test_backend_401_keeps_end_to_end_headers_and_drops_hop_by_hop(nursery) -> None:
    respond = _normal(
        b"401 Unauthorized",
        b"login first",
        b'WWW-Authenticate: Basic realm="x"\r\nKeep-Alive: timeout=5\r\nX-Request-Id: r-17\r\n',
    )
    backend = await _start_raw_backend(nursery, respond)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 401)
    assert answer.header(b"www-authenticate") == b'Basic realm="x"'
    assert answer.header(b"x-request-id") == b"r-17"
    assert answer.header(b"keep-alive") is None


async def test_backend_chunked_404_body_reaches_client(nursery) -> None:
    def respond(head: bytes) -> bytes:
        return (
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
            b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        )

    backend = await _start_raw_backend(nursery, respond)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 404)
    assert answer.body == b"hello, world"


BAD_101_TABLE = [
    pytest.param(lambda head: _switching(head, accept=_accept(b"AAAAAAAAAAAAAAAAAAAAAA==")), (), id="wrong-accept"),
    pytest.param(lambda head: _switching(head, accept=_accept(KEY)), (), id="accept-for-client-key"),
    pytest.param(
        lambda head: (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
            + _accept(_key_of(head))
            + b"\r\n\r\n"
        ),
        (),
        id="no-upgrade-header",
    ),
    pytest.param(
        lambda head: _switching(head, extra=b"Sec-WebSocket-Protocol: superchat\r\n"),
        ((b"Sec-WebSocket-Protocol", b"chat"),),
        id="subprotocol-not-offered",
    ),
    pytest.param(
        lambda head: _switching(head, extra=b"Sec-WebSocket-Protocol: chat\r\n"), (), id="subprotocol-none-offered"
    ),
    pytest.param(
        lambda head: _switching(head, extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n"),
        (),
        id="extension-not-offered",
    ),
]


@pytest.mark.parametrize(("respond", "client_extra"), BAD_101_TABLE)
async def test_bad_backend_101_gives_502(nursery, respond, client_extra) -> None:
    backend = await _start_raw_backend(nursery, respond)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request(extra=client_extra))
    _assert_rejected_and_closed(answer, 502)
    assert len(backend.heads) >= 1


async def test_good_raw_backend_101_is_accepted(nursery) -> None:
    """The control row for the 502 table: the same raw backend, answering correctly, gives a 101."""
    backend = await _start_raw_backend(
        nursery, lambda head: _switching(head, extra=b"Sec-WebSocket-Protocol: chat\r\n")
    )
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request(extra=((b"Sec-WebSocket-Protocol", b"chat, superchat"),)))
    assert answer.status == 101
    assert answer.header(b"sec-websocket-accept") == _accept(KEY)
    assert answer.header(b"sec-websocket-protocol") == b"chat"


async def test_backend_101_head_over_max_header_bytes_gives_502(nursery) -> None:
    """docs/configuration.md: limits.max_header_bytes bounds the backend's response head too (502)."""
    filler = b"X-Filler: " + b"a" * 3000 + b"\r\n"
    backend = await _start_raw_backend(nursery, lambda head: _switching(head, extra=filler))
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    answer = await _exchange(proxy.port(), _request())
    _assert_rejected_and_closed(answer, 502)
