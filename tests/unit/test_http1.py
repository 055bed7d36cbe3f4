"""protocol/http1.py: a plain request goes through the same target normalisation and forwarding
rules as an Upgrade, and the proxy's own 5xx answers carry no detail."""

from __future__ import annotations

import h11

from wsproxy.protocol import http1
from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.handshake import ClientUpgrade, Rejection


def _plain(target: bytes, *extra: tuple[bytes, bytes]) -> ClientUpgrade | Rejection:
    return http1.plain_request(h11.Request(method=b"GET", target=target, headers=[(b"Host", b"app.test"), *extra]))


def test_plain_request_target_is_normalised_as_an_upgrades() -> None:
    got = _plain(b"//public/../%61dmin?x=%2F")
    assert isinstance(got, ClientUpgrade) and got.target == b"/admin?x=%2F" and got.path == "/admin"


def test_plain_request_with_a_target_that_cannot_be_normalised_is_400() -> None:
    for target in (b"/admin%2Fx", b"/../admin", b"http://evil.example/admin", b"*"):
        got = _plain(target)
        assert isinstance(got, Rejection) and got.status == 400, target


def _request(method: bytes, target: bytes) -> ClientUpgrade | Rejection:
    return http1.plain_request(h11.Request(method=method, target=target, headers=[(b"Host", b"app.test:443")]))


def test_options_asterisk_is_kept_as_asterisk_and_sent_on_so() -> None:
    got = _request(b"OPTIONS", b"*")
    assert isinstance(got, ClientUpgrade) and got.target == b"*" and got.path == "*"
    assert http1.backend_request(got, origin=Origin.direct("10.0.0.1"), scheme="http").target == b"*"


def test_connect_is_501() -> None:
    got = _request(b"CONNECT", b"app.test:443")
    assert isinstance(got, Rejection) and got.status == 501


def test_backend_request_replaces_an_untrusted_peers_forwarding_headers() -> None:
    got = _plain(b"/x", (b"X-Forwarded-For", b"6.6.6.6"), (b"X-Real-IP", b"6.6.6.6"))
    assert isinstance(got, ClientUpgrade)
    out = http1.backend_request(got, origin=Origin.direct("10.0.0.1"), scheme="http")
    headers = {k.lower(): v for k, v in out.headers}
    assert headers[b"x-forwarded-for"] == b"10.0.0.1" and headers[b"x-real-ip"] == b"10.0.0.1"
    assert headers[b"forwarded"] == b"for=10.0.0.1;proto=http;host=app.test"


def test_backend_request_appends_to_a_trusted_peers_chain() -> None:
    got = _plain(b"/x", (b"X-Forwarded-For", b"203.0.113.7"))
    assert isinstance(got, ClientUpgrade)
    origin = Origin(peer="10.0.0.1", client="203.0.113.7", trusted=True)
    headers = {k.lower(): v for k, v in http1.backend_request(got, origin=origin, scheme="https").headers}
    assert headers[b"x-forwarded-for"] == b"203.0.113.7, 10.0.0.1" and headers[b"x-real-ip"] == b"203.0.113.7"


def test_the_proxys_5xx_answer_names_no_backend_and_a_4xx_says_why() -> None:
    response, body = http1.rejection_response(Rejection(502, "10.1.2.3:9000: connection refused"), close=False)
    assert response.status_code == 502 and body == b"502 Bad Gateway\n"
    _, body = http1.rejection_response(Rejection(413, "request body over limits.max_body_bytes (10)"), close=True)
    assert body == b"413 Request Entity Too Large: request body over limits.max_body_bytes (10)\n"
