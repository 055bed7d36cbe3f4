"""TLS to backends: wss:// addresses and pools.NAME.tls (CA file or the system store, server
name, verification, mutual TLS), for Upgrades, plain HTTP requests and health checks. Backends
are real TLS servers with trustme certificates; nothing is mocked."""

from __future__ import annotations

import logging
import ssl

import pytest
import trio
from wsproto.events import TextMessage

from tests.http_backends import HttpBackend, start_http_backend
from tests.integration.test_http_proxy import Client
from tests.support import BackendTLSFiles, RawClient, make_backend_tls, proxy_yaml, start_backend, start_proxy
from wsproxy.config import ActiveHealth, Address, BackendTLS
from wsproxy.runtime.backend_tls import ClientTLS, client_context
from wsproxy.runtime.health_check import probe

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s}\n"


async def _echo_once(port: int, text: str = "over tls to the backend") -> RawClient:
    client = await RawClient.connect(port)
    assert client.accept is not None, client.reject
    await client.send(TextMessage(data=text))
    with trio.fail_after(5):
        assert await client.receive_message() == text
    return client


async def test_wss_backend_address_relays_with_the_pool_ca(nursery, backends, backend_tls: BackendTLSFiles) -> None:
    backends.append(start_backend(ssl=backend_tls.server_context()))
    yaml = (
        "listeners:\n  - {address: 127.0.0.1:0, pool: p}\n"
        f"pools:\n  p:\n    backends: [wss://127.0.0.1:{backends[0].port}]\n"
        f"    tls: {{ca: {backend_tls.ca_path}}}\n" + FAST
    )
    proxy = await start_proxy(nursery, yaml)
    client = await _echo_once(proxy.port())
    with trio.fail_after(3):
        assert (await client.close()).code == 1000


async def test_untrusted_backend_certificate_is_502(nursery, backends, backend_tls: BackendTLSFiles, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wsproxy")
    backends.append(start_backend(ssl=backend_tls.server_context()))
    yaml = (
        "listeners:\n  - {address: 127.0.0.1:0, pool: p}\n"
        f"pools:\n  p:\n    backends: [wss://127.0.0.1:{backends[0].port}]\n    retries: 0\n" + FAST
    )  # wss:// alone: the system's trust store, which does not know the test CA
    proxy = await start_proxy(nursery, yaml)
    client = await RawClient.connect(proxy.port())
    assert client.reject is not None and client.reject.status_code == 502
    assert client.reject_body == b"502 Bad Gateway\n"  # why, and which backend, go to the log only
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)
    assert backends[0].requests == []


async def test_server_name_is_what_sni_and_the_check_use(nursery, backends, tmp_path) -> None:
    named = make_backend_tls(tmp_path / "named", names=("backend.internal",))  # no IP in the certificate
    backends.append(start_backend(ssl=named.server_context()))
    by_address = proxy_yaml([backends[0].port], extra=FAST, pool_extra=named.pool_yaml() + "\nretries: 0")
    proxy = await start_proxy(nursery, by_address)
    refused = await RawClient.connect(proxy.port())
    assert refused.reject is not None and refused.reject.status_code == 502
    by_name = proxy_yaml(
        [backends[0].port], extra=FAST, pool_extra=named.pool_yaml(extra="server_name: backend.internal")
    )
    proxy2 = await start_proxy(nursery, by_name)
    await _echo_once(proxy2.port())


async def test_verify_false_connects_and_is_warned_at_start(nursery, backends, backend_tls, caplog) -> None:
    backends.append(start_backend(ssl=backend_tls.server_context()))
    caplog.set_level(logging.WARNING, logger="wsproxy")
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=FAST, pool_extra="tls: {verify: false}"))
    assert any("does not verify" in r.getMessage() and "pool p" in r.getMessage() for r in caplog.records)
    await _echo_once(proxy.port())


async def test_mutual_tls_backend_needs_the_pool_client_certificate(nursery, backends, backend_tls) -> None:
    backends.append(start_backend(ssl=backend_tls.server_context(require_client_cert=True)))
    with_cert = proxy_yaml([backends[0].port], extra=FAST, pool_extra=backend_tls.pool_yaml(client_cert=True))
    proxy = await start_proxy(nursery, with_cert)
    await _echo_once(proxy.port())
    without = proxy_yaml([backends[0].port], extra=FAST, pool_extra=backend_tls.pool_yaml() + "\nretries: 0")
    proxy2 = await start_proxy(nursery, without)
    client = await RawClient.connect(proxy2.port())
    assert client.reject is not None and client.reject.status_code == 502


@pytest.fixture
def http_backends():  # type: ignore[no-untyped-def]
    started: list[HttpBackend] = []
    yield started
    for b in started:
        b.stop()


async def test_plain_requests_reuse_tls_backend_connections(nursery, http_backends, backend_tls) -> None:
    http_backends.append(start_http_backend("tls1", ssl_context=backend_tls.server_context()))
    yaml = proxy_yaml([http_backends[0].port], extra=FAST, pool_extra=backend_tls.pool_yaml())
    proxy = await start_proxy(nursery, yaml)
    client = await Client.open(proxy.port())
    for i in range(4):
        resp, body = await client.request("POST", "/echo", f"body {i}".encode() * 1000)
        assert resp.status_code == 200 and body == f"body {i}".encode() * 1000
    await client.aclose()
    assert http_backends[0].connections == 1
    assert http_backends[0].seen[0].headers["X-Forwarded-Proto"] == "http"


@pytest.mark.parametrize("check", ["tcp", "http", "websocket"])
async def test_health_probes_speak_the_pool_tls(backends, backend_tls, check: str) -> None:
    backends.append(start_backend(ssl=backend_tls.server_context()))
    address = Address("127.0.0.1", backends[0].port)
    settings = ActiveHealth(check=check, timeout=2.0)
    trusted = ClientTLS(client_context(BackendTLS(ca=backend_tls.ca_path)), "127.0.0.1")
    if check == "http":  # websockets answers a plain GET with 426: a TLS-level pass is what is checked here
        reason = await probe(address, settings, trusted)
        assert reason is not None and "answered 426" in reason
    else:
        assert await probe(address, settings, trusted) is None
    untrusted = ClientTLS(client_context(BackendTLS()), "127.0.0.1")
    failed = await probe(address, settings, untrusted)
    assert failed is not None and "certificate verify failed" in failed
    if check != "tcp":  # the control: without TLS the backend's HTTP never answers
        assert await probe(address, settings) is not None


async def test_active_checks_mark_a_tls_backend_up_through_the_server(nursery, backends, backend_tls) -> None:
    backends.append(start_backend(ssl=backend_tls.server_context()))
    health = "health: {check: websocket, interval: 0.1s, rise: 1, fall: 1}"
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], extra=FAST, pool_extra=backend_tls.pool_yaml() + "\n" + health)
    )
    backend = proxy.server.snapshot.pools["p"].backends[0]
    with trio.fail_after(5):
        while backend.health.status(trio.current_time()) != "up":
            await trio.sleep(0.05)


def test_client_context_verifies_by_default() -> None:
    ctx = client_context(BackendTLS())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    off = client_context(BackendTLS(verify=False))
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
