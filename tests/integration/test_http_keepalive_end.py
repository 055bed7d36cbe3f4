"""How a kept-alive plain HTTP connection ends (`listeners[].http: proxy`): a request refused
later on the connection (over its address's rate, unreadable, a head over the limit) is still a
request, with its own `http` log line and metric count; a drain (SIGTERM, a binary upgrade: both
are Server.shutdown) lets the request in flight finish, marks its response `Connection: close`
and reads nothing more on that connection, while an idle kept-alive connection is closed at once.
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.http_backends import HttpBackend, start_http_backend
from tests.integration.test_http_proxy import FAST, Client, header
from tests.support import proxy_yaml, start_proxy


@pytest.fixture
def app():  # type: ignore[no-untyped-def]
    backend = start_http_backend("app")
    yield backend
    backend.stop()


def _http_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsproxy.http" and r.getMessage().startswith("http ")]


def _requests_total(proxy, status: int) -> float:  # type: ignore[no-untyped-def]
    """wsproxy_http_requests_total over every label but the status."""
    total = 0.0
    for line in proxy.server.metrics.exposition().decode().splitlines():
        if line.startswith("wsproxy_http_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _ended(proxy) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(3):
        while proxy.server.sessions:
            await trio.sleep(0.01)


# --------------------------------------------------------------------------------------------
# a refusal later on the connection is a request: one log line, one count


LATER_REFUSALS = {
    # the second request finds its address's bucket empty
    "rate_limited": (
        FAST + "rate_limits: {handshakes_per_ip: {rate: 0.01, burst: 1}}\n",
        b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n",
        429,
    ),
    # the second request cannot be parsed
    "malformed": (FAST, b"GET /two HTTP/1.1\r\nHost a\r\n\r\n", 400),
    # the second request's head is over limits.max_header_bytes
    "head_too_large": (
        FAST + "limits: {max_header_bytes: 2048}\n",
        b"GET /two HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 2100 + b"\r\n\r\n",
        431,
    ),
}


@pytest.mark.parametrize("case", sorted(LATER_REFUSALS))
async def test_a_refused_later_request_has_its_own_log_line_and_metric(
    nursery, app: HttpBackend, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    extra, second, status = LATER_REFUSALS[case]
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=extra))
    caplog.set_level(logging.INFO, logger="wsproxy")
    client = await Client.open(proxy.port())
    assert (await client.request("GET", "/one"))[0].status_code == 200
    await client.send(second)
    resp, _ = await client.response()
    assert resp.status_code == status
    assert await client.closed_by_peer()
    await client.aclose()
    await _ended(proxy)
    lines = _http_lines(caplog)
    assert len(lines) == 2, lines
    assert f"status={status}" in lines[1]
    assert _requests_total(proxy, 200) == 1.0 and _requests_total(proxy, status) == 1.0
    assert [s.path for s in app.seen] == ["/one"]
    assert not [r for r in caplog.records if r.name == "wsproxy.session" and r.getMessage().startswith("session ")]


async def test_a_refused_first_request_has_one_session_line_and_one_count(
    nursery, app: HttpBackend, caplog: pytest.LogCaptureFixture
) -> None:
    extra = FAST + "rate_limits: {handshakes_per_ip: {rate: 0.01, burst: 1}}\n"
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=extra))
    caplog.set_level(logging.INFO, logger="wsproxy")
    for status in (200, 429):  # the second connection's first request finds the bucket empty
        client = await Client.open(proxy.port())
        assert (await client.request("GET", "/id"))[0].status_code == status
        await client.aclose()
        await _ended(proxy)
    assert len(_http_lines(caplog)) == 1
    sessions = [
        r.getMessage() for r in caplog.records if r.name == "wsproxy.session" and "status=429" in r.getMessage()
    ]
    assert len(sessions) == 1
    text = proxy.server.metrics.exposition().decode().splitlines()
    counted = [ln for ln in text if ln.startswith("wsproxy_handshakes_total{") and 'status="429"' in ln]
    assert _requests_total(proxy, 429) == 0.0 and [ln.rsplit(" ", 1)[1] for ln in counted] == ["1.0"]


# --------------------------------------------------------------------------------------------
# drain: the request in flight finishes, then the connection closes

DRAIN = FAST + "shutdown: {drain_window: 0s, deadline: 5s}\n"


async def _in_flight(app: HttpBackend, count: int) -> None:
    with trio.fail_after(3):
        while len(app.seen) < count:
            await trio.sleep(0.005)


async def test_drain_lets_the_request_in_flight_finish_with_connection_close(nursery, app: HttpBackend) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=DRAIN))
    client = await Client.open(proxy.port())
    # a second request pipelined behind the slow one: the drain must not read it
    await client.send(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: a\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n")
    await _in_flight(app, 1)  # the backend has the request (it answers in 0.5 s)
    done = trio.Event()

    async def shut_down() -> None:
        await proxy.server.shutdown()
        done.set()

    nursery.start_soon(shut_down)
    resp, body = await client.response()
    assert resp.status_code == 200 and body == b"app GET /slow?s=0.5"
    assert header(resp, b"connection") == [b"close"]
    assert await client.closed_by_peer()
    with trio.fail_after(2):  # the drain ends with the connection, not at its 5 s deadline
        await done.wait()
    assert [s.path for s in app.seen] == ["/slow?s=0.5"]


async def test_drain_closes_an_idle_keep_alive_connection_without_waiting(nursery, app: HttpBackend) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=DRAIN.replace("http_idle: 2s", "http_idle: 30s")))
    client = await Client.open(proxy.port())
    resp, _ = await client.request("GET", "/id")
    assert resp.status_code == 200 and not header(resp, b"connection")
    with trio.fail_after(2):  # not the 30 s http_idle, nor the 5 s deadline
        await proxy.server.shutdown()
    assert await client.closed_by_peer()


async def test_drain_deadline_still_cuts_a_request_that_outlasts_it(nursery, app: HttpBackend) -> None:
    extra = FAST + "shutdown: {drain_window: 0s, deadline: 300ms}\n"
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=extra))
    client = await Client.open(proxy.port())
    await client.send(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
    await _in_flight(app, 1)
    with trio.fail_after(1):
        await proxy.server.shutdown()
    assert await client.closed_by_peer()
