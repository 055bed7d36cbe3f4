"""The auth subrequest's pure parts: what is sent, how answers map to client statuses, the cache key."""

from __future__ import annotations

import h11
import pytest

from wsproxy.config import AuthConfig
from wsproxy.protocol.handshake import ClientUpgrade, validate_client_request
from wsproxy.runtime.auth import AuthAnswer, build_check, cache_key, decide

SPEC = AuthConfig(
    url="http://auth.local:9100/check?realm=chat",
    host="auth.local",
    port=9100,
    target="/check?realm=chat",
    pass_headers=("authorization", "cookie"),
    copy_headers=("x-user-id", "x-roles"),
)


def upgrade(*extra: tuple[bytes, bytes]) -> ClientUpgrade:
    req = h11.Request(
        method=b"GET",
        target=b"/room/1?x=2",
        headers=[
            (b"Host", b"chat.example.com"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
            *extra,
        ],
    )
    checked = validate_client_request(req)
    assert isinstance(checked, ClientUpgrade)
    return checked


def test_check_request_carries_passed_headers_and_where_the_client_was_going():
    up = upgrade((b"Authorization", b"Bearer t"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"), (b"X-Other", b"no"))
    req = build_check(SPEC, up, client_ip="10.1.2.3", scheme="https")
    assert req.target == b"/check?realm=chat"
    got = [(bytes(k), bytes(v)) for k, v in req.headers.raw_items()]
    assert got == [
        (b"Host", b"auth.local:9100"),
        (b"Connection", b"close"),
        (b"X-Forwarded-For", b"10.1.2.3"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"chat.example.com"),
        (b"X-Forwarded-Uri", b"/room/1?x=2"),
        (b"X-Forwarded-Method", b"GET"),
        (b"Authorization", b"Bearer t"),
        (b"Cookie", b"a=1"),
        (b"Cookie", b"b=2"),
    ]


def test_the_cache_key_changes_with_anything_the_auth_service_sees():
    a = cache_key(build_check(SPEC, upgrade((b"Authorization", b"Bearer t")), client_ip="1.1.1.1", scheme="http"))
    same = cache_key(build_check(SPEC, upgrade((b"authorization", b"Bearer t")), client_ip="1.1.1.1", scheme="http"))
    other_token = cache_key(
        build_check(SPEC, upgrade((b"Authorization", b"Bearer u")), client_ip="1.1.1.1", scheme="http")
    )
    other_ip = cache_key(
        build_check(SPEC, upgrade((b"Authorization", b"Bearer t")), client_ip="2.2.2.2", scheme="http")
    )
    assert a == same  # header names compare without case
    assert len({a, other_token, other_ip}) == 3


def response(status: int, *headers: tuple[bytes, bytes]) -> h11.Response:
    return h11.Response(status_code=status, headers=list(headers))


def test_2xx_allows_and_copies_only_the_listed_headers():
    answer = decide(
        SPEC, response(204, (b"X-User-Id", b"42"), (b"X-Roles", b"a"), (b"X-Roles", b"b"), (b"X-Secret", b"s"))
    )
    assert answer.allowed and answer.rejection() is None
    assert answer.copy == ((b"X-User-Id", b"42"), (b"X-Roles", b"a"), (b"X-Roles", b"b"))


def test_401_passes_its_challenge_to_the_client():
    answer = decide(SPEC, response(401, (b"WWW-Authenticate", b'Bearer realm="chat"'), (b"X-User-Id", b"1")))
    rej = answer.rejection()
    assert rej is not None and rej.status == 401
    assert rej.headers == ((b"WWW-Authenticate", b'Bearer realm="chat"'),)


def test_403_is_403_without_headers():
    rej = decide(SPEC, response(403, (b"WWW-Authenticate", b"x"))).rejection()
    assert rej is not None and (rej.status, rej.headers) == (403, ())


@pytest.mark.parametrize("status", [301, 302, 400, 404, 429, 500, 502, 503])
def test_any_other_answer_fails_closed_with_503(status):
    rej = decide(SPEC, response(status)).rejection()
    assert rej is not None and rej.status == 503 and (b"Retry-After", b"1") in rej.headers


def test_no_answer_is_503():
    rej = AuthAnswer(False, 0, reason="timeout").rejection()
    assert rej is not None and rej.status == 503
