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
from tests.support import RawClient, proxy_yaml, raw_http, start_backend, start_proxy, status_of
from wsproxy.observe.session_log import TEXT_FORMAT, JsonFormatter

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
    assert "SECRET" not in "\n".join([*logged.lines, pages]) and "token" not in pages
    assert {s["path"] for s in sessions} == {"/chat", "/a%2Fb"}


async def test_log_query_keep_shows_the_query(nursery, backends, logged) -> None:
    _, sessions = await _session_with_token(nursery, backends, logged, "keep")
    assert "/chat?token=SECRET&room=7&flag" in {s["path"] for s in sessions}
