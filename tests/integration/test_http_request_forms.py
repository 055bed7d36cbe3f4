"""The request-target forms of RFC 9112 section 3.2 on a plain HTTP listener (`http: proxy`):
asterisk-form (`OPTIONS *`) goes to the pool serving the Host and reaches it as `OPTIONS *`;
absolute-form is accepted and sent on in origin-form after its authority is checked against
Host; authority-form (CONNECT) is a clear 501, the proxy tunnels nothing. And the one framing
case RFC 9112 section 6.3 leaves to the recipient: identical duplicate Content-Lengths.
"""

from __future__ import annotations

import h11
import pytest

from tests.http_backends import HttpBackend, start_http_backend
from tests.integration.test_http_proxy import FAST, Client
from tests.support import raw_http, start_proxy, status_of


@pytest.fixture
def apps():  # type: ignore[no-untyped-def]
    started = {name: start_http_backend(name) for name in ("api", "www", "dflt")}
    yield started
    for b in started.values():
        b.stop()


async def _ask(client: Client, method: str, target: str, host: str) -> tuple[h11.Response, bytes]:
    """One bodyless request with this exact target and Host on a kept-alive connection."""
    request = h11.Request(method=method, target=target, headers=[("Host", host)])
    await client.send(client.h.send(request) + client.h.send(h11.EndOfMessage()))
    return await client.response()


def _routed(apps: dict[str, HttpBackend], *, default: bool = True) -> str:
    """A listener whose routes split by host, and by path under one host."""
    routes = [
        "      - {match: {host: api.test, path_prefix: /v1}, pool: api}",
        "      - {match: {host: www.test}, pool: www}",
    ]
    if default:
        routes.append("      - {pool: dflt}")
    lines = ["listeners:", "  - address: 127.0.0.1:0", "    routes:", *routes, "pools:"]
    for name, b in apps.items():
        lines += [f"  {name}:", "    backends:", f"      - address: 127.0.0.1:{b.port}"]
    return "\n".join(lines) + "\n" + FAST


async def test_options_asterisk_goes_to_the_pool_of_its_host_as_asterisk(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    client = await Client.open(proxy.port())
    resp, body = await _ask(client, "OPTIONS", "*", "www.test")
    assert resp.status_code == 200 and body == b"www OPTIONS *"
    resp, body = await _ask(client, "OPTIONS", "*", "api.test")  # the host's one route is for a path
    assert resp.status_code == 200 and body == b"api OPTIONS *"
    resp, body = await _ask(client, "OPTIONS", "*", "other.test")
    assert resp.status_code == 200 and body == b"dflt OPTIONS *"
    await client.aclose()
    assert [s.path for s in apps["www"].seen] == ["*"]


async def test_options_asterisk_without_a_route_for_its_host_is_404(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps, default=False))
    answer = await raw_http(proxy.port(), b"OPTIONS * HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 404


async def test_asterisk_form_with_another_method_is_400(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    answer = await raw_http(proxy.port(), b"GET * HTTP/1.1\r\nHost: www.test\r\n\r\n")
    assert status_of(answer) == 400
    assert all(not b.seen for b in apps.values())


async def test_absolute_form_reaches_the_backend_in_origin_form(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    client = await Client.open(proxy.port())
    resp, body = await _ask(client, "GET", "http://WWW.test:80/a/../id?q=1", "www.test")
    assert resp.status_code == 200 and body == b"www GET /id?q=1"
    await client.aclose()
    assert apps["www"].seen[0].headers["Host"] == "www.test"


async def test_absolute_form_naming_another_authority_than_host_is_400(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    answer = await raw_http(proxy.port(), b"GET http://api.test/v1/x HTTP/1.1\r\nHost: www.test\r\n\r\n")
    assert status_of(answer) == 400
    assert all(not b.seen for b in apps.values())


async def test_connect_is_501_and_nothing_is_tunnelled(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    answer = await raw_http(
        proxy.port(), b"CONNECT www.test:443 HTTP/1.1\r\nHost: www.test:443\r\n\r\nGET /x HTTP/1.1\r\n"
    )
    assert status_of(answer) == 501
    assert answer.count(b"HTTP/1.1 ") == 1  # and the connection closed
    assert all(not b.seen for b in apps.values())


async def test_identical_duplicate_content_lengths_are_one_length(nursery, apps) -> None:
    proxy = await start_proxy(nursery, _routed(apps))
    answer = await raw_http(
        proxy.port(),
        b"POST /echo HTTP/1.1\r\nHost: www.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /id HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n",  # in step: nothing left over
    )
    assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 200 ") == 2
    assert [s.path for s in apps["www"].seen] == ["/echo", "/id"]
    seen = apps["www"].seen[0]
    assert seen.body == b"hello" and [v for k, v in seen.header_lines if k.lower() == "content-length"] == ["5"]
