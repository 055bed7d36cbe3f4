"""Who a plain HTTP request is from (`listeners[].http: proxy`): the same trusted_proxies rule as
for Upgrades (protocol/forwarding.py), decided per request, since a trusted proxy in front may
send several clients' requests over one kept-alive connection.
"""

from __future__ import annotations

import pytest

from tests.http_backends import HttpBackend, start_http_backend
from tests.integration.test_http_proxy import FAST, Client
from tests.support import proxy_yaml, start_proxy

TRUST_LOOPBACK = 'trusted_proxies: ["127.0.0.1"]'  # the test client plays the trusted proxy


@pytest.fixture
def app():  # type: ignore[no-untyped-def]
    backend = start_http_backend("app")
    yield backend
    backend.stop()


async def test_forwarding_headers_of_an_untrusted_peer_are_replaced(nursery, app: HttpBackend) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=FAST))
    client = await Client.open(proxy.port())
    forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
    assert (await client.request("GET", "/", headers=forged))[0].status_code == 200
    seen = app.seen[-1].headers
    assert (seen["X-Forwarded-For"], seen["X-Real-IP"]) == ("127.0.0.1", "127.0.0.1")
    assert seen["Forwarded"] == "for=127.0.0.1;proto=http;host=app.test"
    await client.aclose()


async def test_each_request_from_a_trusted_proxy_speaks_for_its_own_client(nursery, app: HttpBackend) -> None:
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=FAST, listener_extra=TRUST_LOOPBACK))
    client = await Client.open(proxy.port())  # one kept-alive connection, two clients behind it
    for ip in ("203.0.113.7", "198.51.100.9"):
        headers = f"X-Forwarded-For: {ip}\r\nForwarded: for={ip}\r\n"
        assert (await client.request("GET", f"/from/{ip}", headers=headers))[0].status_code == 200
    first, second = (s.headers for s in app.seen[-2:])
    assert (first["X-Forwarded-For"], first["X-Real-IP"]) == ("203.0.113.7, 127.0.0.1", "203.0.113.7")
    assert (second["X-Forwarded-For"], second["X-Real-IP"]) == ("198.51.100.9, 127.0.0.1", "198.51.100.9")
    assert second["Forwarded"] == "for=198.51.100.9, for=127.0.0.1;proto=http;host=app.test"
    assert len({s.port for s in app.seen[-2:]}) == 1  # one backend connection carried both
    await client.aclose()


async def test_per_ip_rate_counts_the_client_behind_a_trusted_proxy(nursery, app: HttpBackend) -> None:
    limits = "rate_limits: {handshakes_per_ip: {rate: 1/m, burst: 1}}\n"
    proxy = await start_proxy(nursery, proxy_yaml([app.port], extra=FAST + limits, listener_extra=TRUST_LOOPBACK))
    statuses = []
    for ip in ("203.0.113.7", "198.51.100.9", "203.0.113.7"):  # one token per client, not per peer
        client = await Client.open(proxy.port())
        statuses.append((await client.request("GET", "/", headers=f"X-Forwarded-For: {ip}\r\n"))[0].status_code)
        await client.aclose()
    assert statuses == [200, 200, 429]
