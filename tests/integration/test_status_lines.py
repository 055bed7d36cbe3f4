"""Every status line the proxy and its admin listener write carries its standard reason phrase.

`HTTP/1.1 501 ` (an empty phrase) is legal but tells an operator reading a capture nothing, and
some clients show it as is; the proxy's own answers and every admin answer name their status.
"""

from __future__ import annotations

import re

import pytest

from tests.support import proxy_yaml, raw_http, start_backend, start_proxy
from wsproxy.protocol.handshake import Rejection

STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([^\r\n]+)\r\n")


@pytest.mark.parametrize(
    ("status", "phrase"), [(400, b"Bad Request"), (421, b"Misdirected Request"), (501, b"Not Implemented")]
)
def test_rejections_carry_the_standard_phrase(status: int, phrase: bytes) -> None:
    assert Rejection(status, "x").to_bytes().startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))


async def test_proxy_answers_501_with_its_phrase(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port]))
    answer = await raw_http(proxy.port(), b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 Not Implemented\r\n")


@pytest.mark.parametrize(
    ("request_line", "status", "phrase"),
    [
        (b"GET /healthz", 200, b"OK"),
        (b"GET /", 302, b"Found"),
        (b"GET /nope", 404, b"Not Found"),
        (b"POST /metrics", 405, b"Method Not Allowed"),
    ],
)
async def test_admin_status_lines_carry_the_standard_phrase(
    nursery, backends, request_line: bytes, status: int, phrase: bytes
) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra="admin: {address: 127.0.0.1:0}\n"))
    admin = proxy.server.admin_bound[1]
    answer = await raw_http(admin, request_line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    m = STATUS_LINE.match(answer)
    assert m is not None and (int(m.group(1)), m.group(2)) == (status, phrase), answer[:80]
