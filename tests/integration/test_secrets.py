"""Secrets never reach logs or pages (issue 17): query redaction, error bodies, the admin Host check.

Browsers cannot set headers on a WebSocket, so tokens travel in the query string. With the
default `log.query: redact` a token reaches the backend but appears in no log line (text or
JSON), no /status.json and no recent-errors entry; `keep` and `drop` do what they say.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import trio

from tests.integration.test_observability import http
from tests.support import RawClient, free_port, proxy_yaml, raw_http, start_backend, start_proxy, status_of
from wsproxy.observe.session_log import TEXT_FORMAT, JsonFormatter
from wsproxy.observe.status import STATUS_HTML

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: off}\n"
ADMIN = "admin: {address: 127.0.0.1:0}\n"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class BothFormats(logging.Handler):
    """Every wsproxy record as the text format and as the JSON format would write it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.text, self.json = logging.Formatter(TEXT_FORMAT), JsonFormatter()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += [self.text.format(record), self.json.format(record)]


@pytest.fixture
def logged() -> Iterator[BothFormats]:
    capture = BothFormats()
    logger = logging.getLogger("wsproxy")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old)


async def _session_with_token(nursery, backends, logged: BothFormats, query_mode: str | None):  # type: ignore[no-untyped-def]
    backends.append(start_backend())
    extra = FAST + ADMIN + (f"log: {{query: {query_mode}}}\n" if query_mode else "")
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=extra))
    admin = proxy.server.admin_bound[1]
    client = await RawClient.connect(proxy.port(), "/chat?token=SECRET&room=7&flag")
    assert client.accept is not None
    assert backends[0].requests[0].path == "/chat?token=SECRET&room=7&flag"  # the backend gets it all
    # a refused request with a token in its query: a warning, shown in the recent errors
    refused = b"GET /a%2Fb?token=SECRET HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    refused += b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    assert status_of(await raw_http(proxy.port(), refused)) == 400
    _, _, status_json = await http(admin, "/status.json")
    _, _, page = await http(admin, "/status")
    await client.close()
    await client.stream.aclose()
    with trio.fail_after(3):
        while proxy.server.sessions:
            await trio.sleep(0.01)
    sessions = [json.loads(line) for line in logged.lines if line.startswith("{") and '"event": "session"' in line]
    return status_json.decode() + page.decode(), sessions


async def test_query_values_are_redacted_in_logs_and_pages_by_default(nursery, backends, logged) -> None:
    pages, sessions = await _session_with_token(nursery, backends, logged, None)
    everything = "\n".join([*logged.lines, pages])
    assert "SECRET" not in everything
    assert "/chat?token=***&room=***&***" in everything
    assert {s["path"] for s in sessions} == {"/chat?token=***&room=***&***", "/a%2Fb?token=***"}
    assert any("session client=" in line and "path=/chat?token=***&room=***&***" in line for line in logged.lines)
    assert "/chat?token=***&room=***&***" in pages  # the live session in /status.json


async def test_log_query_drop_removes_the_query(nursery, backends, logged) -> None:
    pages, sessions = await _session_with_token(nursery, backends, logged, "drop")
    # /status is a fixed page (its script takes an admin token from the address's fragment for
    # its buttons); what it shows comes from /status.json, where no query name may remain
    shown = pages.replace(STATUS_HTML, "")
    assert "SECRET" not in "\n".join([*logged.lines, pages]) and "token" not in shown
    assert {s["path"] for s in sessions} == {"/chat", "/a%2Fb"}


async def test_log_query_keep_shows_the_query(nursery, backends, logged) -> None:
    _, sessions = await _session_with_token(nursery, backends, logged, "keep")
    assert "/chat?token=SECRET&room=7&flag" in {s["path"] for s in sessions}


# --- error bodies -------------------------------------------------------------------------------

MALFORMED = b"HTTP/1.1 20x LEAKED-BACKEND-BYTES\r\nX-Internal: 10.9.8.7\r\n\r\n"


async def _garbage_backend(nursery, answer: bytes) -> int:  # type: ignore[no-untyped-def]
    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            await stream.receive_some(65536)
            if answer:
                await stream.send_all(answer)
            await trio.sleep(5)  # no answer at all: the handshake deadline passes first

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return listeners[0].socket.getsockname()[1]


def _upgrade_request() -> bytes:
    return (
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


@pytest.mark.parametrize(("answer", "status"), [(MALFORMED, 502), (b"", 504)])
async def test_backend_failures_tell_the_client_only_the_status(nursery, logged, answer: bytes, status: int) -> None:
    port = await _garbage_backend(nursery, answer)
    yaml = proxy_yaml([port], extra="timeouts: {handshake: 0.5s, connect: 0.5s}\n", pool_extra="retries: 0")
    proxy = await start_proxy(nursery, yaml)
    got = await raw_http(proxy.port(), _upgrade_request())
    assert status_of(got) == status
    body = got.split(b"\r\n\r\n", 1)[1]
    assert str(port).encode() not in got and b"LEAKED" not in got and b"10.9.8.7" not in got
    assert body.startswith(b"%d " % status) and len(body) < 40
    assert any(f"127.0.0.1:{port}" in line for line in logged.lines)  # the detail goes to the log
    if answer:
        assert any("LEAKED-BACKEND-BYTES" in line for line in logged.lines)


async def test_connect_failure_and_auth_failure_bodies_name_no_address(nursery, logged) -> None:
    dead = free_port()
    proxy = await start_proxy(nursery, proxy_yaml([dead], extra=FAST, pool_extra="retries: 0"))
    got = await raw_http(proxy.port(), _upgrade_request())
    assert status_of(got) == 502 and str(dead).encode() not in got
    auth_port = free_port()
    listener = f"auth: {{url: 'http://127.0.0.1:{auth_port}/check', timeout: 0.5s}}"
    proxy = await start_proxy(nursery, proxy_yaml([dead], extra=FAST, listener_extra=listener))
    got = await raw_http(proxy.port(), _upgrade_request())
    assert status_of(got) == 503 and str(auth_port).encode() not in got and b"auth" not in got
    assert any(str(auth_port) in line for line in logged.lines)


# --- the admin listener's Host check (DNS rebinding) ---------------------------------------------


async def _admin_status(port: int, host: bytes | None, path: bytes = b"/status.json", version: bytes = b"1.1") -> int:
    head = b"GET " + path + b" HTTP/" + version + b"\r\n" + (b"Host: " + host + b"\r\n" if host is not None else b"")
    return status_of(await raw_http(port, head + b"\r\n"))


async def test_admin_refuses_a_dns_rebinding_host_with_421(nursery, backends, logged) -> None:
    backends.append(start_backend())
    extra = "admin: {address: 127.0.0.1:0, hosts: [metrics.internal]}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=extra))
    admin = proxy.server.admin_bound[1]
    for evil in (b"evil.example", b"evil.example:%d" % admin, b"127.0.0.1.evil.example", b"localhost.evil"):
        assert await _admin_status(admin, evil) == 421, evil
        assert await _admin_status(admin, evil, b"/metrics") == 421, evil
    assert any("refused a request for Host 'evil.example'" in line for line in logged.lines)
    for good in (b"127.0.0.1", b"127.0.0.1:%d" % admin, b"localhost:%d" % admin, b"LocalHost", b"metrics.internal:1"):
        assert await _admin_status(admin, good) == 200, good
    assert await _admin_status(admin, None, version=b"1.0") == 200  # no Host: not a browser
