"""Affinity cookies end to end (pools.NAME.sticky): plain requests and Upgrades carrying the
cookie reach the backend that set it, whatever the balance policy; a backend that is down,
ejected or removed loses its clients to a fresh choice and the cookie is rewritten."""

from __future__ import annotations

import pytest
import trio
from websockets.sync.server import ServerConnection

from tests.http_backends import HttpBackend, start_http_backend
from tests.integration.test_http_proxy import Client, header
from tests.support import RawClient, proxy_yaml, start_backend, start_proxy
from wsproxy.config import parse_config

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s, http_idle: 2s, http_response: 2s}\n"
STICKY = "sticky: {cookie: aff}"
POLICIES = {
    "round_robin": "",
    "least_conn": "balance: least_conn",
    "random_two": "balance: random_two",
    "consistent_hash": "balance: consistent_hash\nhash_key: header:x-user",
}


@pytest.fixture
def http_backends():  # type: ignore[no-untyped-def]
    started: list[HttpBackend] = []
    yield started
    for b in started:
        b.stop()


def cookie_of(resp) -> bytes:  # type: ignore[no-untyped-def]
    values = header(resp, b"set-cookie")
    assert len(values) == 1, values
    return values[0].split(b";")[0]  # "aff=VALUE"


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_cookie_keeps_requests_on_one_backend_with_every_policy(nursery, http_backends, policy) -> None:
    for i in range(3):
        http_backends.append(start_http_backend(f"b{i}"))
    pool_extra = STICKY + ("\n" + POLICIES[policy] if POLICIES[policy] else "")
    proxy = await start_proxy(nursery, proxy_yaml([b.port for b in http_backends], extra=FAST, pool_extra=pool_extra))
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id", headers="X-User: u0\r\n")
    first = body.split()[0]
    cookie = cookie_of(resp)
    assert b"127.0.0.1" not in cookie and str(http_backends[0].port).encode() not in cookie
    for i in range(1, 12):
        resp, body = await client.request("GET", "/id", headers=f"X-User: u{i}\r\nCookie: {cookie.decode()}\r\n")
        assert body.split()[0] == first
        assert not header(resp, b"set-cookie")  # a valid cookie is not set again
    await client.aclose()
    if policy == "round_robin":  # the control: without the cookie the same requests spread
        spread = set()
        for _ in range(6):
            c = await Client.open(proxy.port())
            spread.add((await c.request("GET", "/id"))[1].split()[0])
            await c.aclose()
        assert len(spread) == 3


async def test_cookie_of_a_stopped_backend_is_rebalanced_and_rewritten(nursery, http_backends) -> None:
    for i in range(2):
        http_backends.append(start_http_backend(f"b{i}"))
    extra = FAST
    proxy = await start_proxy(nursery, proxy_yaml([b.port for b in http_backends], extra=extra, pool_extra=STICKY))
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id")
    cookie, first = cookie_of(resp), body.split()[0].decode()
    await client.aclose()
    victim = next(b for b in http_backends if b.name == first)
    victim.stop()
    proxy.server.idle.close_all()  # its kept-alive connection dies with it
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id", headers=f"Cookie: {cookie.decode()}\r\n")
    assert resp.status_code == 200 and body.split()[0].decode() != first
    new_cookie = cookie_of(resp)
    assert new_cookie != cookie
    resp, body2 = await client.request("GET", "/id", headers=f"Cookie: {new_cookie.decode()}\r\n")
    assert body2.split()[0] == body.split()[0] and not header(resp, b"set-cookie")
    await client.aclose()


async def test_cookie_of_a_backend_removed_by_reload_is_rewritten(nursery, http_backends) -> None:
    for i in range(2):
        http_backends.append(start_http_backend(f"b{i}"))
    ports = [b.port for b in http_backends]
    proxy = await start_proxy(nursery, proxy_yaml(ports, extra=FAST, pool_extra=STICKY))
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id")
    cookie, first = cookie_of(resp), body.split()[0].decode()
    await client.aclose()
    kept = [b.port for b in http_backends if b.name != first]
    await proxy.server.reload(parse_config(proxy_yaml(kept, extra=FAST, pool_extra=STICKY), source="reload.yaml"))
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id", headers=f"Cookie: {cookie.decode()}\r\n")
    assert body.split()[0].decode() != first and cookie_of(resp) != cookie
    await client.aclose()


async def test_cookie_survives_a_reload_that_keeps_the_backend(nursery, http_backends) -> None:
    for i in range(3):
        http_backends.append(start_http_backend(f"b{i}"))
    ports = [b.port for b in http_backends]
    proxy = await start_proxy(nursery, proxy_yaml(ports, extra=FAST, pool_extra=STICKY))
    client = await Client.open(proxy.port())
    resp, body = await client.request("GET", "/id")
    cookie, first = cookie_of(resp), body.split()[0]
    await proxy.server.reload(parse_config(proxy_yaml(ports[::-1], extra=FAST, pool_extra=STICKY), source="r.yaml"))
    resp, body = await client.request("GET", "/id", headers=f"Cookie: {cookie.decode()}\r\n")
    assert body.split()[0] == first and not header(resp, b"set-cookie")
    await client.aclose()


def named(name: str):  # type: ignore[no-untyped-def]
    def handler(conn: ServerConnection) -> None:
        for _ in conn:
            conn.send(name)

    return handler


async def test_101_sets_the_cookie_and_upgrades_with_it_reach_the_same_backend(nursery, backends) -> None:
    for i in range(3):
        backends.append(start_backend(named(f"ws{i}")))
    proxy = await start_proxy(nursery, proxy_yaml([b.port for b in backends], extra=FAST, pool_extra=STICKY))
    first = await RawClient.connect(proxy.port(), "/")
    assert first.accept is not None
    cookies = [v for k, v in first.accept.extra_headers if k.lower() == b"set-cookie"]
    assert len(cookies) == 1 and cookies[0].startswith(b"aff=")
    from wsproto.events import TextMessage

    await first.send(TextMessage(data="who"))
    owner = await first.receive_message()
    cookie = cookies[0].split(b";")[0]
    for _ in range(5):
        c = await RawClient.connect(proxy.port(), "/", extra_headers=[(b"Cookie", cookie)])
        assert c.accept is not None and not [k for k, _ in c.accept.extra_headers if k.lower() == b"set-cookie"]
        await c.send(TextMessage(data="who"))
        assert await c.receive_message() == owner
        with trio.fail_after(3):
            await c.close()
