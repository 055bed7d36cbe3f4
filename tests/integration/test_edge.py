"""Edge protection end to end: every limit crossed through a real proxy on 127.0.0.1.

Each test checks the status or close code the limited client gets, the counter behind the
`wsproxy_edge_limited_total` metric, and that a bystander session keeps echoing. Over a session
cap the answer comes before any 101 and the backend never sees the request (never "accept,
then drop"). Other client addresses come from 127.0.0.2 (all of 127/8 is loopback).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
from wsproto.events import CloseConnection, TextMessage

from tests.support import RawClient, free_port, proxy_yaml, raw_http, start_backend, start_proxy, status_of
from wsproxy.policy import admission as adm
from wsproxy.protocol.frames import build_frame

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: off}\n"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def header(client: RawClient, name: bytes) -> bytes | None:
    assert client.reject is not None
    return next((v for k, v in client.reject.headers if k.lower() == name), None)


def limited(proxy, limit: str) -> int:  # type: ignore[no-untyped-def]
    """The counter behind wsproxy_edge_limited_total{limit=...}, checked against the exposition."""
    count = proxy.server.edge.admission.counts[limit]
    line = f'wsproxy_edge_limited_total{{limit="{limit}"}} {float(count)}'
    assert line in proxy.server.metrics.exposition().decode(), line
    return count


async def echoes(client: RawClient, text: str = "still here") -> bool:
    with trio.fail_after(3):
        await client.send(TextMessage(text))
        return await client.receive_message() == text


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def recording_echo(closes: list[int | None]):  # type: ignore[no-untyped-def]
    """A websockets echo handler that records the close code the backend received."""

    def handler(conn) -> None:  # type: ignore[no-untyped-def]
        try:
            for message in conn:
                conn.send(message)
        finally:
            closes.append(conn.close_code)

    return handler


# --- session caps: 503 (or 429 per IP) before the 101 ------------------------------------------


async def test_global_max_sessions_answers_503_before_the_101(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST + "limits: {max_sessions: 2}\n"))
    a = await RawClient.connect(proxy.port())
    b = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    over = await RawClient.connect(proxy.port())
    assert over.reject is not None and over.reject.status_code == 503
    assert header(over, b"retry-after") == b"1"
    assert len(backends[0].requests) == 2  # the refused one never reached a backend
    assert limited(proxy, adm.MAX_SESSIONS) == 1
    assert await echoes(a) and await echoes(b)
    await a.close()
    await wait_for(lambda: proxy.server.edge.admission.total == 1)
    again = await RawClient.connect(proxy.port())
    assert again.accept is not None and await echoes(again)


async def test_pool_max_sessions_answers_503(nursery, backends) -> None:
    backends.append(start_backend())
    yaml = proxy_yaml([backends[0].port], extra=FAST, pool_extra="max_sessions: 1")
    proxy = await start_proxy(nursery, yaml)
    a = await RawClient.connect(proxy.port())
    over = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    assert over.reject is not None and over.reject.status_code == 503
    assert b"pool p" in over.reject_body and header(over, b"retry-after") == b"1"
    assert limited(proxy, adm.POOL_MAX_SESSIONS) == 1
    assert await echoes(a)


async def test_full_backends_are_skipped_then_503(nursery, backends) -> None:
    backends += [start_backend(), start_backend()]
    yaml = proxy_yaml([], extra=FAST, pool_extra="balance: least_conn").replace(
        "    backends:\n",
        "    backends:\n"
        f"      - {{address: 127.0.0.1:{backends[0].port}, max_sessions: 1}}\n"
        f"      - {{address: 127.0.0.1:{backends[1].port}, max_sessions: 1}}\n",
    )
    proxy = await start_proxy(nursery, yaml)
    a = await RawClient.connect(proxy.port())
    b = await RawClient.connect(proxy.port())
    assert a.accept is not None and b.accept is not None
    assert len(backends[0].requests) == 1 and len(backends[1].requests) == 1  # one each: the full one was skipped
    over = await RawClient.connect(proxy.port())
    assert over.reject is not None and over.reject.status_code == 503
    assert b"max_sessions" in over.reject_body
    assert limited(proxy, adm.BACKENDS_FULL) == 1
    assert await echoes(a) and await echoes(b)


async def test_max_sessions_per_ip_answers_429_and_spares_other_addresses(nursery, backends) -> None:
    backends.append(start_backend())
    yaml = proxy_yaml([backends[0].port], extra=FAST + "rate_limits: {max_sessions_per_ip: 1}\n")
    proxy = await start_proxy(nursery, yaml)
    a = await RawClient.connect(proxy.port())
    over = await RawClient.connect(proxy.port())
    assert over.reject is not None and over.reject.status_code == 429
    assert header(over, b"retry-after") == b"1"
    other = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    assert other.accept is not None and await echoes(other)
    assert limited(proxy, adm.SESSIONS_PER_IP) == 1
    assert await echoes(a)


async def test_handshake_rate_per_ip_answers_429_with_retry_after(nursery, backends) -> None:
    backends.append(start_backend())
    yaml = proxy_yaml([backends[0].port], extra=FAST + "rate_limits: {handshakes_per_ip: {rate: 1/m, burst: 2}}\n")
    proxy = await start_proxy(nursery, yaml)
    a = await RawClient.connect(proxy.port())
    plain = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"  # proxied: the backend's own 426
    assert status_of(await raw_http(proxy.port(), plain)) == 426  # a plain request counts too
    over = await RawClient.connect(proxy.port())
    assert over.reject is not None and over.reject.status_code == 429
    assert int(header(over, b"retry-after") or 0) == 60  # one token at 1/m
    assert status_of(await raw_http(proxy.port(), b"garbage\r\n\r\n")) == 429  # malformed requests too
    other = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    assert other.accept is not None
    assert limited(proxy, adm.HANDSHAKE_RATE) == 2
    assert await echoes(a) and await echoes(other)


# --- per-session message and byte rates: backpressure, then 1008 --------------------------------


async def round_trip(client: RawClient, n: int, payload: str) -> None:
    """Send n messages at once, then read their n echoes: one batch, one read at the proxy."""
    for i in range(n):
        await client.send(TextMessage(f"{i}:{payload}"))
    with trio.fail_after(5):
        for i in range(n):
            assert await client.receive_message() == f"{i}:{payload}"


async def test_message_rate_slows_the_sender_without_closing_it(nursery, backends) -> None:
    backends.append(start_backend())
    rates = "rate_limits: {messages: {rate: 20/s, burst: 5}, close_after: off}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST + rates))
    bystander = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    client = await RawClient.connect(proxy.port())
    start = trio.current_time()
    await round_trip(client, 5, "burst")  # within the burst: no wait
    assert trio.current_time() - start < 0.4
    await round_trip(client, 10, "over")  # 10 over budget: the next read waits 0.5s
    # The bystander has its own budget: it echoes at once while the other session is held back.
    before = trio.current_time()
    assert await echoes(bystander)
    assert trio.current_time() - before < 0.3
    await round_trip(client, 10, "over")
    await round_trip(client, 1, "last")
    assert trio.current_time() - start >= 0.9  # two 0.5s waits: the reads were held back, nothing lost
    assert limited(proxy, adm.RATE_THROTTLED) >= 1
    assert limited(proxy, adm.RATE_CLOSED) == 0


async def test_byte_rate_slows_the_sender(nursery, backends) -> None:
    backends.append(start_backend())
    rates = "rate_limits: {bytes: {rate: 64KiB/s, burst: 16KiB}, close_after: off}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST + rates))
    client = await RawClient.connect(proxy.port())
    start = trio.current_time()
    chunk = "x" * 4000
    await round_trip(client, 4, chunk)  # 16 KB: the burst
    for _ in range(2):
        await round_trip(client, 8, chunk)  # 32 KB over budget each: 0.5s before the next read
    await round_trip(client, 1, "last")
    assert trio.current_time() - start >= 0.9
    assert limited(proxy, adm.RATE_THROTTLED) >= 1


async def test_a_sender_over_its_rate_for_close_after_gets_1008_and_the_backend_1001(nursery, backends) -> None:
    closes: list[int | None] = []
    backends.append(start_backend(recording_echo(closes)))
    rates = "rate_limits: {messages: {rate: 10/s, burst: 5}, close_after: 0.5s}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST + rates))
    bystander = await RawClient.connect(proxy.port(), local_address="127.0.0.2")
    flood = await RawClient.connect(proxy.port())
    frame = build_frame(0x1, b"flood" * 20, mask=True)
    start = trio.current_time()
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:

            async def send_forever() -> None:
                while True:
                    await flood.stream.send_all(frame * 10)

            inner.start_soon(send_forever)
            while True:
                event = await flood.next_event()
                if isinstance(event, CloseConnection):
                    break
            inner.cancel_scope.cancel()
    assert event.code == 1008 and "rate limit" in event.reason
    assert trio.current_time() - start >= 0.5
    await wait_for(lambda: closes == [1001])
    assert limited(proxy, adm.RATE_CLOSED) == 1
    assert await echoes(bystander)


@pytest.mark.parametrize("relay", ["inspect", "passthrough"])
@pytest.mark.parametrize(
    ("limit", "cost"),
    [("messages: {rate: 10/s, burst: 10}", lambda frame: 1), ("bytes: {rate: 400/s, burst: 400}", len)],
    ids=["messages", "bytes"],
)
async def test_a_burst_in_one_read_reaches_the_backend_only_as_fast_as_the_budget(
    nursery, backends, relay, limit, cost
) -> None:
    """200 small messages sent at once (one read at the proxy): the backend receives at most
    burst + rate x elapsed of them (+1), then the sender gets 1008 at close_after."""
    arrivals: list[float] = []
    closes: list[int | None] = []

    def counting(conn) -> None:  # type: ignore[no-untyped-def]
        try:
            for _ in conn:
                arrivals.append(time.monotonic())
        finally:
            closes.append(conn.close_code)

    backends.append(start_backend(counting))
    rates = f"rate_limits: {{{limit}, close_after: 1s}}\n"
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST + rates, listener_extra=f"relay: {relay}")
    )
    client = await RawClient.connect(proxy.port())
    frames = [build_frame(0x1, f"m{i:03}".encode(), mask=True) for i in range(200)]
    start = time.monotonic()
    await client.stream.send_all(b"".join(frames))
    with trio.fail_after(5):
        while not isinstance(event := await client.next_event(), CloseConnection):
            pass
    assert event.code == 1008 and "rate limit" in event.reason
    await wait_for(lambda: bool(closes))
    assert closes == [1001]
    rate, burst = (10, 10) if cost(frames[0]) == 1 else (400 / len(frames[0]), 400 / len(frames[0]))
    assert len(arrivals) < 200
    for n, at in enumerate(arrivals, 1):
        assert n <= burst + rate * (at - start) + 1, (n, at - start)
    assert len(arrivals) >= burst  # the budget itself went through


# --- origins and subprotocols -------------------------------------------------------------------


async def test_allowed_origins(nursery, backends) -> None:
    backends.append(start_backend())
    listener = 'allowed_origins: ["https://app.example.com", "*.example.org"]'
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=listener))
    for origin, ok in [
        (b"https://app.example.com", True),
        (b"https://chat.eu.example.org", True),
        (b"https://evil.example.com", False),
        (b"http://app.example.com", False),
        (None, True),  # not a browser: no cross-site hijacking possible
    ]:
        client = await RawClient.connect(proxy.port(), extra_headers=[(b"Origin", origin)] if origin else [])
        if ok:
            assert client.accept is not None, origin
            assert await echoes(client)
        else:
            assert client.reject is not None and client.reject.status_code == 403, origin
    assert len(backends[0].requests) == 3
    assert limited(proxy, adm.ORIGIN) == 2


async def test_allowed_subprotocols_filter_the_offer_and_refuse_when_none_is_left(nursery, backends) -> None:
    backends.append(start_backend(subprotocols=["chat.v1", "chat.v2", "chat.v3"]))
    yaml = proxy_yaml([backends[0].port], extra=FAST).replace(
        "    pool: p\n",
        "    routes:\n"
        "      - {pool: p, match: {path_prefix: /v2}, allowed_subprotocols: [chat.v2, chat.v3]}\n"
        "      - {pool: p}\n",
    )
    proxy = await start_proxy(nursery, yaml)
    client = await RawClient.connect(proxy.port(), "/v2/room", subprotocols=["chat.v1", "chat.v3", "chat.v2"])
    assert client.accept is not None and client.accept.subprotocol == "chat.v2"  # the backend's first choice
    seen = backends[0].requests[-1].headers.get_all("Sec-WebSocket-Protocol")
    assert [p.strip() for v in seen for p in v.split(",")] == ["chat.v3", "chat.v2"]  # chat.v1 never reached it
    refused = await RawClient.connect(proxy.port(), "/v2/room", subprotocols=["chat.v1"])
    assert refused.reject is not None and refused.reject.status_code == 400
    assert b"no allowed subprotocol" in refused.reject_body
    none = await RawClient.connect(proxy.port(), "/v2/room")
    assert none.reject is not None and none.reject.status_code == 400
    other_route = await RawClient.connect(proxy.port(), "/v1", subprotocols=["chat.v1"])
    assert other_route.accept is not None and other_route.accept.subprotocol == "chat.v1"
    assert limited(proxy, adm.SUBPROTOCOL) == 2
    assert await echoes(client)


# --- auth before the upgrade -------------------------------------------------------------------


@dataclass
class AuthServer:
    port: int
    seen: list[dict[str, str]] = field(default_factory=list)


async def start_auth(nursery: trio.Nursery) -> AuthServer:
    """A small auth service: the Authorization header decides the answer."""
    server = AuthServer(port=0)

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request = None
        while request is None:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
        headers = {k.decode(): v.decode() for k, v in request.headers}
        headers["target"] = request.target.decode()
        server.seen.append(headers)
        token = headers.get("authorization", "")
        if token == "Bearer slow":
            await trio.sleep(30)  # far past the proxy's auth timeout; cancelled with the test
        if token == "Bearer garbage":
            await stream.send_all(b"this is not HTTP\r\n\r\n")
            return
        extra: list[tuple[bytes, bytes]] = []
        if token.startswith("Bearer good"):
            status = 200
            user = token.split("-", 1)[1] if "-" in token else "42"
            extra = [(b"X-User-Id", user.encode()), (b"X-Secret", b"no")]
        elif token == "Bearer forbidden":
            status = 403
        else:
            status = 401
            extra = [(b"WWW-Authenticate", b'Bearer realm="chat"')]
        response = h11.Response(status_code=status, headers=[*extra, (b"Content-Length", b"2")])
        await stream.send_all(conn.send(response) + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


def auth_listener(port: int, cache: str = "off") -> str:
    return (
        f"auth: {{url: 'http://127.0.0.1:{port}/check?app=chat', timeout: 0.5s, "
        f"pass_headers: [Authorization], copy_headers: [X-User-Id], cache: {cache}}}"
    )


async def test_auth_2xx_continues_and_copy_headers_reach_the_backend(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(auth.port))
    )
    client = await RawClient.connect(
        proxy.port(),
        "/room?id=7",
        extra_headers=[(b"Authorization", b"Bearer good"), (b"X-User-Id", b"admin"), (b"Cookie", b"c=1")],
    )
    assert client.accept is not None and await echoes(client)
    asked = auth.seen[0]
    assert asked["target"] == "/check?app=chat" and asked["authorization"] == "Bearer good"
    assert asked["x-forwarded-uri"] == "/room?id=7" and asked["x-forwarded-for"] == "127.0.0.1"
    assert "cookie" not in asked  # only pass_headers go to the auth service
    upstream = backends[0].requests[0].headers
    assert upstream.get_all("X-User-Id") == ["42"]  # the auth service's, never the client's "admin"
    assert upstream.get("X-Secret") is None  # not in copy_headers
    assert proxy.server.edge.auth.counts["allowed"] == 1


async def test_auth_401_and_403_reach_the_client_and_the_backend_sees_nothing(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(auth.port))
    )
    bystander = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", b"Bearer good")])
    denied = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", b"Bearer wrong")])
    assert denied.reject is not None and denied.reject.status_code == 401
    assert header(denied, b"www-authenticate") == b'Bearer realm="chat"'
    forbidden = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", b"Bearer forbidden")])
    assert forbidden.reject is not None and forbidden.reject.status_code == 403
    anonymous = await RawClient.connect(proxy.port())
    assert anonymous.reject is not None and anonymous.reject.status_code == 401
    assert len(backends[0].requests) == 1
    assert limited(proxy, adm.AUTH_DENIED) == 3
    assert proxy.server.edge.admission.total == 1  # refused sessions gave their place back
    assert await echoes(bystander)


async def test_auth_timeout_error_or_down_is_503(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(auth.port))
    )
    start = trio.current_time()
    slow = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", b"Bearer slow")])
    assert slow.reject is not None and slow.reject.status_code == 503
    assert 0.4 <= trio.current_time() - start < 2.0  # the auth timeout (0.5s), not the auth server's 30s
    garbage = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", b"Bearer garbage")])
    assert garbage.reject is not None and garbage.reject.status_code == 503
    down = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(free_port()))
    )
    refused = await RawClient.connect(down.port(), extra_headers=[(b"Authorization", b"Bearer good")])
    assert refused.reject is not None and refused.reject.status_code == 503
    assert header(refused, b"retry-after") == b"1"
    assert backends[0].requests == []
    assert limited(proxy, adm.AUTH_ERROR) == 2 and limited(down, adm.AUTH_ERROR) == 1


async def test_auth_answers_are_cached_per_credentials(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    yaml = proxy_yaml([backends[0].port], extra=FAST, listener_extra=auth_listener(auth.port, cache="30s"))
    proxy = await start_proxy(nursery, yaml)
    for token in (b"Bearer good-7", b"Bearer good-7", b"Bearer good-8", b"Bearer nope", b"Bearer nope"):
        client = await RawClient.connect(proxy.port(), extra_headers=[(b"Authorization", token)])
        assert (client.accept is not None) is token.startswith(b"Bearer good")
        if client.accept is not None:
            await client.close()
    assert [s["authorization"] for s in auth.seen] == ["Bearer good-7", "Bearer good-8", "Bearer nope"]
    assert [r.headers.get("X-User-Id") for r in backends[0].requests] == ["7", "7", "8"]
    assert proxy.server.edge.auth.counts["cached"] == 2


async def test_auth_is_per_route(nursery, backends) -> None:
    backends.append(start_backend())
    auth = await start_auth(nursery)
    yaml = proxy_yaml([backends[0].port], extra=FAST).replace(
        "    pool: p\n",
        "    routes:\n"
        "      - {pool: p, match: {path_prefix: /public}}\n"
        f"      - {{pool: p, {auth_listener(auth.port)}}}\n",
    )
    proxy = await start_proxy(nursery, yaml)
    public = await RawClient.connect(proxy.port(), "/public/feed")
    assert public.accept is not None
    private = await RawClient.connect(proxy.port(), "/private")
    assert private.reject is not None and private.reject.status_code == 401
    assert len(auth.seen) == 1


async def test_metrics_of_the_edge_are_exposed(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    text = proxy.server.metrics.exposition().decode()
    for limit in (adm.MAX_SESSIONS, adm.HANDSHAKE_RATE, adm.RATE_CLOSED, adm.AUTH_ERROR):
        assert f'wsproxy_edge_limited_total{{limit="{limit}"}} 0.0' in text
    assert "wsproxy_edge_sessions_admitted 0.0" in text
    assert 'wsproxy_auth_checks_total{result="cached"} 0.0' in text
