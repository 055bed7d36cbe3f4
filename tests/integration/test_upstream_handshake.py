"""What the backend sees of a client's Upgrade request, and what the client sees of the backend's 101.

A raw trio backend records the request head byte for byte (so nothing in between can normalise
it); `websockets` clients and servers check subprotocol and permessage-deflate negotiation on
both hops with a library other than the one wsproxy speaks with.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from dataclasses import dataclass, field

import pytest
import trio
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection

from tests.support import free_port, proxy_yaml, start_backend, start_proxy
from wsproxy.config import parse_address
from wsproxy.demo import demo_backend
from wsproxy.runtime.upstream import UpstreamError
from wsproxy.runtime.upstream import connect as connect_backend

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLIENT_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s}\n"


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# --------------------------------------------------------------------------------------------
# a backend that records raw request heads and answers a correct 101


@dataclass
class RawBackend:
    port: int
    heads: list[bytes] = field(default_factory=list)

    def request(self, index: int = 0) -> SeenRequest:
        return SeenRequest.parse(self.heads[index])


@dataclass
class SeenRequest:
    line: bytes
    headers: list[tuple[bytes, bytes]]  # names as sent (case kept), values stripped

    @classmethod
    def parse(cls, head: bytes) -> SeenRequest:
        lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        return cls(lines[0], headers)

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: bytes) -> bytes:
        values = self.all(name)
        assert len(values) == 1, f"expected one {name!r} header, got {values!r}"
        return values[0]

    def names(self) -> set[bytes]:
        return {k.lower() for k, _ in self.headers}


async def _start_raw_backend(nursery: trio.Nursery, extra_101: bytes = b"") -> RawBackend:
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
                key = SeenRequest.parse(head).one(b"sec-websocket-key")
                await stream.send_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n" + extra_101 + b"\r\n"
                )
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    await nursery.start(trio.serve_listeners, handle, listeners)
    return backend


def _request(
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    host: bytes = b"127.0.0.1",
    connection: bytes = b"Upgrade",
) -> bytes:
    base = [
        (b"Host", host),
        (b"Upgrade", b"websocket"),
        (b"Connection", connection),
        (b"Sec-WebSocket-Key", CLIENT_KEY),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    lines = [b"GET " + target + b" HTTP/1.1"] + [k + b": " + v for k, v in base + (headers or [])]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _upgrade(port: int, data: bytes) -> tuple[bytes, trio.SocketStream]:
    """Send an Upgrade request; return the proxy's response head and the (open) stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    raw = b""
    with trio.fail_after(3):
        await stream.send_all(data)
        while b"\r\n\r\n" not in raw:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            raw += chunk
    return raw, stream


TRUST_LOOPBACK = 'trusted_proxies: ["127.0.0.1"]'  # the test client is a trusted proxy


async def _backend_sees(
    nursery: trio.Nursery, data: bytes, *, extra_101: bytes = b"", listener_extra: str = ""
) -> tuple[SeenRequest, bytes]:
    backend = await _start_raw_backend(nursery, extra_101)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST, listener_extra=listener_extra))
    head, stream = await _upgrade(proxy.port(), data)
    async with stream:
        assert head.startswith(b"HTTP/1.1 101 "), head[:200]
        assert len(backend.heads) == 1
        return backend.request(), head


# --------------------------------------------------------------------------------------------
# the normalised path (protocol/target.py), the query and end-to-end headers byte for byte


ODD_QUERY = b"?q=1&q=2&q=&Q=3&flag&sp=a+b%20c&amp=%26&eq=a=b&u=%F0%9F%98%80&x[]=1&x[]=2&~!$'()*,;:@/?/../%2F"
ODD_TARGET = b"/chat//room%2d42/./../%7Euser/caf%c3%A9/a;b=c,d/[x]{y}|z^`" + ODD_QUERY
NORMAL_TARGET = b"/chat/~user/caf%C3%A9/a;b=c,d/[x]{y}|z^`" + ODD_QUERY


async def test_backend_sees_the_normalised_path_and_the_query_byte_for_byte(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(ODD_TARGET))
    assert seen.target == NORMAL_TARGET
    assert seen.line == b"GET " + NORMAL_TARGET + b" HTTP/1.1"


async def test_backend_sees_root_path_with_only_a_query(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(b"/?token=abc%3D%3D&token=def"))
    assert seen.target == b"/?token=abc%3D%3D&token=def"


async def test_end_to_end_headers_reach_backend_unchanged(nursery) -> None:
    headers = [
        (b"Origin", b"https://app.example.com"),
        (b"Cookie", b"session=abc123; theme=dark; empty="),
        (b"Authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig-_=="),
        (b"X-Custom-Trace", b'id=42; sampled=1, "quoted, value"'),
        (b"User-Agent", b"test-agent/1.0 (+https://example.com)"),
        (b"Accept-Language", b"fr-CH, fr;q=0.9"),
    ]
    seen, _ = await _backend_sees(nursery, _request(b"/e2e", headers, host=b"chat.example.com:8080"))
    assert seen.one(b"host") == b"chat.example.com:8080"
    for name, value in headers:
        assert seen.all(name) == [value], name
        assert name in {k for k, _ in seen.headers}, f"{name!r} lost its spelling"


async def test_repeated_end_to_end_headers_all_reach_backend_in_order(nursery) -> None:
    headers = [(b"Cookie", b"a=1"), (b"X-Tag", b"first"), (b"Cookie", b"b=2"), (b"X-Tag", b"second")]
    seen, _ = await _backend_sees(nursery, _request(b"/", headers))
    assert seen.all(b"cookie") == [b"a=1", b"b=2"]
    assert seen.all(b"x-tag") == [b"first", b"second"]


async def test_client_websocket_version_and_protocol_offer_reach_backend(nursery) -> None:
    seen, _ = await _backend_sees(
        nursery,
        _request(b"/", [(b"Sec-WebSocket-Protocol", b"chat.v2, chat.v1")]),
        extra_101=b"Sec-WebSocket-Protocol: chat.v1\r\n",
    )
    assert seen.one(b"sec-websocket-version") == b"13"
    offered = [t.strip() for v in seen.all(b"sec-websocket-protocol") for t in v.split(b",")]
    assert offered == [b"chat.v2", b"chat.v1"]


# --------------------------------------------------------------------------------------------
# hop-by-hop headers


async def test_hop_by_hop_headers_are_not_forwarded(nursery) -> None:
    headers = [
        (b"Keep-Alive", b"timeout=5, max=100"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Proxy-Authorization", b"Basic cHJveHk6c2VjcmV0"),
        (b"X-Kept", b"yes"),
    ]
    seen, _ = await _backend_sees(nursery, _request(b"/", headers))
    for gone in (b"keep-alive", b"proxy-connection", b"te", b"trailer", b"proxy-authorization"):
        assert gone not in seen.names(), f"hop-by-hop {gone!r} reached the backend"
    assert seen.one(b"x-kept") == b"yes"


async def test_headers_named_in_connection_are_dropped(nursery) -> None:
    seen, _ = await _backend_sees(
        nursery,
        _request(
            b"/",
            [(b"X-Secret", b"s3cr3t"), (b"X-Other", b"o"), (b"X-Public", b"p")],
            connection=b"Upgrade, X-Secret, x-other",
        ),
    )
    assert "x-secret" not in {k.lower().decode() for k, _ in seen.headers}
    assert b"x-other" not in seen.names()
    assert seen.one(b"x-public") == b"p"


async def test_backend_gets_a_clean_upgrade_connection_pair(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(b"/", connection=b"keep-alive, Upgrade, X-Secret"))
    connection = {t.strip().lower() for v in seen.all(b"connection") for t in v.split(b",")}
    assert connection == {b"upgrade"}
    assert [v.lower() for v in seen.all(b"upgrade")] == [b"websocket"]


# --------------------------------------------------------------------------------------------
# the key


async def test_backend_gets_a_fresh_valid_key_and_client_gets_its_own_accept(nursery) -> None:
    backend = await _start_raw_backend(nursery)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=FAST))
    keys = []
    for _ in range(2):
        head, stream = await _upgrade(proxy.port(), _request())
        async with stream:
            assert head.startswith(b"HTTP/1.1 101 ")
            accepts = [
                ln.split(b":", 1)[1].strip()
                for ln in head.split(b"\r\n")
                if ln.lower().startswith(b"sec-websocket-accept:")
            ]
            assert accepts == [_accept(CLIENT_KEY)]
    for i in range(2):
        key = backend.request(i).one(b"sec-websocket-key")
        assert key != CLIENT_KEY
        assert len(base64.b64decode(key, validate=True)) == 16
        keys.append(key)
    assert keys[0] != keys[1], "the same upstream key was used twice"


async def test_client_key_never_reaches_backend(nursery) -> None:
    """The client's own key never reaches the backend, not even as a second header."""
    seen, _ = await _backend_sees(nursery, _request())
    assert CLIENT_KEY not in [v for _, v in seen.headers]
    try:
        base64.b64decode(seen.one(b"sec-websocket-key"), validate=True)
    except binascii.Error as exc:
        raise AssertionError("the upstream key is not base64") from exc


# --------------------------------------------------------------------------------------------
# forwarding headers


def _forwarded_elements(values: list[bytes]) -> list[dict[str, str]]:
    out = []
    for value in values:
        for element in value.decode().split(","):
            pairs = {}
            for pair in element.split(";"):
                k, _, v = pair.strip().partition("=")
                pairs[k.lower()] = v.strip('"')
            out.append(pairs)
    return out


async def test_x_forwarded_for_is_added(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request())
    assert seen.one(b"x-forwarded-for") == b"127.0.0.1"


async def test_x_forwarded_for_from_an_untrusted_client_is_replaced(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(b"/", [(b"X-Forwarded-For", b"1.2.3.4")]))
    assert seen.one(b"x-forwarded-for") == b"127.0.0.1"


async def test_x_forwarded_for_from_a_trusted_proxy_is_appended_to(nursery) -> None:
    data = _request(b"/", [(b"X-Forwarded-For", b"1.2.3.4")])
    seen, _ = await _backend_sees(nursery, data, listener_extra=TRUST_LOOPBACK)
    assert seen.one(b"x-forwarded-for") == b"1.2.3.4, 127.0.0.1"


async def test_x_forwarded_for_joins_several_existing_headers_in_order(nursery) -> None:
    seen, _ = await _backend_sees(
        nursery,
        _request(b"/", [(b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2, 3.3.3.3")]),
        listener_extra=TRUST_LOOPBACK,
    )
    hops = [t.strip() for v in seen.all(b"x-forwarded-for") for t in v.split(b",")]
    assert hops == [b"1.1.1.1", b"2.2.2.2", b"3.3.3.3", b"127.0.0.1"]


async def test_x_forwarded_proto_and_host_are_set(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(host=b"chat.example.com:8080"))
    assert seen.one(b"x-forwarded-proto") == b"http"
    assert seen.one(b"x-forwarded-host") == b"chat.example.com:8080"


async def test_client_supplied_x_forwarded_proto_and_host_are_replaced(nursery) -> None:
    seen, _ = await _backend_sees(
        nursery,
        _request(
            b"/", [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil.example")], host=b"chat.example.com"
        ),
    )
    assert seen.one(b"x-forwarded-proto") == b"http"
    assert seen.one(b"x-forwarded-host") == b"chat.example.com"


async def test_forwarded_header_names_client_and_proto(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(host=b"chat.example.com"))
    elements = _forwarded_elements(seen.all(b"forwarded"))
    assert len(elements) == 1
    assert elements[0]["for"] == "127.0.0.1"
    assert elements[0]["proto"] == "http"
    assert elements[0].get("host", "chat.example.com") == "chat.example.com"


async def test_forwarded_header_from_an_untrusted_client_is_replaced(nursery) -> None:
    seen, _ = await _backend_sees(nursery, _request(b"/", [(b"Forwarded", b"for=192.0.2.60;proto=https")]))
    assert [e["for"] for e in _forwarded_elements(seen.all(b"forwarded"))] == ["127.0.0.1"]


async def test_forwarded_header_from_a_trusted_proxy_is_appended_to(nursery) -> None:
    data = _request(b"/", [(b"Forwarded", b"for=192.0.2.60;proto=https")])
    seen, _ = await _backend_sees(nursery, data, listener_extra=TRUST_LOOPBACK)
    elements = _forwarded_elements(seen.all(b"forwarded"))
    assert [e["for"] for e in elements] == ["192.0.2.60", "127.0.0.1"]
    assert elements[0]["proto"] == "https"
    assert elements[-1]["proto"] == "http"


# --------------------------------------------------------------------------------------------
# subprotocols, with the websockets library on both ends


def _report_subprotocol(conn: ServerConnection) -> None:
    conn.send(f"backend chose {conn.subprotocol}")
    for message in conn:
        conn.send(message)


async def test_subprotocol_offer_reaches_backend_and_its_choice_reaches_client(nursery, backends) -> None:
    backends.append(start_backend(_report_subprotocol, subprotocols=["chat.v2", "chat.v1"]))
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))

    def talk() -> tuple[str | None, str]:
        with connect(proxy.url("/sub"), proxy=None, open_timeout=5, subprotocols=["chat.v1", "chat.v2"]) as ws:
            return ws.subprotocol, ws.recv(timeout=5)

    client_choice, report = await trio.to_thread.run_sync(talk)
    assert client_choice in ("chat.v1", "chat.v2")
    assert report == f"backend chose {client_choice}"
    offer_headers = backends[0].requests[0].headers.get_all("Sec-WebSocket-Protocol")
    offered = [t.strip() for v in offer_headers for t in v.split(",")]
    assert offered == ["chat.v1", "chat.v2"]


async def test_no_subprotocol_when_client_offers_none(nursery, backends) -> None:
    backends.append(start_backend(_report_subprotocol))
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))

    def talk() -> tuple[str | None, str, list[str]]:
        with connect(proxy.url("/sub"), proxy=None, open_timeout=5) as ws:
            return ws.subprotocol, ws.recv(timeout=5), ws.response.headers.get_all("Sec-WebSocket-Protocol")

    choice, report, header = await trio.to_thread.run_sync(talk)
    assert choice is None
    assert header == []
    assert report == "backend chose None"
    assert "Sec-WebSocket-Protocol" not in backends[0].requests[0].headers


# --------------------------------------------------------------------------------------------
# permessage-deflate, negotiated per hop


BIG_TEXT = "compressible " * 20000 + "ünïcödé ✓"


def _deflate_talk(url: str, *, compression: str | None) -> tuple[list[str], str, bytes]:
    with connect(url, proxy=None, open_timeout=5, compression=compression, max_size=None) as ws:
        ws.send(BIG_TEXT)
        text = ws.recv(timeout=5)
        ws.send(bytes(range(256)) * 100)
        data = ws.recv(timeout=5)
        return ws.response.headers.get_all("Sec-WebSocket-Extensions"), text, data


async def test_client_offering_deflate_gets_it_and_messages_round_trip(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    url = proxy.url("/d")
    extensions, text, data = await trio.to_thread.run_sync(lambda: _deflate_talk(url, compression="deflate"))
    assert any(e.split(";")[0].strip() == "permessage-deflate" for e in extensions), extensions
    assert text == BIG_TEXT
    assert data == bytes(range(256)) * 100
    backend_offer = backends[0].requests[0].headers.get_all("Sec-WebSocket-Extensions")
    assert any("permessage-deflate" in o for o in backend_offer), "the backend hop was not offered deflate"


async def test_client_not_offering_deflate_never_sees_the_extension(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    extensions, text, data = await trio.to_thread.run_sync(lambda: _deflate_talk(proxy.url("/d"), compression=None))
    assert extensions == []
    assert text == BIG_TEXT
    assert data == bytes(range(256)) * 100


async def test_raw_client_without_extension_offer_gets_no_extension_header(nursery) -> None:
    _, head = await _backend_sees(nursery, _request())
    assert b"sec-websocket-extensions" not in head.lower()


async def test_deflate_false_turns_it_off_on_both_hops(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra="deflate: false"))
    url = proxy.url("/d")
    extensions, text, data = await trio.to_thread.run_sync(lambda: _deflate_talk(url, compression="deflate"))
    assert extensions == []
    assert text == BIG_TEXT
    assert data == bytes(range(256)) * 100
    assert backends[0].requests[0].headers.get_all("Sec-WebSocket-Extensions") == []


async def test_client_extension_offer_is_never_forwarded_verbatim(nursery) -> None:
    """Extensions are per hop: an offer the proxy cannot speak (here an unknown one) stays on the client hop."""
    seen, head = await _backend_sees(nursery, _request(b"/", [(b"Sec-WebSocket-Extensions", b"x-made-up; level=3")]))
    assert all(b"x-made-up" not in v for v in seen.all(b"sec-websocket-extensions"))
    assert b"sec-websocket-extensions" not in head.lower()


async def test_end_to_end_headers_of_backend_101_reach_client(nursery) -> None:
    _, head = await _backend_sees(nursery, _request(), extra_101=b"Set-Cookie: sticky=b1; Path=/\r\nX-Backend: b1\r\n")
    lines = head.split(b"\r\n")
    assert b"Set-Cookie: sticky=b1; Path=/" in lines
    assert b"X-Backend: b1" in lines


async def test_backends_by_ipv4_ipv6_and_name_all_connect(nursery) -> None:
    """Numeric backends connect directly (no resolver); names still resolve."""
    v4 = await trio.open_tcp_listeners(0, host="127.0.0.1")
    v4_port = v4[0].socket.getsockname()[1]
    await v4[0].aclose()
    await nursery.start(functools.partial(demo_backend, "127.0.0.1", v4_port, "v4"))
    try:
        v6 = await trio.open_tcp_listeners(0, host="::1")
    except OSError:
        v6 = []
    targets = [f"127.0.0.1:{v4_port}", f"localhost:{v4_port}"]
    if v6:
        v6_port = v6[0].socket.getsockname()[1]
        await v6[0].aclose()
        await nursery.start(functools.partial(demo_backend, "::1", v6_port, "v6"))
        targets.append(f"[::1]:{v6_port}")
    for target in targets:
        stream = await connect_backend(parse_address(target), 2.0)
        peer = stream.socket.getpeername()
        assert peer[1] == parse_address(target).port
        await stream.aclose()
    with pytest.raises(UpstreamError, match="failed"):
        await connect_backend(parse_address(f"127.0.0.1:{free_port()}"), 2.0)
