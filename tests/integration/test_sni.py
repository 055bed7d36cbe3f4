"""Several certificates on one listener (listeners[].tls.certs): SNI picks each name its own,
the first answers otherwise, and a reload re-reads the files for new connections while open
sessions go on. Clients verify against the test CA, so a pass means a real client would accept."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
import trustme
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.support import RawClient, start_backend, start_proxy
from wsproxy.config import parse_config


def _issue(ca: trustme.CA, directory: Path, stem: str, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    return cert, key


def _yaml(port: int, pairs: list[tuple[Path, Path]]) -> str:
    certs = ", ".join(f"{{cert: {c}, key: {k}}}" for c, k in pairs)
    return (
        f"listeners:\n  - {{address: 127.0.0.1:0, pool: p, tls: {{certs: [{certs}]}}}}\n"
        f"pools:\n  p:\n    backends: [127.0.0.1:{port}]\n"
        "timeouts: {handshake: 2s, connect: 1s, close: 0.5s}\n"
    )


async def _served_cert(port: int, ca: trustme.CA, server_name: str | None) -> dict:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if server_name is None:
        ctx.check_hostname = False  # no SNI: look at what the default certificate is
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_name)
    with trio.fail_after(3):
        await stream.do_handshake()
    cert = stream.getpeercert()
    await trio.aclose_forcefully(stream)
    return cert


def _dns(cert: dict) -> set[str]:
    return {v for k, v in cert["subjectAltName"] if k == "DNS"}


async def test_each_name_gets_its_own_certificate_and_the_first_is_the_default(nursery, backends, tmp_path) -> None:
    backends.append(start_backend())
    ca = trustme.CA()
    first = _issue(ca, tmp_path, "a", "a.example.test")
    second = _issue(ca, tmp_path, "b", "*.b.example.test")
    proxy = await start_proxy(nursery, _yaml(backends[0].port, [first, second]))
    port = proxy.port()
    assert _dns(await _served_cert(port, ca, "a.example.test")) == {"a.example.test"}
    assert _dns(await _served_cert(port, ca, "chat.b.example.test")) == {"*.b.example.test"}
    assert _dns(await _served_cert(port, ca, None)) == {"a.example.test"}
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="other.test")  # no certificate for it: the default
    with trio.fail_after(3):
        try:
            await stream.do_handshake()
            raise AssertionError("a certificate for other.test was served")
        except trio.BrokenResourceError as exc:
            assert isinstance(exc.__cause__, ssl.SSLCertVerificationError)
    ws = await _ws_through(port, ca, "x.b.example.test")
    await ws.send(TextMessage(data="sni"))
    assert await ws.receive_message() == "sni"


async def _ws_through(port: int, ca: trustme.CA, name: str) -> RawClient:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=name)
    client = RawClient(stream)
    await stream.send_all(client.ws.send(Request(host=name, target="/")))
    with trio.fail_after(5):
        while client.accept is None:
            ev = await client.next_event()
            if isinstance(ev, AcceptConnection):
                client.accept = ev
    return client


async def test_reload_serves_renewed_certificates_to_new_connections_only(nursery, backends, tmp_path) -> None:
    backends.append(start_backend())
    ca = trustme.CA()
    first = _issue(ca, tmp_path, "a", "a.example.test")
    second = _issue(ca, tmp_path, "b", "b.example.test")
    yaml = _yaml(backends[0].port, [first, second])
    proxy = await start_proxy(nursery, yaml)
    port = proxy.port()
    before = await _served_cert(port, ca, "b.example.test")
    open_session = await _ws_through(port, ca, "b.example.test")
    _issue(ca, tmp_path, "b", "b.example.test", "www.b.example.test")  # renewed in place, one name more
    await proxy.server.reload(parse_config(yaml, source="renewed.yaml"))
    after = await _served_cert(port, ca, "b.example.test")
    assert after["serialNumber"] != before["serialNumber"]
    assert _dns(after) == {"b.example.test", "www.b.example.test"}
    await open_session.send(TextMessage(data="still here"))  # the session opened before goes on
    with trio.fail_after(3):
        assert await open_session.receive_message() == "still here"
