"""Health checks, failover and retries against real backends on 127.0.0.1 that die, hang, restart
and answer 401/404.

The backends are small trio servers in this process whose behaviour a test switches while they
run: answer WebSocket upgrades and echo, hang (accept TCP, never answer), answer a fixed HTTP
status, fail their health path, or die (listener and connections closed; connects are refused)
and come back on the same port. Intervals are tens of milliseconds, so state changes take well
under a second of real time.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from tests.support import RawClient, free_port, proxy_yaml, start_backend, start_proxy
from wsproxy.config import ActiveHealth, Address, parse_config
from wsproxy.policy.balancing import Backend as PoolBackend
from wsproxy.policy.health import DOWN, EJECTED, UP
from wsproxy.runtime.health_check import probe

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEALTH_PATH = "/healthz"
TIMEOUTS = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\n"
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


# --------------------------------------------------------------------------------------------
# a backend whose behaviour the test switches at run time


@dataclass
class FlakyBackend:
    port: int = 0
    mode: str = "ok"  # ok: upgrade and echo | hang: accept, never answer | status: answer `status`
    status: int = 401
    health_ok: bool = True
    upgrades: int = 0  # 101s answered outside the health path
    health_hits: list[float] = field(default_factory=list)  # trio time of each health request
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            with self.scope:
                await trio.serve_listeners(self._handle, listeners, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    def kill(self) -> None:
        """Close the listener and every connection: connects are refused from now on."""
        self.scope.cancel()

    async def restart(self, nursery: trio.Nursery) -> None:
        self.scope = trio.CancelScope()
        self.health_hits.clear()
        await nursery.start(self.run)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self.mode == "hang":
            await trio.sleep_forever()
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk or len(head) > 65536:
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if path == HEALTH_PATH:
            self.health_hits.append(trio.current_time())
            if not self.health_ok:
                await stream.send_all(_response(503))
                return
            if b"sec-websocket-key" not in headers:
                await stream.send_all(_response(200))
                return
        elif self.mode == "status":
            await stream.send_all(_response(self.status))
            return
        accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        if path != HEALTH_PATH:
            self.upgrades += 1
        await _echo(stream, Connection(ConnectionType.SERVER, trailing_data=rest))


def _response(status: int) -> bytes:
    return f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


async def _echo(stream: trio.SocketStream, ws: Connection) -> None:
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                await stream.send_all(ws.send(event))
            elif isinstance(event, Ping):
                await stream.send_all(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    await stream.send_all(ws.send(event.response()))
                return
        data = await stream.receive_some(65536)
        if not data:
            return
        ws.receive_data(data)


async def start_backends(nursery: trio.Nursery, count: int) -> list[FlakyBackend]:
    started = []
    for _ in range(count):
        b = FlakyBackend()
        await nursery.start(b.run)
        started.append(b)
    return started


def pool_backend(proxy, port: int) -> PoolBackend:  # type: ignore[no-untyped-def]
    """The proxy's live Backend object for the backend on `port` (pool "p")."""
    return next(b for b in proxy.server.snapshot.pools["p"].backends if b.address.port == port)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll until `predicate()` holds; return the trio time it was seen."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
    return trio.current_time()


async def upgrade_head(port: int) -> tuple[bytes, trio.SocketStream]:
    """Send an Upgrade request; return everything up to the end of the answer's head, and the stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    raw = b""
    with trio.fail_after(5):
        await stream.send_all(UPGRADE)
        while b"\r\n\r\n" not in raw:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            raw += chunk
    return raw, stream


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def failed_attempts(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    """The session log's lines for attempts on the backend at `port` that failed to connect."""
    prefix = f"backend 127.0.0.1:{port} (pool p): connect to"
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


async def echo_once(client: RawClient, text: str) -> None:
    await client.send(TextMessage(data=text))
    assert await client.receive_message() == text


# --------------------------------------------------------------------------------------------
# new sessions avoid a dead backend; retries


async def test_new_sessions_avoid_a_dead_backend_once_it_is_marked_down(nursery, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    a, b = await start_backends(nursery, 2)
    pool = "health: {interval: 50ms, timeout: 50ms, fall: 2}\npassive: off\nretries: 0"
    proxy = await start_proxy(nursery, proxy_yaml([a.port, b.port], pool_extra=pool, extra=TIMEOUTS))
    a.kill()
    health_a = pool_backend(proxy, a.port).health
    await wait_for(lambda: health_a.state == DOWN)
    assert f"connect to 127.0.0.1:{a.port} failed" in (health_a.last_error or "")
    before = b.upgrades
    for _ in range(30):  # retries: 0, so any session sent to the dead backend would fail
        head, stream = await upgrade_head(proxy.port())
        await stream.aclose()
        assert status_of(head) == 101, head
    assert b.upgrades - before == 30
    down_lines = [r.getMessage() for r in caplog.records if "is DOWN" in r.getMessage()]
    assert len(down_lines) == 1 and f"127.0.0.1:{a.port}" in down_lines[0] and "failed in a row" in down_lines[0]


async def test_a_failed_connect_is_retried_on_the_next_backend_and_the_client_sees_one_101(nursery, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    dead = free_port()
    (live,) = await start_backends(nursery, 1)
    proxy = await start_proxy(nursery, proxy_yaml([dead, live.port], extra=TIMEOUTS))  # passive: the defaults
    for i in range(12):
        head, stream = await upgrade_head(proxy.port())
        async with stream:
            assert status_of(head) == 101, head
            assert head.count(b"HTTP/1.1 ") == 1  # one answer: the failed attempts never reached the client
            assert head.endswith(b"\r\n\r\n")  # nothing after the 101's head but the relay
            ws = Connection(ConnectionType.CLIENT)
            await stream.send_all(ws.send(TextMessage(data=f"message {i}")))
            with trio.fail_after(2):
                while not (echoed := [e.data for e in ws.events() if isinstance(e, TextMessage)]):
                    ws.receive_data(await stream.receive_some(65536))
            assert echoed == [f"message {i}"]
    assert live.upgrades == 12
    retried = failed_attempts(caplog, dead)
    assert len(retried) == 3  # failures=3: the third one ejected it, later sessions never tried it
    health = pool_backend(proxy, dead).health
    assert health.status(trio.current_time()) == EJECTED
    assert any("ejected for 30s" in r.getMessage() for r in caplog.records)


async def test_a_backend_that_accepts_but_never_answers_is_marked_down_by_the_websocket_check(nursery) -> None:
    hung, good = await start_backends(nursery, 2)
    hung.mode = "hang"
    pool = (
        f"health: {{check: websocket, path: {HEALTH_PATH}, interval: 100ms, timeout: 100ms, fall: 2}}\n"
        "passive: off\nretries: 0"
    )
    proxy = await start_proxy(nursery, proxy_yaml([hung.port, good.port], pool_extra=pool, extra=TIMEOUTS))
    health = pool_backend(proxy, hung.port).health
    await wait_for(lambda: health.state == DOWN, timeout=3)
    assert "no answer within 0.1s" in (health.last_error or "")
    assert pool_backend(proxy, good.port).health.state == UP
    assert len(good.health_hits) >= 2  # the good one passes real handshakes on the health path
    for _ in range(10):
        head, stream = await upgrade_head(proxy.port())
        await stream.aclose()
        assert status_of(head) == 101


async def test_a_tcp_check_cannot_see_a_backend_that_accepts_but_never_answers(nursery) -> None:
    """Why the websocket check exists: the same hung backend passes a tcp check."""
    (hung,) = await start_backends(nursery, 1)
    hung.mode = "hang"
    pool = "health: {check: tcp, interval: 50ms, timeout: 50ms, fall: 1}"
    proxy = await start_proxy(nursery, proxy_yaml([hung.port], pool_extra=pool, extra=TIMEOUTS))
    health = pool_backend(proxy, hung.port).health
    await wait_for(lambda: health.checks_passed >= 5, timeout=3)
    assert health.state == UP and health.checks_failed == 0


@pytest.mark.parametrize("status", [401, 404])
async def test_a_backend_answering_401_or_404_is_not_unhealthy(nursery, status: int) -> None:
    (backend,) = await start_backends(nursery, 1)
    backend.mode, backend.status = "status", status
    pool = f"health: {{check: http, path: {HEALTH_PATH}, interval: 50ms}}\npassive: {{failures: 2}}"
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], pool_extra=pool, extra=TIMEOUTS))
    for _ in range(10):
        head, stream = await upgrade_head(proxy.port())
        await stream.aclose()
        assert status_of(head) == status  # passed through, every time: never ejected, never 503
    health = pool_backend(proxy, backend.port).health
    assert health.status(trio.current_time()) == UP and health.last_error is None and health.ejections == 0


# --------------------------------------------------------------------------------------------
# nothing available: 503 at once


async def test_all_backends_down_answers_503_at_once_with_retry_after(nursery) -> None:
    dead = [free_port(), free_port()]
    pool = "health: {interval: 100ms, timeout: 100ms, fall: 1, rise: 3}\npassive: off"
    proxy = await start_proxy(nursery, proxy_yaml(dead, pool_extra=pool, extra=TIMEOUTS))
    await wait_for(lambda: all(b.health.state == DOWN for b in proxy.server.snapshot.pools["p"].backends))
    start = trio.current_time()
    head, stream = await upgrade_head(proxy.port())
    elapsed = trio.current_time() - start
    await stream.aclose()
    assert status_of(head) == 503, head
    assert header(head, b"retry-after") == b"1"  # 3 checks of 100 ms round up to one second
    assert elapsed < 0.2  # answered at once: no connect was attempted


async def test_all_backends_ejected_answers_503_with_the_time_left(nursery) -> None:
    dead = [free_port(), free_port()]
    pool = "passive: {failures: 1, eject_for: 20s}"
    proxy = await start_proxy(nursery, proxy_yaml(dead, pool_extra=pool, extra=TIMEOUTS))
    head, stream = await upgrade_head(proxy.port())
    await stream.aclose()
    assert status_of(head) == 502  # both tried (one retry), both failed: the last failure answers
    head, stream = await upgrade_head(proxy.port())
    await stream.aclose()
    assert status_of(head) == 503, head
    assert int(header(head, b"retry-after") or 0) in (19, 20)


# --------------------------------------------------------------------------------------------
# recovery: rise, then slow start


async def test_a_recovered_backend_comes_back_after_rise_checks_and_ramps_up(nursery) -> None:
    a, b = await start_backends(nursery, 2)
    pool = (
        f"health: {{check: http, path: {HEALTH_PATH}, interval: 100ms, timeout: 100ms, fall: 1, rise: 3,"
        " slow_start: 1500ms}\npassive: off"
    )
    proxy = await start_proxy(nursery, proxy_yaml([a.port, b.port], pool_extra=pool, extra=TIMEOUTS))
    health = pool_backend(proxy, a.port).health
    a.kill()
    await wait_for(lambda: health.state == DOWN)
    await a.restart(nursery)
    up_at = await wait_for(lambda: health.state == UP)
    assert health.last_change is not None and health.last_change <= up_at
    # exactly `rise` checks of the restarted backend led to the change (the next one comes ~100 ms later)
    assert len([t for t in a.health_hits if t <= health.last_change]) == 3

    async def spread(count: int) -> float:
        before = a.upgrades
        for _ in range(count):
            head, stream = await upgrade_head(proxy.port())
            await stream.aclose()
            assert status_of(head) == 101
        return (a.upgrades - before) / count

    early = await spread(40)  # in the first few hundred ms: a weight of a few %
    await trio.sleep_until(health.last_change + 1.5)
    late = await spread(40)
    print(f"share of new sessions on the recovered backend: {early:.0%} while ramping, {late:.0%} after")
    assert early < 0.25
    assert 0.4 <= late <= 0.6


async def test_a_restarted_backend_takes_sessions_once_its_checks_pass_long_before_its_ejection_ends(
    nursery, caplog
) -> None:
    """Killed: real sessions' failed connects eject it for 30 s (fall is high, so only the ejection
    holds it out). Restarted: `rise` passed checks end the ejection, slow start ramps it in, and it
    takes new sessions within a second or two, not 30 s later."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    a, b = await start_backends(nursery, 2)
    pool = (
        f"health: {{check: http, path: {HEALTH_PATH}, interval: 100ms, timeout: 100ms, fall: 100, rise: 2,"
        " slow_start: 300ms}\npassive: {failures: 1, eject_for: 30s}"
    )
    proxy = await start_proxy(nursery, proxy_yaml([a.port, b.port], pool_extra=pool, extra=TIMEOUTS))
    health = pool_backend(proxy, a.port).health
    a.kill()
    for _ in range(4):  # round robin: a failed connect on `a` (retried on `b`) ejects it
        head, stream = await upgrade_head(proxy.port())
        await stream.aclose()
        assert status_of(head) == 101, head
    assert health.status(trio.current_time()) == EJECTED and health.state == UP
    await a.restart(nursery)
    restarted = trio.current_time()
    back = await wait_for(lambda: health.available(trio.current_time()), timeout=5)
    assert back - restarted < 2.0  # rise 2 x interval 100 ms (+ jitter): far from eject_for
    await trio.sleep_until(back + 0.3)  # slow start over
    before = a.upgrades
    for _ in range(20):
        head, stream = await upgrade_head(proxy.port())
        await stream.aclose()
        assert status_of(head) == 101, head
    assert a.upgrades - before >= 5  # round robin again: about half
    assert trio.current_time() - restarted < 10  # all of it well inside the 30 s ejection
    assert any("ejection ended early" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# open sessions when a backend goes down


async def open_sessions(port: int, count: int) -> list[RawClient]:
    clients = []
    for i in range(count):
        client = await RawClient.connect(port, f"/s/{i}")
        assert client.accept is not None
        await echo_once(client, f"hello {i}")
        clients.append(client)
    return clients


async def test_close_sessions_on_down_spreads_1012_over_the_drain_window(nursery) -> None:
    (backend,) = await start_backends(nursery, 1)
    pool = (
        f"health: {{check: http, path: {HEALTH_PATH}, interval: 50ms, timeout: 50ms, fall: 1}}\n"
        "close_sessions_on_down: true\ndrain_window: 1s"
    )
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], pool_extra=pool, extra=TIMEOUTS))
    clients = await open_sessions(proxy.port(), 10)
    health = pool_backend(proxy, backend.port).health
    backend.health_ok = False  # the sessions themselves still work: only the health path fails
    down_at = await wait_for(lambda: health.state == DOWN)
    closes: list[tuple[float, int | None]] = []

    async def wait_close(client: RawClient) -> None:
        event = await client.wait_close()
        closes.append((trio.current_time(), event.code))

    with trio.fail_after(4):
        async with trio.open_nursery() as waiting:
            for client in clients:
                waiting.start_soon(wait_close, client)
    times = sorted(t - down_at for t, _ in closes)
    print("1012 closes after down (s):", " ".join(f"{t:.2f}" for t in times))
    assert [code for _, code in closes] == [1012] * 10
    assert times[-1] - times[0] >= 0.5  # spread, not a burst
    assert times[-1] <= 1.5
    assert max(sum(1 for t in times if w <= t < w + 0.1) for w in times) <= 4  # no burst (without spreading: all 10)


async def test_without_close_sessions_on_down_open_sessions_stay(nursery) -> None:
    (backend,) = await start_backends(nursery, 1)
    pool = f"health: {{check: http, path: {HEALTH_PATH}, interval: 50ms, timeout: 50ms, fall: 1}}"
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], pool_extra=pool, extra=TIMEOUTS))
    clients = await open_sessions(proxy.port(), 5)
    backend.health_ok = False
    health = pool_backend(proxy, backend.port).health
    await wait_for(lambda: health.state == DOWN)
    await trio.sleep(0.3)
    for i, client in enumerate(clients):
        await echo_once(client, f"still here {i}")  # they may still work, so they stay


# --------------------------------------------------------------------------------------------
# the scenario: kill a backend under load


async def test_killing_a_backend_under_load_fails_no_new_session(nursery, caplog) -> None:
    """200 open sessions and a stream of new connects; one of two backends dies. Connects it gets
    before it is marked down fail over to the other backend (retries); none after. Printed: the
    counts in each phase."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    a, b = await start_backends(nursery, 2)
    pool = "health: {interval: 100ms, timeout: 100ms, fall: 2}"
    proxy = await start_proxy(nursery, proxy_yaml([a.port, b.port], pool_extra=pool, extra=TIMEOUTS))
    held = []
    for i in range(200):
        client = await RawClient.connect(proxy.port(), f"/held/{i}")
        assert client.accept is not None
        held.append(client)
    assert a.upgrades == b.upgrades == 100
    health = pool_backend(proxy, a.port).health
    killed_at = math.inf
    down_at = math.inf
    results: list[tuple[float, int]] = []

    async def connect_stream() -> None:
        for _ in range(400):
            head, stream = await upgrade_head(proxy.port())
            await stream.aclose()
            results.append((trio.current_time(), status_of(head)))
            if trio.current_time() > down_at + 0.5:
                return
            await trio.sleep(0.003)

    async with trio.open_nursery() as load:
        load.start_soon(connect_stream)
        await wait_for(lambda: len(results) >= 30)
        killed_at = trio.current_time()
        a.kill()
        down_at = await wait_for(lambda: health.state == DOWN)
    between = [s for t, s in results if killed_at <= t < down_at]
    after = [s for t, s in results if t >= down_at]
    failed_between = sum(s != 101 for s in between)
    failed_after = sum(s != 101 for s in after)
    retried = failed_attempts(caplog, a.port)
    print(
        f"connects: {len(results)} in all; between kill and down ({down_at - killed_at:.2f}s): {len(between)}, "
        f"{failed_between} failed; after down: {len(after)}, {failed_after} failed; "
        f"attempts on the dead backend retried elsewhere: {len(retried)}"
    )
    assert len(after) >= 20 and failed_after == 0
    assert failed_between == 0  # the first failures were retried on the other backend
    assert len(retried) >= 1
    assert all(s == 101 for _, s in results)


# --------------------------------------------------------------------------------------------
# reload: health lives on the Backend object; checks follow the snapshot


async def test_health_survives_a_reload_and_the_checks_follow_the_backends(nursery) -> None:
    a, b, c = await start_backends(nursery, 3)
    pool = "health: {interval: 50ms, timeout: 50ms, fall: 1, rise: 100}"
    proxy = await start_proxy(nursery, proxy_yaml([a.port, b.port], pool_extra=pool, extra=TIMEOUTS))
    old_a, old_b = pool_backend(proxy, a.port), pool_backend(proxy, b.port)
    a.kill()
    await wait_for(lambda: old_a.health.state == DOWN)
    await a.restart(nursery)  # up again, but rise: 100 keeps it down for a while
    await proxy.server.reload(parse_config(proxy_yaml([a.port, b.port, c.port], pool_extra=pool, extra=TIMEOUTS)))
    assert pool_backend(proxy, a.port) is old_a and old_a.health.state == DOWN  # not reset by the reload
    assert proxy.server.health.watching == {old_a, old_b, pool_backend(proxy, c.port)}
    await wait_for(lambda: pool_backend(proxy, c.port).health.checks_passed >= 1)  # the new one is checked
    await proxy.server.reload(parse_config(proxy_yaml([b.port], pool_extra=pool, extra=TIMEOUTS)))
    assert proxy.server.health.watching == {old_b}
    checked = old_a.health.checks_passed + old_a.health.checks_failed
    await trio.sleep(0.2)
    assert old_a.health.checks_passed + old_a.health.checks_failed == checked  # its checker was cancelled
    await proxy.server.reload(parse_config(proxy_yaml([b.port], extra=TIMEOUTS)))  # health removed
    assert proxy.server.health.watching == frozenset()


# --------------------------------------------------------------------------------------------
# the probes themselves


async def _raw_server(nursery: trio.Nursery, answer: Callable[[bytes], bytes], *, then_close: bool = True) -> int:
    """A server that reads one request head, sends `answer(head)`, then closes or waits."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            await stream.send_all(answer(head))
            if not then_close:
                await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


def _101(head: bytes, *, accept: bytes | None = None) -> bytes:
    key = header(head, b"sec-websocket-key") or b""
    good = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + (accept if accept is not None else good) + b"\r\n\r\n"
    )


async def test_the_websocket_probe_passes_against_another_librarys_server(backends) -> None:
    backends.append(start_backend())
    reason = await probe(Address("127.0.0.1", backends[0].port), ActiveHealth(check="websocket", timeout=2.0))
    assert reason is None
    request = backends[0].requests[0]
    assert request.headers["Sec-WebSocket-Version"] == "13" and request.headers["User-Agent"] == "wsproxy-health-check"


@pytest.mark.parametrize(
    ("check", "answer", "then_close", "expected"),
    [
        ("http", lambda h: _response(204), True, None),
        ("http", lambda h: _response(503), True, "GET /healthz answered 503"),
        ("http", lambda h: _response(301), True, "answered 301"),
        ("http", lambda h: b"nonsense\r\n\r\n", True, "malformed"),
        ("websocket", lambda h: _response(404), True, "/healthz answered 404, not 101"),
        ("websocket", lambda h: _101(h, accept=b"d3Jvbmc="), True, "wrong Sec-WebSocket-Accept"),
        # the close frame may meet the server's close (EOF) or its reset (RST): a failure either way
        ("websocket", lambda h: _101(h), True, "dropped the connection instead of answering our close|reset"),
        ("websocket", lambda h: _101(h), False, "no answer within 0.2s"),  # never answers the close
        ("websocket", lambda h: b"", False, "no answer within 0.2s"),  # never answers the upgrade
        ("websocket", lambda h: _101(h) + b"\x88\x02\x03\xe8", True, None),  # close 1000 right after the 101
        # garbage after the 101 (here a frame with reserved bits set) is not an answer to our close
        ("websocket", lambda h: _101(h) + b"\xf8\x02\x03\xe8", False, "invalid frames"),
    ],
)
async def test_probe_verdicts(nursery, check: str, answer, then_close: bool, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    port = await _raw_server(nursery, answer, then_close=then_close)
    reason = await probe(Address("127.0.0.1", port), ActiveHealth(check=check, path=HEALTH_PATH, timeout=0.2))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and re.search(expected, reason), reason


@pytest.mark.parametrize("check", ["tcp", "http", "websocket"])
async def test_probe_of_a_closed_port_fails_with_the_connect_error(check: str) -> None:
    port = free_port()
    reason = await probe(Address("127.0.0.1", port), ActiveHealth(check=check, timeout=0.5))
    assert reason is not None and f"connect to 127.0.0.1:{port} failed" in reason
