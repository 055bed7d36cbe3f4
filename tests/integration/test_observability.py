"""Observability end to end: /metrics after a scripted scenario, the session log, the admin endpoints.

The metrics are scraped over HTTP from the admin listener and read with prometheus-client's own
parser, then compared exactly with what the scenario did (sessions, handshake outcomes, close
codes per side, messages, bytes on the wire, retries). Heartbeat metrics run on the autojump
clock with the trio peers of test_liveness; backpressure uses the raw-frame peers of
test_flow_control on the real clock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.server import ServerConnection
from wsproto.events import CloseConnection, TextMessage

from tests.integration.test_close_codes import after_first_frame, closes_tcp, resets_tcp, start_raw_backend
from tests.integration.test_flow_control import BINARY, BLOCK, RawBackend, Wire, connect_client, endless_flood
from tests.integration.test_liveness import MARKER, TrioBackend, open_pair
from tests.integration.test_relay import ProxyProcess
from tests.support import RawClient, free_port, proxy_yaml, raw_http, start_backend, start_proxy, status_of
from wsproxy.observe.session_log import JsonFormatter

# --------------------------------------------------------------------------------------------
# HTTP and exposition helpers


async def http(port: int, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request to the admin listener: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        h = h11.Connection(h11.CLIENT)
        headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
        out = h.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            out += h.send(h11.Data(data=body))
        out += h.send(h11.EndOfMessage())
        await stream.send_all(out)
        status, got_headers, data = 0, {}, b""
        with trio.fail_after(5):
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, got_headers, data


class Scrape:
    """Samples of one /metrics scrape, read with prometheus-client's parser."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 when absent: counters start there)."""
        for s in self.samples:
            if s.name == name and s.labels == labels:
                return s.value
        return 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def scrape(port: int) -> Scrape:
    status, headers, body = await http(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return Scrape(body.decode())


class JsonCapture(logging.Handler):
    """Records on wsproxy.session, formatted by the JSON formatter `log.format: json` uses."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def sessions(self) -> list[dict]:
        return [r for r in map(json.loads, self.lines) if r.get("event") == "session"]


@pytest.fixture
def session_log() -> Iterator[JsonCapture]:
    capture = JsonCapture()
    logger = logging.getLogger("wsproxy.session")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)


# --------------------------------------------------------------------------------------------
# wire sizes: RawClient (wsproto) masks its frames, the websockets backend does not


def client_frame(payload: int) -> int:
    return 2 + 4 + payload  # payloads here are < 126 bytes


def backend_frame(payload: int) -> int:
    return 2 + payload


def close_4000_backend(conn: ServerConnection) -> None:
    """Echo; the message "close-4000" makes the backend close with 4000 "done"."""
    for message in conn:
        if message == "close-4000":
            conn.close(4000, "done")
            return
        conn.send(message)


def chat_if_offered(conn: ServerConnection, subprotocols: list[str]) -> str | None:
    return "chat" if "chat" in subprotocols else None


def scenario_yaml(backend_port: int, dead: tuple[int, int]) -> str:
    return f"""\
admin: {{address: 127.0.0.1:0}}
heartbeat: {{interval: off}}
timeouts: {{connect: 1s, handshake: 2s, close: 2s}}
listeners:
  - address: 127.0.0.1:0
    routes:
      - {{match: {{path_prefix: /dead}}, pool: dead}}
      - {{pool: p}}
pools:
  p:
    backends: [127.0.0.1:{backend_port}]
  dead:
    retries: 1
    backends: [127.0.0.1:{dead[0]}, 127.0.0.1:{dead[1]}]
"""


BAD_REQUEST = (  # no Sec-WebSocket-Key: the proxy answers 400 itself
    b"GET /bad HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def roundtrip(client: RawClient, text: str) -> None:
    await client.send(TextMessage(data=text))
    assert await client.receive_message() == text


# --------------------------------------------------------------------------------------------
# the scripted scenario


async def test_metrics_and_session_log_count_a_scripted_scenario_exactly(nursery, backends, session_log) -> None:
    backends.append(start_backend(close_4000_backend, select_subprotocol=chat_if_offered))
    backend = backends[0]
    dead = (free_port(), free_port())
    proxy = await start_proxy(nursery, scenario_yaml(backend.port, dead))
    server = proxy.server
    assert server.admin_bound is not None
    admin = server.admin_bound[1]
    listener = "127.0.0.1:0"
    bname = f"127.0.0.1:{backend.port}"

    # three sessions, all open at once
    one = await RawClient.connect(proxy.port(), "/one")
    two = await RawClient.connect(proxy.port(), "/two", subprotocols=["chat"])
    three = await RawClient.connect(proxy.port(), "/three")
    assert one.accept and two.accept and three.accept
    await roundtrip(one, "a")
    await roundtrip(one, "bb")
    await roundtrip(two, "ccc")
    for text in ("d", "ee", "fff"):
        await roundtrip(three, text)

    live = await scrape(admin)
    assert live.value("wsproxy_sessions_active", listener=listener, pool="p", backend=bname) == 3
    assert live.value("wsproxy_handshakes_total", listener=listener, outcome="upgraded", status="101") == 3
    # open sessions' traffic shows while it flows (an hours-long session must not look idle)
    assert live.value("wsproxy_messages_total", listener=listener, pool="p", direction="client_to_backend") == 6
    assert live.value("wsproxy_messages_total", listener=listener, pool="p", direction="backend_to_client") == 6

    # the status page sees the same three sessions
    status, _, body = await http(admin, "/status.json")
    assert status == 200
    doc = json.loads(body)
    assert doc["sessions"] == {"active": 3, "handshaking": 0}
    assert sorted(s["path"] for s in doc["top_sessions_by_age"]) == ["/one", "/three", "/two"]
    assert doc["top_sessions_by_bytes"][0]["path"] == "/three"  # six frames: the most bytes
    [pool_p] = [p for p in doc["pools"] if p["name"] == "p"]
    assert pool_p["active_sessions"] == 3 and pool_p["backends"][0]["active_sessions"] == 3

    # one: the client closes 1000; two: the backend closes 4000; three: the client closes 1000
    assert (await one.close(1000)).code == 1000
    await two.send(TextMessage(data="close-4000"))
    got = await two.wait_close()
    assert (got.code, got.reason) == (4000, "done")
    assert (await three.close(1000)).code == 1000
    for c in (one, two, three):
        with trio.fail_after(5):
            await c.expect_eof()

    # one rejected by the proxy (400), one to a pool whose backends are both down (502 after a retry)
    assert status_of(await raw_http(proxy.port(), BAD_REQUEST)) == 400
    dead_client = await RawClient.connect(proxy.port(), "/dead")
    assert dead_client.reject is not None and dead_client.reject.status_code == 502
    await trio.aclose_forcefully(dead_client.stream)

    with trio.fail_after(5):
        while server.sessions:
            await trio.sleep(0.01)
    m = await scrape(admin)

    # handshakes by outcome and status
    assert m.value("wsproxy_handshakes_total", listener=listener, outcome="upgraded", status="101") == 3
    assert m.value("wsproxy_handshakes_total", listener=listener, outcome="rejected", status="400") == 1
    assert m.value("wsproxy_handshakes_total", listener=listener, outcome="rejected", status="502") == 1
    assert m.total("wsproxy_handshakes_total") == 5
    # sessions: none active now, three durations observed
    assert m.value("wsproxy_sessions_active", listener=listener, pool="p", backend=bname) == 0
    assert m.value("wsproxy_session_duration_seconds_count", listener=listener, pool="p") == 3
    assert m.value("wsproxy_session_duration_seconds_sum", listener=listener, pool="p") > 0
    # close codes per side, and who closed first
    assert m.value("wsproxy_close_codes_total", side="client", code="1000") == 2
    assert m.value("wsproxy_close_codes_total", side="backend", code="1000") == 2  # websockets echoes the client's
    assert m.value("wsproxy_close_codes_total", side="backend", code="4xxx") == 1  # application codes by class
    assert m.value("wsproxy_close_codes_total", side="client", code="4xxx") == 1  # wsproto echoes the backend's
    assert m.total("wsproxy_close_codes_total", side="proxy") == 0
    assert m.total("wsproxy_close_codes_total") == 6
    assert m.value("wsproxy_sessions_closed_total", first_closer="client") == 2
    assert m.value("wsproxy_sessions_closed_total", first_closer="backend") == 1
    # messages each way
    c2b, b2c = "client_to_backend", "backend_to_client"
    assert m.value("wsproxy_messages_total", listener=listener, pool="p", direction=c2b) == 2 + 2 + 3
    assert m.value("wsproxy_messages_total", listener=listener, pool="p", direction=b2c) == 2 + 1 + 3
    # bytes on the wire each way: data frames plus the close frames
    close_1000_c, close_1000_b = client_frame(2), backend_frame(2)
    close_4000_c, close_4000_b = client_frame(2 + len("done")), backend_frame(2 + len("done"))
    sent = [1, 2, 3, len("close-4000"), 1, 2, 3]
    echoed = [1, 2, 3, 1, 2, 3]
    from_client = sum(map(client_frame, sent)) + 2 * close_1000_c + close_4000_c
    from_backend = sum(map(backend_frame, echoed)) + 2 * close_1000_b + close_4000_b
    assert m.value("wsproxy_bytes_total", listener=listener, pool="p", direction=c2b) == from_client
    assert m.value("wsproxy_bytes_total", listener=listener, pool="p", direction=b2c) == from_backend
    # the dead pool: one retry, each backend failed once with 502
    assert m.value("wsproxy_retries_total", pool="dead") == 1
    assert m.total("wsproxy_retries_total") == 1
    for port in dead:
        assert m.value("wsproxy_upstream_failures_total", pool="dead", backend=f"127.0.0.1:{port}", status="502") == 1
    # nothing else happened
    assert m.total("wsproxy_pings_sent_total") == 0 and m.total("wsproxy_dead_peers_total") == 0
    assert m.total("wsproxy_backpressure_events_total") == 0
    assert m.value("wsproxy_config_reloads_total", result="ok") == 0
    assert m.value("wsproxy_config_reloads_total", result="failed") == 0
    assert m.value("wsproxy_config_info", source="test.yaml", sha256=proxy.config.digest) == 1
    # backends read at scrape time
    assert m.value("wsproxy_backend_up", pool="p", backend=bname) == 1
    assert m.value("wsproxy_backend_weight", pool="p", backend=bname) == 1
    assert len(m.labelsets("wsproxy_backend_health_state")) == 3

    # the session log: one JSON line per answered session, matching the metrics
    lines = session_log.sessions()
    assert len(lines) == 5
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {"/one", "/two", "/three", "/bad", "/dead"}
    two_line = by_path["/two"]
    datetime.fromisoformat(two_line.pop("time"))
    assert two_line.pop("client").startswith("127.0.0.1:")
    assert 0 < two_line.pop("duration_s") < 30
    assert two_line == {
        "level": "info",
        "logger": "wsproxy.session",
        "event": "session",
        "listener": listener,
        "pool": "p",
        "backend": bname,
        "path": "/two",
        "subprotocol": "chat",
        "status": 101,
        "messages_to_backend": 2,
        "messages_to_client": 1,
        "bytes_from_client": client_frame(3) + client_frame(len("close-4000")) + close_4000_c,
        "bytes_from_backend": backend_frame(3) + close_4000_b,
        "client_close": {"code": 4000, "reason": "done"},
        "backend_close": {"code": 4000, "reason": "done"},
        "proxy_close": None,
        "first_closer": "backend",
        "rtt_client_ms": None,
        "rtt_backend_ms": None,
        "retries": 0,
        "error": None,
    }
    assert by_path["/one"]["first_closer"] == "client" and by_path["/one"]["client_close"]["code"] == 1000
    assert by_path["/one"]["subprotocol"] is None
    relayed = [line for line in lines if line["status"] == 101]
    assert sum(line["bytes_from_client"] for line in relayed) == from_client
    assert sum(line["bytes_from_backend"] for line in relayed) == from_backend
    dead_line = by_path["/dead"]
    assert (dead_line["status"], dead_line["pool"], dead_line["retries"]) == (502, "dead", 1)
    assert dead_line["backend"] in {f"127.0.0.1:{p}" for p in dead} and dead_line["error"]
    assert dead_line["client_close"] is None and dead_line["messages_to_backend"] == 0
    bad_line = by_path["/bad"]
    assert (bad_line["status"], bad_line["pool"], bad_line["backend"]) == (400, None, None)
    assert "Sec-WebSocket-Key" in bad_line["error"]


# --------------------------------------------------------------------------------------------
# admin endpoints


def admin_yaml(backend_port: int, extra: str = "") -> str:
    return proxy_yaml([backend_port], extra="admin: {address: 127.0.0.1:0}\nheartbeat: {interval: off}\n" + extra)


async def test_readyz_flips_to_503_while_draining_and_healthz_stays_200(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, admin_yaml(backends[0].port, "shutdown: {drain_window: 2s, deadline: 5s}\n"))
    admin = proxy.server.admin_bound[1]
    assert (await http(admin, "/readyz"))[:1] == (200,)
    assert (await http(admin, "/healthz"))[0] == 200
    client = await RawClient.connect(proxy.port(), "/held")  # keeps the drain going until it answers
    assert client.accept is not None
    nursery.start_soon(proxy.server.shutdown)
    with trio.fail_after(2):
        while not proxy.server.draining:
            await trio.sleep(0.01)
    status, _, body = await http(admin, "/readyz")
    assert (status, body) == (503, b"draining\n")
    assert (await http(admin, "/healthz"))[0] == 200  # alive, just not taking new sessions
    status, _, body = await http(admin, "/status.json")
    assert status == 200 and json.loads(body)["draining"] is True
    with trio.fail_after(5):
        close = await client.wait_close()
    assert close.code == 1001


async def test_status_page_is_self_contained_and_json_lists_live_sessions(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, admin_yaml(backends[0].port))
    admin = proxy.server.admin_bound[1]
    small = await RawClient.connect(proxy.port(), "/small")
    big = await RawClient.connect(proxy.port(), "/big")
    await roundtrip(small, "x")
    await roundtrip(big, "y" * 100)
    assert status_of(await raw_http(proxy.port(), BAD_REQUEST)) == 400  # a logged warning for the page

    status, headers, page = await http(admin, "/status")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["content-security-policy"]
    html = page.decode()
    assert "status.json" in html and "setTimeout(refresh" in html  # it refreshes itself
    assert not re.search(r"(src|href)\s*=|https?://|@import", html), "the page must need nothing from elsewhere"
    assert "innerHTML" not in html  # data goes in through textContent only

    status, headers, body = await http(admin, "/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["sessions"]["active"] == 2
    assert [s["path"] for s in doc["top_sessions_by_bytes"]] == ["/big", "/small"]
    assert [s["path"] for s in doc["top_sessions_by_age"]] == ["/small", "/big"]  # oldest first
    top = doc["top_sessions_by_bytes"][0]
    assert top["bytes_from_client"] == client_frame(100) and top["bytes_from_backend"] == backend_frame(100)
    assert top["messages_to_backend"] == 1 and top["messages_to_client"] == 1
    [backend] = doc["pools"][0]["backends"]
    assert backend == {
        "name": f"127.0.0.1:{backends[0].port}",
        "health": backend["health"],
        "up": True,
        "weight": 1,
        "admin_state": "ready",
        "active_sessions": 2,
    }
    assert any("400" in e["message"] and e["level"] == "warning" for e in doc["recent_errors"])
    assert doc["config"]["sha256"] == proxy.config.digest
    for c in (small, big):
        await c.close()


async def test_admin_answers_bad_requests_with_the_right_status(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, admin_yaml(backends[0].port))
    admin = proxy.server.admin_bound[1]
    status, headers, _ = await http(admin, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await http(admin, "/nope"))[0] == 404
    status, headers, _ = await http(admin, "/")
    assert (status, headers["location"]) == (302, "/status")
    status, headers, body = await http(admin, "/healthz", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "3")
    assert (await http(admin, "/readyz?verbose=1"))[0] == 200  # the query is ignored
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_of(await raw_http(admin, huge)) == 431
    assert status_of(await raw_http(admin, b"NOT HTTP AT ALL\r\n\r\n")) == 400
    big_body = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000
    assert status_of(await raw_http(admin, big_body)) == 413
    # a client that sends nothing holds one connection slot, not the listener: others are answered
    with trio.fail_after(2):
        async with await trio.open_tcp_stream("127.0.0.1", admin):
            assert (await http(admin, "/healthz"))[0] == 200


async def test_admin_on_a_public_address_without_allow_remote_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "public.yaml"
    path.write_text(proxy_yaml([9], extra="admin: {address: 0.0.0.0:9900}\n"))
    proc = await trio.run_process(
        [sys.executable, "-m", "wsproxy", "check", "-c", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "admin.address: 0.0.0.0:9900 is not a loopback address" in proc.stderr.decode()
    assert "allow_remote: true" in proc.stderr.decode()


# --------------------------------------------------------------------------------------------
# heartbeat metrics (virtual time)

HB = "heartbeat: {interval: 20s, timeout: 10s, legs: both}\nadmin: {address: 127.0.0.1:0}\n"


async def test_heartbeat_metrics_count_pings_rtts_and_dead_peers(autojump_clock, nursery) -> None:
    backend = await TrioBackend().start(nursery)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=HB))
    admin = proxy.server.admin_bound[1]
    pair = await open_pair(nursery, proxy.port(), backend)
    await trio.sleep(65)  # pings at 20, 40, 60 s on each leg, all answered
    m = await scrape(admin)
    for leg, peer in (("client", pair.client), ("backend", pair.backend)):
        pings = [p for _, p in peer.pings if p.startswith(MARKER)]
        assert len(pings) == 3
        assert m.value("wsproxy_pings_sent_total", leg=leg) == 3
        assert m.value("wsproxy_pong_rtt_seconds_count", leg=leg) == 3
    assert m.total("wsproxy_dead_peers_total") == 0

    backend.configure["silent"] = True  # the next session's backend stops answering anything
    dead = await open_pair(nursery, proxy.port(), backend)
    with trio.fail_after(60):
        await dead.client.closed.wait()
    assert dead.client.close.code == 1011
    with trio.fail_after(10):
        while len(proxy.server.sessions) > 1:  # close codes count when the session has ended
            await trio.sleep(0.1)
    m = await scrape(admin)
    assert m.value("wsproxy_dead_peers_total", leg="backend") == 1
    assert m.value("wsproxy_dead_peers_total", leg="client") == 0
    assert m.value("wsproxy_close_codes_total", side="proxy", code="1011") == 1
    await pair.client.send(CloseConnection(code=1000))


# --------------------------------------------------------------------------------------------
# backpressure (real clock, raw frames)

SLOW = "limits: {slow_consumer_timeout: 1s}\ntimeouts: {close: 2s}\nheartbeat: {interval: off}\n"


async def test_slow_consumer_drop_and_stalled_sends_are_counted(nursery) -> None:
    sent_all = trio.Event()

    async def burst(wire: Wire) -> None:
        chunk = os.urandom(BLOCK)
        for _ in range(64):  # 4 MiB: more than the sockets between here and a stalled reader hold
            await wire.send(BINARY, chunk)
        sent_all.set()
        await wire.wait_close()

    backend = await RawBackend({"/flood": endless_flood, "/burst": burst}).start(nursery)
    extra = SLOW.replace("1s}", "3s}") + "admin: {address: 127.0.0.1:0}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], extra=extra))
    admin = proxy.server.admin_bound[1]

    # a client that pauses 1 s and then reads everything: sends to it stall, nobody is dropped
    paused = await connect_client(proxy.port(), "/burst", rcvbuf=4096)
    await trio.sleep(1.0)
    got = 0
    with trio.fail_after(10):
        while got < 64 * BLOCK:
            message = await paused.message()
            assert isinstance(message, bytes)
            got += len(message)
    m = await scrape(admin)
    assert m.value("wsproxy_backpressure_events_total", side="client", event="send_stalled") >= 1
    assert m.total("wsproxy_backpressure_events_total", event="slow_consumer_closed") == 0

    # a client that never reads: dropped once after 3 s
    stalled = await connect_client(proxy.port(), "/flood", rcvbuf=4096)
    with trio.fail_after(10):
        while not (await scrape(admin)).total("wsproxy_backpressure_events_total", event="slow_consumer_closed"):
            await trio.sleep(0.2)
    m = await scrape(admin)
    assert m.value("wsproxy_backpressure_events_total", side="client", event="slow_consumer_closed") == 1
    with trio.fail_after(5):
        await stalled.until_eof()  # the proxy closed the stalled client's socket
        while len(proxy.server.sessions) > 1:  # and the backend finished its closing handshake
            await trio.sleep(0.05)
    m = await scrape(admin)
    # the proxy's close: 1008 to the slow client (after its frame in flight); the backend got 1001
    assert m.value("wsproxy_close_codes_total", side="proxy", code="1008") == 1
    assert m.value("wsproxy_sessions_closed_total", first_closer="proxy") == 1


# --------------------------------------------------------------------------------------------
# `wsproxy run` with log.format json: every stderr line is one JSON object


def test_run_with_json_log_writes_json_lines_and_a_session_line(tmp_path: Path, backends) -> None:
    from websockets.sync.client import connect

    backends.append(start_backend())
    path = tmp_path / "json.yaml"
    path.write_text(
        proxy_yaml([backends[0].port], extra="log: {format: json, level: info}\nadmin: {address: 127.0.0.1:0}\n")
    )
    proc = ProxyProcess(path)
    try:
        port = proc.wait_ready()
        with connect(f"ws://127.0.0.1:{port}/json-log", proxy=None, open_timeout=5, close_timeout=5) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
        for _ in range(50):  # the session line follows the close within milliseconds
            if any('"event": "session"' in line for line in proc.lines):
                break
            time.sleep(0.1)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=10) == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(timeout=10)
    records = [json.loads(line) for line in proc.lines if line.strip()]
    assert records, "no log output"
    assert all({"time", "level", "logger"} <= r.keys() for r in records)
    assert any(r.get("message", "").startswith("admin: serving http://127.0.0.1:") for r in records)
    [session] = [r for r in records if r.get("event") == "session"]
    assert (session["path"], session["status"], session["messages_to_backend"]) == ("/json-log", 101, 1)
    assert session["client_close"]["code"] == 1000 and session["first_closer"] == "client"


# --------------------------------------------------------------------------------------------
# a backend that crashes is the proxy's close


@pytest.mark.parametrize("relay", ["inspect", "passthrough"])
@pytest.mark.parametrize("how", [closes_tcp, resets_tcp], ids=["fin", "rst"])
async def test_backend_crash_is_logged_and_counted_as_the_proxys_1011(nursery, session_log, relay, how) -> None:
    backend = await start_raw_backend(nursery, after_first_frame(how))  # drops without a close frame
    yaml = proxy_yaml(
        [backend.port],
        extra="admin: {address: 127.0.0.1:0}\nheartbeat: {interval: off}\n",
        listener_extra=f"relay: {relay}",
    )
    proxy = await start_proxy(nursery, yaml)
    admin = proxy.server.admin_bound[1]
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="crash"))
        got = await client.wait_close()
        assert got.code == 1011
        while proxy.server.sessions:
            await trio.sleep(0.05)
    (line,) = session_log.sessions()
    assert line["proxy_close"] == {"code": 1011, "reason": "backend connection lost"}
    assert line["backend_close"]["code"] == 1006 and line["first_closer"] == "backend"
    m = await scrape(admin)
    assert m.value("wsproxy_close_codes_total", side="proxy", code="1011") == 1
