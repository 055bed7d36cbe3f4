"""The pure handshake core: validating a client's Upgrade, the upstream request, the backend's 101.

No sockets: h11 events in, decisions out. The RFC 6455 example vector pins accept_key.
"""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import backend_reads
from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.handshake import (
    BackendAccept,
    ClientUpgrade,
    Rejection,
    accept_key,
    build_client_101,
    build_upstream_request,
    check_backend_101,
    negotiate_client_deflate,
    passthrough_response_headers,
    validate_client_request,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

_VALID = [
    (b"Host", b"chat.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


def _req(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: bytes = b"GET",
    target: bytes = b"/chat",
    version: bytes = b"1.1",
    replace: dict[bytes, bytes | None] | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> h11.Request:
    base = list(_VALID if headers is None else headers)
    for name, value in (replace or {}).items():
        base = [(k, v) for k, v in base if k.lower() != name.lower()]
        if value is not None:
            base.append((name, value))
    return h11.Request(method=method, target=target, headers=base + (extra or []), http_version=version)


def _upgrade(**kwargs) -> ClientUpgrade:  # type: ignore[no-untyped-def]
    result = validate_client_request(_req(**kwargs))
    assert isinstance(result, ClientUpgrade), result
    return result


def _headers(req: h11.Request | h11.InformationalResponse) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in req.headers.raw_items()]


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


# --------------------------------------------------------------------------------------------
# accept_key


def test_accept_key_matches_rfc6455_example() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# --------------------------------------------------------------------------------------------
# validate_client_request


def test_valid_request_gives_client_upgrade_with_its_fields() -> None:
    up = _upgrade(
        target=b"/chat?room=1&room=2",
        extra=[
            (b"Sec-WebSocket-Protocol", b"chat.v2, Chat.V1"),
            (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits, x-other"),
        ],
    )
    assert up.target == b"/chat?room=1&room=2"
    assert up.path == "/chat"
    assert up.query == "room=1&room=2"
    assert up.host == b"chat.example.com"
    assert up.key == KEY
    assert up.subprotocols == ("chat.v2", "Chat.V1")
    assert up.extension_offers == ("permessage-deflate; client_max_window_bits", "x-other")


@pytest.mark.parametrize(
    "replace",
    [
        {b"Upgrade": b"WebSocket"},
        {b"Upgrade": b"websocket, foo/2"},
        {b"Connection": b"keep-alive, Upgrade"},
        {b"Connection": b"UPGRADE"},
        {b"Connection": b"upgrade,keep-alive"},
    ],
)
def test_token_lists_and_case_are_accepted(replace: dict[bytes, bytes]) -> None:
    assert isinstance(validate_client_request(_req(replace=replace)), ClientUpgrade)


def test_header_names_in_any_case_are_accepted() -> None:
    headers = [(k.lower(), v) for k, v in _VALID]
    assert isinstance(validate_client_request(_req(headers)), ClientUpgrade)


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"replace": {b"Sec-WebSocket-Key": None}}, 400),
        ({"replace": {b"Sec-WebSocket-Key": b"not base64 at all"}}, 400),
        ({"replace": {b"Sec-WebSocket-Key": base64.b64encode(b"x" * 15)}}, 400),
        ({"replace": {b"Sec-WebSocket-Key": base64.b64encode(b"x" * 17)}}, 400),
        ({"replace": {b"Sec-WebSocket-Key": KEY.rstrip(b"=")}}, 400),
        ({"extra": [(b"Sec-WebSocket-Key", base64.b64encode(b"y" * 16))]}, 400),
        ({"replace": {b"Upgrade": None}}, 400),
        ({"replace": {b"Upgrade": b"h2c"}}, 400),
        ({"replace": {b"Connection": b"keep-alive"}}, 400),
        ({"replace": {b"Connection": None}}, 400),
        ({"replace": {b"Host": b""}}, 400),
        ({"replace": {b"Host": None}, "version": b"1.0"}, 400),
        ({"method": b"POST"}, 400),
        ({"method": b"HEAD"}, 400),
        ({"version": b"1.0"}, 400),
        ({"extra": [(b"Content-Length", b"5")]}, 400),
        ({"extra": [(b"Transfer-Encoding", b"chunked")]}, 400),
        ({"replace": {b"Sec-WebSocket-Version": b"8"}}, 426),
        ({"replace": {b"Sec-WebSocket-Version": b"13, 8"}}, 426),
        ({"headers": [(b"Host", b"x")]}, 426),
        ({"headers": [(b"Host", b"x"), (b"Accept", b"text/html")], "method": b"POST"}, 426),
    ],
    ids=[
        "key-missing",
        "key-not-base64",
        "key-15-bytes",
        "key-17-bytes",
        "key-unpadded",
        "key-twice",
        "upgrade-missing",
        "upgrade-h2c",
        "connection-keep-alive",
        "connection-missing",
        "host-empty",
        "host-missing-http10",
        "post",
        "head",
        "http-1.0",
        "content-length-body",
        "chunked-body",
        "version-8",
        "version-list",
        "plain-get",
        "plain-post",
    ],
)
def test_bad_requests_get_their_status(kwargs: dict, status: int) -> None:  # type: ignore[type-arg]
    result = validate_client_request(_req(**kwargs))
    assert isinstance(result, Rejection), result
    assert result.status == status
    assert result.reason


def test_wrong_version_rejection_names_version_13() -> None:
    result = validate_client_request(_req(replace={b"Sec-WebSocket-Version": b"8"}))
    assert isinstance(result, Rejection)
    assert (b"sec-websocket-version", b"13") in [(k.lower(), v) for k, v in result.headers]
    assert b"Sec-WebSocket-Version: 13" in result.to_bytes() or b"sec-websocket-version: 13" in result.to_bytes()


def test_rejection_bytes_are_a_closing_http11_response_with_text_body() -> None:
    result = validate_client_request(_req(headers=[(b"Host", b"x")]))
    assert isinstance(result, Rejection)
    raw = result.to_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 426 ")
    assert b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert 0 < len(body) <= 300
    # h11 must be able to read it back as one complete response
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Response) and event.status_code == 426


# --------------------------------------------------------------------------------------------
# build_upstream_request


def _upstream(
    up: ClientUpgrade,
    *,
    client_ip: str = "127.0.0.1",
    scheme: str = "http",
    offer: str | None = None,
    key: bytes = b"AAAAAAAAAAAAAAAAAAAAAA==",
    origin: Origin | None = None,
) -> list[tuple[bytes, bytes]]:
    origin = origin or Origin.direct(client_ip)
    req = backend_reads(build_upstream_request(up, key=key, origin=origin, scheme=scheme, extension_offer=offer))
    assert req.method == b"GET"
    assert req.target == up.target
    return _headers(req)


def test_upstream_request_carries_the_normalised_target_and_end_to_end_headers() -> None:
    up = _upgrade(
        target=b"/a%62//c/./d/..?x=1&x=2&y=%20/../%2F",
        extra=[
            (b"Origin", b"https://app.example.com"),
            (b"Cookie", b"a=1; b=2"),
            (b"Authorization", b"Bearer t0k3n"),
            (b"X-Custom", b"Keep Me"),
        ],
    )
    req = backend_reads(
        build_upstream_request(
            up,
            key=b"AAAAAAAAAAAAAAAAAAAAAA==",
            origin=Origin.direct("127.0.0.1"),
            scheme="http",
            extension_offer=None,
        )
    )
    assert req.target == b"/ab/c/?x=1&x=2&y=%20/../%2F"  # the path normalised, the query as sent
    headers = _headers(req)
    for name, value in [
        (b"Host", b"chat.example.com"),
        (b"Origin", b"https://app.example.com"),
        (b"Cookie", b"a=1; b=2"),
        (b"Authorization", b"Bearer t0k3n"),
        (b"X-Custom", b"Keep Me"),
        (b"Sec-WebSocket-Version", b"13"),
    ]:
        assert (name, value) in headers, name


@pytest.mark.parametrize(
    "connection",
    [b"Upgrade, Host", b"upgrade,host", b"Upgrade, Sec-WebSocket-Version", b"Upgrade,  SEC-WEBSOCKET-KEY , x"],
)
def test_connection_listing_a_header_the_handshake_needs_is_400(connection: bytes) -> None:
    result = validate_client_request(_req(replace={b"Connection": connection}))
    assert isinstance(result, Rejection) and result.status == 400
    assert "Connection lists" in result.reason and "end to end" in result.reason


def test_connection_listing_upgrade_and_other_headers_is_a_valid_upgrade() -> None:
    result = validate_client_request(_req(replace={b"Connection": b"Upgrade, keep-alive, X-A"}))
    assert isinstance(result, ClientUpgrade)


def test_upstream_request_drops_hop_by_hop_and_connection_listed_headers() -> None:
    up = _upgrade(
        replace={b"Connection": b"keep-alive, Upgrade, X-Secret"},
        extra=[
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"X-Secret", b"s"),
            (b"X-Public", b"p"),
        ],
    )
    headers = _upstream(up)
    names = {k.lower() for k, _ in headers}
    for gone in (
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"x-secret",
    ):
        assert gone not in names, gone
    assert _values(headers, b"x-public") == [b"p"]
    assert _values(headers, b"connection") == [b"Upgrade"]
    assert [v.lower() for v in _values(headers, b"upgrade")] == [b"websocket"]


def test_upstream_request_uses_the_given_key_not_the_clients() -> None:
    fresh = base64.b64encode(b"0123456789abcdef")
    headers = _upstream(_upgrade(), key=fresh)
    assert _values(headers, b"sec-websocket-key") == [fresh]


def test_upstream_request_adds_forwarding_headers() -> None:
    headers = _upstream(_upgrade(), client_ip="10.0.0.7", scheme="https")
    assert _values(headers, b"x-forwarded-for") == [b"10.0.0.7"]
    assert _values(headers, b"x-forwarded-proto") == [b"https"]
    assert _values(headers, b"x-forwarded-host") == [b"chat.example.com"]
    (forwarded,) = _values(headers, b"forwarded")
    params = dict(p.split(b"=", 1) for p in forwarded.split(b";"))
    assert params[b"for"] == b"10.0.0.7"
    assert params[b"proto"] == b"https"


SPOOFING = [
    (b"X-Forwarded-For", b"6.6.6.6"),
    (b"Forwarded", b"for=192.0.2.60;proto=https"),
    (b"X-Real-IP", b"6.6.6.6"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"spoof.example"),
]


def test_forwarding_headers_from_an_untrusted_peer_are_replaced_by_the_proxys_own() -> None:
    headers = _upstream(_upgrade(extra=SPOOFING), client_ip="127.0.0.1", scheme="http")
    assert _values(headers, b"x-forwarded-for") == [b"127.0.0.1"]
    assert _values(headers, b"x-real-ip") == [b"127.0.0.1"]
    assert _values(headers, b"x-forwarded-proto") == [b"http"]
    assert _values(headers, b"x-forwarded-host") == [b"chat.example.com"]
    assert _values(headers, b"forwarded") == [b"for=127.0.0.1;proto=http;host=chat.example.com"]


def test_forwarding_headers_from_a_trusted_peer_are_kept_and_appended_to() -> None:
    origin = Origin(peer="10.0.0.2", client="6.6.6.6", trusted=True)
    headers = _upstream(_upgrade(extra=SPOOFING), origin=origin, scheme="http")
    assert _values(headers, b"x-forwarded-for") == [b"6.6.6.6, 10.0.0.2"]
    assert _values(headers, b"x-real-ip") == [b"6.6.6.6"]
    (forwarded,) = _values(headers, b"forwarded")
    assert forwarded == b"for=192.0.2.60;proto=https, for=10.0.0.2;proto=http;host=chat.example.com"


@pytest.mark.parametrize(
    ("host", "quoted"),
    [
        (b"x\\", b'host="x\\\\"'),
        (b'a"b', b'host="a\\"b"'),
        (b"chat.example.com:8080", b'host="chat.example.com:8080"'),
        (b"[::1]:8080", b'host="[::1]:8080"'),
    ],
)
def test_forwarded_host_is_a_quoted_string_with_escapes_when_not_a_token(host: bytes, quoted: bytes) -> None:
    headers = _upstream(_upgrade(replace={b"Host": host}))
    (forwarded,) = _values(headers, b"forwarded")
    assert forwarded.endswith(b";" + quoted)


def test_upstream_request_offers_only_the_proxys_extension() -> None:
    up = _upgrade(extra=[(b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits, x-made-up")])
    assert _values(_upstream(up, offer=None), b"sec-websocket-extensions") == []
    offered = _values(
        _upstream(up, offer="permessage-deflate; client_max_window_bits=15"),
        b"sec-websocket-extensions",
    )
    assert offered == [b"permessage-deflate; client_max_window_bits=15"]


def test_upstream_request_passes_subprotocol_offer() -> None:
    up = _upgrade(extra=[(b"Sec-WebSocket-Protocol", b"chat.v2, chat.v1")])
    assert _values(_upstream(up), b"sec-websocket-protocol") == [b"chat.v2, chat.v1"]


def test_upstream_request_is_a_head_h11_reads_as_a_backend_would() -> None:
    up = _upgrade(extra=[(b"X-Forwarded-For", b"1.2.3.4"), (b"Cookie", b"a=1")])
    wire = build_upstream_request(
        up,
        key=b"AAAAAAAAAAAAAAAAAAAAAA==",
        origin=Origin.direct("127.0.0.1"),
        scheme="http",
        extension_offer="permessage-deflate",
    )
    assert wire.startswith(b"GET /chat HTTP/1.1\r\n") and wire.endswith(b"\r\n\r\n")
    req = backend_reads(wire)
    assert (req.method, req.target) == (b"GET", b"/chat")
    assert (b"sec-websocket-extensions", b"permessage-deflate") in list(req.headers)


# --------------------------------------------------------------------------------------------
# check_backend_101


UP_KEY = b"AAAAAAAAAAAAAAAAAAAAAA=="


def _r101(
    *extra: tuple[bytes, bytes], accept: bytes | None = None, drop: tuple[bytes, ...] = ()
) -> h11.InformationalResponse:
    headers = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", accept if accept is not None else accept_key(UP_KEY)),
    ]
    headers = [(k, v) for k, v in headers if k.lower() not in drop]
    return h11.InformationalResponse(status_code=101, headers=headers + list(extra))


def _check(resp: h11.InformationalResponse, offered: tuple[str, ...] = (), ext: bool = False):  # type: ignore[no-untyped-def]
    return check_backend_101(resp, key=UP_KEY, offered_subprotocols=offered, offered_extensions=ext)


def test_valid_backend_101_is_accepted() -> None:
    result = _check(_r101())
    assert isinstance(result, BackendAccept)
    assert result.subprotocol is None
    assert result.extensions is None


def test_backend_101_tokens_are_case_insensitive() -> None:
    headers = [
        (b"upgrade", b"WebSocket"),
        (b"connection", b"keep-alive, UPGRADE"),
        (b"sec-websocket-accept", accept_key(UP_KEY)),
    ]
    resp = h11.InformationalResponse(status_code=101, headers=headers)
    assert isinstance(_check(resp), BackendAccept)


@pytest.mark.parametrize(
    "resp",
    [
        _r101(accept=accept_key(KEY)),
        _r101(accept=b"garbage"),
        _r101(drop=(b"sec-websocket-accept",)),
        _r101((b"Sec-WebSocket-Accept", accept_key(UP_KEY))),
        _r101(drop=(b"upgrade",)),
        _r101(drop=(b"connection",)),
    ],
    ids=[
        "accept-for-other-key",
        "accept-garbage",
        "accept-missing",
        "accept-twice",
        "upgrade-missing",
        "connection-missing",
    ],
)
def test_bad_backend_101_is_502(resp: h11.InformationalResponse) -> None:
    result = _check(resp)
    assert isinstance(result, Rejection)
    assert result.status == 502


def test_backend_subprotocol_choice_must_be_offered() -> None:
    ok = _check(_r101((b"Sec-WebSocket-Protocol", b"chat.v1")), offered=("chat.v2", "chat.v1"))
    assert isinstance(ok, BackendAccept) and ok.subprotocol == "chat.v1"
    for offered in [(), ("chat.v2",), ("CHAT.V1",)]:
        bad = _check(_r101((b"Sec-WebSocket-Protocol", b"chat.v1")), offered=offered)
        assert isinstance(bad, Rejection) and bad.status == 502, offered
    two = _check(_r101((b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2")), offered=("chat.v1", "chat.v2"))
    assert isinstance(two, Rejection) and two.status == 502


def test_backend_extension_without_offer_is_502() -> None:
    resp = _r101((b"Sec-WebSocket-Extensions", b"permessage-deflate"))
    bad = _check(resp, ext=False)
    assert isinstance(bad, Rejection) and bad.status == 502
    ok = _check(resp, ext=True)
    assert isinstance(ok, BackendAccept) and ok.extensions == "permessage-deflate"


def test_backend_101_passthrough_keeps_end_to_end_headers_only() -> None:
    resp = _r101(
        (b"Set-Cookie", b"sticky=1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Sec-WebSocket-Protocol", b"p"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
    )
    result = _check(resp, offered=("p",), ext=True)
    assert isinstance(result, BackendAccept)
    names = {k.lower() for k, _ in result.passthrough_headers}
    assert (b"Set-Cookie", b"sticky=1") in result.passthrough_headers
    for gone in (
        b"keep-alive",
        b"upgrade",
        b"connection",
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    ):
        assert gone not in names, gone


def test_client_101_carries_clients_accept_and_backends_choice() -> None:
    up = _upgrade(extra=[(b"Sec-WebSocket-Protocol", b"p, q")])
    accepted = _check(_r101((b"Sec-WebSocket-Protocol", b"q"), (b"Set-Cookie", b"s=1")), offered=up.subprotocols)
    assert isinstance(accepted, BackendAccept)
    reply = build_client_101(up, accepted, extensions=None)
    headers = _headers(reply)
    assert reply.status_code == 101
    assert _values(headers, b"sec-websocket-accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    assert _values(headers, b"sec-websocket-protocol") == [b"q"]
    assert _values(headers, b"sec-websocket-extensions") == []
    assert _values(headers, b"set-cookie") == [b"s=1"]


def test_passthrough_response_headers_drop_hop_by_hop_and_add_close() -> None:
    resp = h11.Response(
        status_code=401,
        headers=[
            (b"WWW-Authenticate", b"Bearer"),
            (b"Connection", b"X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=1"),
            (b"Content-Length", b"3"),
        ],
    )
    headers = passthrough_response_headers(resp)
    assert (b"WWW-Authenticate", b"Bearer") in headers
    assert (b"Content-Length", b"3") in headers
    names = [k.lower() for k, _ in headers]
    assert b"x-hop" not in names and b"keep-alive" not in names
    assert _values(headers, b"connection") == [b"close"]


# --------------------------------------------------------------------------------------------
# negotiate_client_deflate


def test_no_offer_means_no_extension() -> None:
    assert negotiate_client_deflate(()) == (None, None)
    assert negotiate_client_deflate(("x-webkit-deflate-frame",)) == (None, None)


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "PerMessage-Deflate",
        "permessage-deflate; server_no_context_takeover",
    ],
)
def test_deflate_offer_is_accepted(offer: str) -> None:
    ext, answer = negotiate_client_deflate((offer,))
    assert ext is not None
    assert answer is not None and answer.lower().startswith("permessage-deflate")


def test_deflate_answer_honours_client_requested_parameter() -> None:
    _, answer = negotiate_client_deflate(("permessage-deflate; server_no_context_takeover",))
    assert answer is not None and "server_no_context_takeover" in answer


def test_malformed_deflate_offer_falls_back_to_next() -> None:
    ext, answer = negotiate_client_deflate(
        (
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover",
        )
    )
    assert ext is not None
    assert answer == "permessage-deflate; server_no_context_takeover"


def test_client_max_window_bits_without_offer_is_not_in_answer() -> None:
    """RFC 7692 7.1.2.2: a server must not answer client_max_window_bits the client did not offer."""
    _, answer = negotiate_client_deflate(("permessage-deflate",))
    assert answer is not None and "client_max_window_bits" not in answer


# --------------------------------------------------------------------------------------------
# property: validate_client_request is total


_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NAMES = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Upgrade",
            b"Connection",
            b"Sec-WebSocket-Key",
            b"Sec-WebSocket-Version",
            b"Sec-WebSocket-Protocol",
            b"Sec-WebSocket-Extensions",
            b"connection",
            b"upgrade",
            b"Content-Length",
            b"Origin",
            b"Cookie",
        ]
    ),
    st.text(alphabet=_TCHAR, min_size=1, max_size=12).map(str.encode),
)
_VCHAR = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_FIELD = st.builds(
    lambda a, b: (a + b).strip().encode(),
    st.text(alphabet=_VCHAR, min_size=1, max_size=1),
    st.text(alphabet=st.one_of(_VCHAR, st.just(" "), st.just("\t")), max_size=30),
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            b"websocket",
            b"Upgrade",
            b"keep-alive, Upgrade",
            b"13",
            b"8",
            KEY,
            b"x",
            b"0",
            b"5",
            b"chunked",
            b"permessage-deflate",
            b"chat, superchat",
            b"WebSocket",
            b"upgrade,",
        ]
    ),
    _FIELD,
)


@settings(max_examples=400, deadline=None)
@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=12),
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get"]),
    version=st.sampled_from([b"1.1", b"1.0"]),
    target=st.sampled_from([b"/", b"/chat?x=1", b"*", b"/%00"]),
)
def test_validate_client_request_is_total(headers, method, version, target) -> None:  # type: ignore[no-untyped-def]
    try:
        req = h11.Request(method=method, target=target, headers=headers, http_version=version)
    except h11.LocalProtocolError:
        # h11 itself refuses this (no Host on 1.1, bad Content-Length...): the proxy never sees it
        with_host = [
            (b"Host", b"h"),
            *[(k, v) for k, v in headers if k.lower() not in (b"host", b"content-length", b"transfer-encoding")],
        ]
        req = h11.Request(method=method, target=target, headers=with_host, http_version=version)
    result = validate_client_request(req)
    assert isinstance(result, ClientUpgrade | Rejection)
    if isinstance(result, Rejection):
        assert result.status in (400, 426)
        result.to_bytes()
    else:
        assert method == b"GET" and version == b"1.1"
        assert len(base64.b64decode(result.key, validate=True)) == 16


def test_a_4xx_body_gives_its_reason_a_5xx_body_only_its_status_or_public_text() -> None:
    told = Rejection(400, "Sec-WebSocket-Key is bad").to_bytes()
    assert told.endswith(b"400 Bad Request: Sec-WebSocket-Key is bad\n")
    secret = Rejection(502, "127.0.0.1:9001: backend sent b'garbage'").to_bytes()
    assert secret.endswith(b"\r\n\r\n502 Bad Gateway\n") and b"9001" not in secret
    capped = Rejection(503, "pool p is full (3)", public="pool p is full").to_bytes()
    assert capped.endswith(b"503 Service Unavailable: pool p is full\n")
