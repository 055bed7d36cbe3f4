"""Plain HTTP/1.1 requests through a WebSocket listener (`listeners[].http: proxy`): routing,
keep-alive on both hops, bodies both ways in both framings, 100-continue, pipelining, request
smuggling patterns, the limits, failures and retries, health, metrics and the log line.

Backends are the standard library's http.server (tests/http_backends.py); clients send raw bytes
and parse answers with h11, so every byte on the wire is the test's choice.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.http_backends import HttpBackend, start_http_backend
from tests.support import RawClient, free_port, proxy_yaml, raw_http, start_backend, start_proxy, status_of

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s, http_idle: 2s, http_response: 2s}\n"


@pytest.fixture
def http_backends():  # type: ignore[no-untyped-def]
    started: list[HttpBackend] = []
    yield started
    for b in started:
        b.stop()


class Client:
    """One client connection: raw bytes out, h11-parsed responses in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self) -> tuple[h11.Response, bytes]:
        """The next response (informational ones skipped) and its whole body."""
        resp: h11.Response | None = None
        body = b""
        with trio.fail_after(5):
            while True:
                event = self.h.next_event()
                if event is h11.NEED_DATA:
                    self.h.receive_data(await self.stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Response):
                    resp = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert resp is not None
                    if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
                        self.h.start_next_cycle()
                    return resp, body
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError("connection closed before a response")

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[h11.Response, bytes]:
        """Send one request (`headers`: extra "Name: value\r\n" lines) and read its response."""
        fields = [("Host", "app.test")]
        fields += [tuple(ln.split(": ", 1)) for ln in headers.split("\r\n") if ln]  # type: ignore[misc]
        if body or method in ("POST", "PUT"):
            fields.append(("Content-Length", str(len(body))))
        data = self.h.send(h11.Request(method=method, target=path, headers=fields))
        if body:
            data += self.h.send(h11.Data(data=body))
        await self.send(data + self.h.send(h11.EndOfMessage()))
        return await self.response()

    async def closed_by_peer(self) -> bool:
        with trio.move_on_after(5):
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            return data == b""
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def header(resp: h11.Response, name: bytes) -> list[bytes]:
    return [v for k, v in resp.headers if k == name.lower()]


async def _proxy(nursery, backends: list[HttpBackend], *, extra: str = FAST, **kw):  # type: ignore[no-untyped-def]
    return await start_proxy(nursery, proxy_yaml([b.port for b in backends], extra=extra, **kw))


# --------------------------------------------------------------------------------------------
# requests, forwarding headers, keep-alive


async def test_get_reaches_the_pool_with_forwarding_headers_and_hop_by_hop_removed(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    client = await Client.open(proxy.port())
    extra = "Keep-Alive: 5\r\nX-Custom: yes\r\nX-Forwarded-For: 10.0.0.9\r\n"
    resp, body = await client.request("GET", "/id?q=1", headers=extra)
    assert resp.status_code == 200 and body == b"b1 GET /id?q=1"
    seen = http_backends[0].seen[0].headers
    assert seen["Host"] == "app.test" and seen["X-Custom"] == "yes"
    # the test client is no trusted proxy: its own X-Forwarded-For is dropped (forwarding.py)
    assert seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Real-IP"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http" and seen["X-Forwarded-Host"] == "app.test"
    assert seen["Forwarded"] == "for=127.0.0.1;proto=http;host=app.test"
    assert "Keep-Alive" not in seen
    assert header(resp, b"x-backend") == [b"b1"]
    await client.aclose()


async def test_keep_alive_client_requests_share_one_pooled_backend_connection(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    client = await Client.open(proxy.port())
    for i in range(5):
        resp, body = await client.request("GET", f"/id/{i}")
        assert resp.status_code == 200 and body == f"b1 GET /id/{i}".encode()
    await client.aclose()
    other = await Client.open(proxy.port())  # another client reuses the same idle backend connection
    assert (await other.request("GET", "/again"))[0].status_code == 200
    await other.aclose()
    assert len(http_backends[0].seen) == 6
    assert http_backends[0].connections == 1


async def test_backend_connection_closing_itself_is_not_reused(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/close"))[0].status_code == 200
    assert (await client.request("GET", "/id"))[0].status_code == 200  # the client connection goes on
    await client.aclose()
    assert http_backends[0].connections == 2


async def test_idle_backend_connections_close_after_idle_timeout(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends, pool_extra="http_pool: {max_idle: 2, idle_timeout: 0.2s}")
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/id"))[0].status_code == 200
    assert len(proxy.server.idle) == 1
    with trio.fail_after(3):
        while len(proxy.server.idle):
            await trio.sleep(0.05)
    assert (await client.request("GET", "/id"))[0].status_code == 200
    await client.aclose()
    assert http_backends[0].connections == 2


async def test_idle_client_connection_is_closed_after_http_idle(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    extra = "timeouts: {handshake: 2s, connect: 1s, http_idle: 0.3s}\n"
    proxy = await _proxy(nursery, http_backends, extra=extra)
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/id"))[0].status_code == 200
    started = trio.current_time()
    assert await client.closed_by_peer()
    assert trio.current_time() - started < 2


async def test_pipelined_requests_are_answered_in_order(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    client = await Client.open(proxy.port())
    paths = ["/slow?s=0.3", "/id/2", "/echo", "/id/4"]
    raw = b""
    for p in paths:
        body = b"posted" if p == "/echo" else b""
        raw += f"POST {p} HTTP/1.1\r\nHost: app.test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    await client.send(raw)  # all four at once, before any answer
    bodies = []
    pending = b""
    for _ in paths:  # h11 clients do not pipeline: one parser per response, fed what is left
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        h.send(h11.EndOfMessage())
        if pending:
            h.receive_data(pending)
        body = b""
        with trio.fail_after(5):
            while not isinstance(ev := h.next_event(), h11.EndOfMessage):
                if ev is h11.NEED_DATA:
                    h.receive_data(await client.stream.receive_some(65536))
                elif isinstance(ev, h11.Response):
                    assert ev.status_code == 200
                elif isinstance(ev, h11.Data):
                    body += ev.data
        pending = h.trailing_data[0]
        bodies.append(body)
    assert bodies == [b"b1 POST /slow?s=0.3", b"b1 POST /id/2", b"posted", b"b1 POST /id/4"]
    await client.aclose()


async def test_upgrade_after_plain_requests_on_the_same_connection(nursery, http_backends, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    await stream.send_all(b"GET /plain HTTP/1.1\r\nHost: app.test\r\n\r\n")
    with trio.fail_after(5):
        got = b""
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 ")  # the websockets backend answers a plain GET itself
    length = int(next(ln.split(b":")[1] for ln in got.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    rest = got.partition(b"\r\n\r\n")[2]
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    client = RawClient(stream)
    await stream.send_all(client.ws.send(Request(host="app.test", target="/ws")))
    with trio.fail_after(5):
        while client.accept is None:
            ev = await client.next_event()
            if isinstance(ev, AcceptConnection):
                client.accept = ev
        await client.send(TextMessage(data="after http"))
        assert await client.receive_message() == "after http"


# --------------------------------------------------------------------------------------------
# bodies both ways, 100-continue, limits


async def test_request_body_with_content_length_and_chunked_reach_backend_intact(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    payload = bytes(range(256)) * 1000
    client = await Client.open(proxy.port())
    resp, body = await client.request("POST", "/echo", payload)
    assert resp.status_code == 200 and body == payload
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:1000], payload[1000:70000], payload[70000:]))
    head = b"PUT /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    await client.send(head + chunked + b"0\r\n\r\n")
    client.h.send(h11.Request(method="PUT", target="/echo", headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]))
    client.h.send(h11.EndOfMessage())
    resp, body = await client.response()
    assert resp.status_code == 200 and body == payload
    assert http_backends[0].seen[1].headers.get("Transfer-Encoding") == "chunked"
    await client.aclose()


async def test_chunked_and_large_responses_reach_client_intact(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/chunked")
    assert resp.status_code == 200 and body == b"alpha-beta-gamma"
    resp, body = await client.request("GET", "/big?kib=2048")
    assert body == bytes(range(256)) * 8192
    resp, body = await client.request("HEAD", "/big?kib=4")
    assert body == b"" and header(resp, b"content-length") == [b"4096"]
    await client.aclose()


async def test_expect_100_continue_gets_100_before_the_body_is_sent(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    with trio.fail_after(3):
        interim = await stream.receive_some(65536)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await stream.send_all(b"hello")
    got = await read_response(stream)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"hello")
    assert "Expect" not in http_backends[0].seen[0].headers
    await stream.aclose()


async def read_response(stream: trio.SocketStream) -> bytes:
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    h.send(h11.EndOfMessage())
    raw = b""
    with trio.fail_after(5):
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                raw += data
                h.receive_data(data)
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return raw


async def test_declared_body_over_max_body_bytes_is_413_without_100_continue(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends, extra=FAST + "limits: {max_body_bytes: 1000}\n")
    answer = await raw_http(
        proxy.port(), b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n"
    )
    assert status_of(answer) == 413 and b"100 Continue" not in answer
    assert http_backends[0].seen == []


async def test_chunked_body_over_max_body_bytes_is_413(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends, extra=FAST + "limits: {max_body_bytes: 1000}\n")
    body = b"%x\r\n%s\r\n" % (800, b"a" * 800) * 2 + b"0\r\n\r\n"
    head = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await raw_http(proxy.port(), head + body)
    assert status_of(answer) == 413


# --------------------------------------------------------------------------------------------
# request smuggling patterns: refused before any backend sees them


SMUGGLING = {
    "te_and_cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_different_cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "cl_list_differs": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\nabcde",
    "two_te": (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad_chunk_size": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "negative_cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "no_host": b"GET /id HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
async def test_request_smuggling_patterns_are_400(nursery, http_backends, case: str) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    answer = await raw_http(proxy.port(), SMUGGLING[case] + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(answer) == 400
    assert answer.count(b"HTTP/1.1 ") == 1  # the connection closed: nothing after it was read as a request
    assert all(s.path != "/smuggled" for s in http_backends[0].seen)


async def test_http_reject_keeps_the_426(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends, listener_extra="http: reject")
    answer = await raw_http(proxy.port(), b"GET /id HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(answer) == 426
    assert http_backends[0].seen == []


# --------------------------------------------------------------------------------------------
# edge rules, failures, retries, health


async def test_origin_rule_applies_to_plain_requests(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends, listener_extra='allowed_origins: ["https://ok.test"]')
    client = await Client.open(proxy.port())
    resp, _ = await client.request("GET", "/id", headers="Origin: https://evil.test\r\n")
    assert resp.status_code == 403
    resp, _ = await client.request("GET", "/id", headers="Origin: https://ok.test\r\n")  # bodyless: kept alive
    assert resp.status_code == 200
    await client.aclose()


async def test_idempotent_request_is_retried_on_another_backend_when_connect_fails(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("alive"))
    dead = free_port()
    proxy = await start_proxy(nursery, proxy_yaml([dead, http_backends[0].port], extra=FAST))
    client = await Client.open(proxy.port())
    for _ in range(4):
        resp, body = await client.request("GET", "/id")
        assert resp.status_code == 200 and body.startswith(b"alive")
    await client.aclose()


async def test_post_with_body_is_not_retried_and_gets_502(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("alive"))
    dead = free_port()
    proxy = await start_proxy(nursery, proxy_yaml([dead, http_backends[0].port], extra=FAST))
    answers = []
    for _ in range(2):  # round robin: one of the two starts on the dead backend
        client = await Client.open(proxy.port())
        resp, body = await client.request("POST", "/echo", b"payload")
        answers.append((resp.status_code, body))
        await client.aclose()
    assert sorted(status for status, _ in answers) == [200, 502]
    assert (502, b"502 Bad Gateway\n") in answers  # the proxy's 5xx names no backend (its address is logged)


async def test_backend_answering_too_late_is_504(nursery, http_backends) -> None:
    http_backends.append(start_http_backend("slow"))
    extra = "timeouts: {handshake: 2s, connect: 1s, http_response: 0.3s}\n"
    proxy = await _proxy(nursery, http_backends, extra=extra)
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/slow?s=2")
    assert resp.status_code == 504 and body == b"504 Gateway Timeout\n"


async def test_http_failures_eject_a_backend_and_no_backend_left_is_503(nursery, http_backends) -> None:
    dead = free_port()
    proxy = await start_proxy(
        nursery, proxy_yaml([dead], extra=FAST, pool_extra="passive: {failures: 1, eject_for: 30s}\nretries: 0")
    )
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/id"))[0].status_code == 502
    resp, body = await client.request("GET", "/id")
    assert resp.status_code == 503 and header(resp, b"retry-after")
    assert body == b"503 Service Unavailable\n"  # not the pool's name nor why its backends are out
    await client.aclose()
    assert proxy.server.snapshot.pools["p"].backends[0].health.status(trio.current_time()) == "ejected"


# --------------------------------------------------------------------------------------------
# observability: HTTP figures apart from WebSocket sessions


async def test_http_requests_have_their_own_metrics_and_log_line(nursery, http_backends, caplog) -> None:
    http_backends.append(start_http_backend("b1"))
    proxy = await _proxy(nursery, http_backends)
    caplog.set_level(logging.INFO, logger="wsproxy")
    client = await Client.open(proxy.port())
    await client.request("POST", "/echo", b"12345")
    await client.request("GET", "/id?status=404")
    await client.aclose()
    with trio.fail_after(3):
        while proxy.server.sessions:
            await trio.sleep(0.01)
    text = proxy.server.metrics.exposition().decode()
    assert 'wsproxy_http_requests_total{listener="127.0.0.1:0",method="POST",pool="p",status="200"} 1.0' in text
    assert 'wsproxy_http_requests_total{listener="127.0.0.1:0",method="GET",pool="p",status="404"} 1.0' in text
    assert 'wsproxy_http_body_bytes_total{direction="client_to_backend",listener="127.0.0.1:0",pool="p"} 5.0' in text
    assert "wsproxy_handshakes_total{" not in text  # no WebSocket handshake happened
    lines = [r.getMessage() for r in caplog.records if r.name == "wsproxy.http"]
    assert any("method=POST path=/echo" in ln and "status=200" in ln and "bytes_in_client=5" in ln for ln in lines)
    assert not [r for r in caplog.records if r.name == "wsproxy.session" and r.getMessage().startswith("session ")]


async def test_reload_ends_keep_alive_between_requests_so_the_next_uses_the_new_config(nursery, http_backends) -> None:
    from wsproxy.config import parse_config

    for name in ("old", "new"):
        http_backends.append(start_http_backend(name))
    proxy = await start_proxy(nursery, proxy_yaml([http_backends[0].port], extra=FAST))
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/id"))[1].startswith(b"old")
    await proxy.server.reload(parse_config(proxy_yaml([http_backends[1].port], extra=FAST), source="r.yaml"))
    assert (await client.request("GET", "/id"))[1].startswith(b"old")  # answered, then the connection ends
    assert await client.closed_by_peer()
    again = await Client.open(proxy.port())
    assert (await again.request("GET", "/id"))[1].startswith(b"new")
    await again.aclose()
