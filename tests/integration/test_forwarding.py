"""Spoofed client addresses (issue 17): forwarding headers are believed only from trusted peers.

Through a real proxy: a client's own X-Forwarded-For / Forwarded / X-Real-IP never reach the
backend from an untrusted peer; behind `trusted_proxies` they are kept and appended to, and the
right-most untrusted address is the session's client for per-IP limits, `client_ip` hashing and
the session log. Other peer addresses come from 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback).
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.support import RawClient, proxy_yaml, start_backend, start_proxy

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\nheartbeat: {interval: off}\n"
SPOOF = [(b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"), (b"X-Real-IP", b"6.6.6.6")]


async def _seen(backend, count: int):  # type: ignore[no-untyped-def]
    with trio.fail_after(3):
        while len(backend.requests) < count:
            await trio.sleep(0.01)
    return backend.requests[count - 1].headers


async def test_untrusted_peers_forwarding_headers_are_replaced(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST))
    client = await RawClient.connect(proxy.port(), extra_headers=SPOOF)
    assert client.accept is not None
    headers = await _seen(backends[0], 1)
    assert headers.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.get_all("X-Real-IP") == ["127.0.0.1"]
    assert headers.get_all("Forwarded") == ["for=127.0.0.1;proto=http;host=127.0.0.1"]
    await client.close()


async def test_trusted_peer_chain_is_kept_and_its_client_counts_per_ip_and_in_the_log(
    nursery, backends, caplog: pytest.LogCaptureFixture
) -> None:
    backends.append(start_backend())
    yaml = proxy_yaml(
        [backends[0].port],
        extra=FAST + "rate_limits: {max_sessions_per_ip: 1}\n",
        listener_extra='trusted_proxies: ["127.0.0.1", "127.0.0.2/32", "10.0.0.0/8"]',
    )
    proxy = await start_proxy(nursery, yaml)
    chain = [(b"X-Forwarded-For", b"6.6.6.6, 1.2.3.4, 10.1.1.1"), (b"Forwarded", b"for=1.2.3.4")]
    first = await RawClient.connect(proxy.port(), extra_headers=chain)
    assert first.accept is not None
    headers = await _seen(backends[0], 1)
    assert headers.get_all("X-Forwarded-For") == ["6.6.6.6, 1.2.3.4, 10.1.1.1, 127.0.0.1"]
    assert headers.get_all("Forwarded")[0].startswith("for=1.2.3.4, for=127.0.0.1;")
    assert headers.get_all("X-Real-IP") == ["1.2.3.4"]
    # the same client through another trusted peer is the same address for max_sessions_per_ip
    again = await RawClient.connect(proxy.port(), local_address="127.0.0.2", extra_headers=chain)
    assert again.reject is not None and again.reject.status_code == 429
    # another client through the same peer is not
    other = await RawClient.connect(proxy.port(), extra_headers=[(b"X-Forwarded-For", b"5.5.5.5")])
    assert other.accept is not None
    # an untrusted peer cannot borrow an address: its own headers are dropped
    untrusted = await RawClient.connect(proxy.port(), local_address="127.0.0.3", extra_headers=chain)
    assert untrusted.accept is not None
    headers = await _seen(backends[0], 3)
    assert headers.get_all("X-Forwarded-For") == ["127.0.0.3"] and headers.get_all("X-Real-IP") == ["127.0.0.3"]
    with caplog.at_level(logging.INFO, logger="wsproxy.session"):
        for c in (first, other, untrusted):
            await c.close()
            await c.stream.aclose()
        with trio.fail_after(3):
            while proxy.server.sessions:
                await trio.sleep(0.01)
    clients = sorted(r.session["client"].rsplit(":", 1)[0] for r in caplog.records if hasattr(r, "session"))
    assert clients == ["1.2.3.4", "127.0.0.3", "5.5.5.5"]


async def test_client_ip_hashing_follows_the_forwarded_client_not_the_peer(nursery, backends) -> None:
    backends += [start_backend(), start_backend()]
    yaml = proxy_yaml(
        [b.port for b in backends],
        extra=FAST,
        listener_extra='trusted_proxies: ["127.0.0.0/8"]',
        pool_extra="balance: consistent_hash\nhash_key: client_ip",
    )
    proxy = await start_proxy(nursery, yaml)
    for n in range(8):
        landed = []
        for peer in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            before = [len(b.requests) for b in backends]
            c = await RawClient.connect(
                proxy.port(), local_address=peer, extra_headers=[(b"X-Forwarded-For", f"198.51.100.{n}".encode())]
            )
            assert c.accept is not None
            with trio.fail_after(3):
                while [len(b.requests) for b in backends] == before:
                    await trio.sleep(0.01)
            landed += [i for i, b in enumerate(backends) if len(b.requests) != before[i]]
            await c.close()
        assert len(set(landed)) == 1, (n, landed)
