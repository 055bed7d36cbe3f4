"""Routing a request to a pool and extracting the hash key."""

from __future__ import annotations

import pytest

from wsproxy.config import Address, HashKey, ListenerConfig, Route, RouteMatch, parse_config
from wsproxy.policy.routing import extract_hash_key, host_name, select_pool
from wsproxy.protocol.handshake import ClientUpgrade


def listener(*routes: Route, pool: str | None = None) -> ListenerConfig:
    return ListenerConfig(address=Address("127.0.0.1", 8080), pool=pool, routes=routes, tls=None, deflate=True)


def route(pool: str, host: str | None = None, path_prefix: str | None = None) -> Route:
    if host is None and path_prefix is None:
        return Route(pool=pool)
    return Route(pool=pool, match=RouteMatch(host=host, path_prefix=path_prefix))


def upgrade(target: bytes = b"/", headers: list[tuple[bytes, bytes]] | None = None) -> ClientUpgrade:
    raw = [(b"Host", b"example.com"), *(headers or [])]
    return ClientUpgrade(
        target=target,
        host=b"example.com",
        key=b"dGhlIHNhbXBsZSBub25jZQ==",
        subprotocols=(),
        extension_offers=(),
        raw_headers=tuple(raw),
    )


# --- select_pool ---------------------------------------------------------------------------


def test_listener_pool_wins_over_everything() -> None:
    lst = listener(pool="only")
    assert select_pool(lst, b"anything.example:1", "/whatever") == "only"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"chat.example.com", "chat"),
        (b"chat.example.com:8080", "chat"),
        (b"CHAT.Example.COM", "chat"),
        (b"Chat.Example.Com:443", "chat"),
        (b"chat.example.com.", "chat"),  # fully qualified form
        (b"other.example.com", None),
        (b"chat.example.com.evil.net", None),
        (b"xchat.example.com", None),
    ],
)
def test_exact_host_ignores_port_and_case(host: bytes, expected: str | None) -> None:
    assert select_pool(listener(route("chat", host="chat.example.com")), host, "/") == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"a.example.com", "wild"),
        (b"a.b.example.com", "wild"),
        (b"A.EXAMPLE.COM:9000", "wild"),
        (b"example.com", None),
        (b"example.com:80", None),
        (b"badexample.com", None),
        (b".example.com", None),
    ],
)
def test_wildcard_host_matches_subdomains_only(host: bytes, expected: str | None) -> None:
    assert select_pool(listener(route("wild", host="*.example.com")), host, "/") == expected


@pytest.mark.parametrize(
    ("host", "name"),
    [
        (b"[::1]:8080", "::1"),
        (b"[::1]", "::1"),
        (b"[2001:DB8::1]:443", "2001:db8::1"),
        (b"::1", "::1"),  # bare IPv6 (not valid in Host, but never mistaken for name:port)
        (b"127.0.0.1:9000", "127.0.0.1"),
        (b" Example.com ", "example.com"),
    ],
)
def test_host_name_strips_port_and_brackets(host: bytes, name: str) -> None:
    assert host_name(host) == name


def test_ipv6_host_routes_by_path_and_falls_to_default() -> None:
    lst = listener(route("named", host="example.com"), route("api", path_prefix="/api"), route("dflt"))
    assert select_pool(lst, b"[::1]:8080", "/api/x") == "api"
    assert select_pool(lst, b"[::1]:8080", "/chat") == "dflt"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/chat", "chat"),
        ("/chat/", "chat"),
        ("/chat/room/1", "chat"),
        ("/chatroom", None),
        ("/Chat", None),  # paths are case-sensitive
        ("/", None),
        ("/other/chat", None),
    ],
)
def test_path_prefix_matches_whole_segments(path: str, expected: str | None) -> None:
    assert select_pool(listener(route("chat", path_prefix="/chat")), b"h", path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/api/", "api"), ("/api/v1", "api"), ("/api/v1/x", "api"), ("/api", None), ("/apiary", None)],
)
def test_prefix_ending_in_slash_is_a_plain_prefix(path: str, expected: str | None) -> None:
    assert select_pool(listener(route("api", path_prefix="/api/")), b"h", path) == expected


def test_root_prefix_matches_every_path() -> None:
    lst = listener(route("all", path_prefix="/"))
    assert [select_pool(lst, b"h", p) for p in ("/", "/x", "/x/y")] == ["all"] * 3


def test_host_and_path_must_both_match() -> None:
    lst = listener(route("both", host="a.example.com", path_prefix="/ws"), route("dflt"))
    assert select_pool(lst, b"a.example.com", "/ws/1") == "both"
    assert select_pool(lst, b"a.example.com", "/http") == "dflt"
    assert select_pool(lst, b"b.example.com", "/ws/1") == "dflt"


def test_first_matching_route_wins() -> None:
    lst = listener(
        route("specific", host="a.example.com", path_prefix="/chat"),
        route("host", host="a.example.com"),
        route("wild", host="*.example.com"),
        route("dflt"),
    )
    assert select_pool(lst, b"a.example.com", "/chat") == "specific"
    assert select_pool(lst, b"a.example.com", "/feed") == "host"
    assert select_pool(lst, b"b.example.com", "/chat") == "wild"
    assert select_pool(lst, b"example.org", "/chat") == "dflt"


def test_options_asterisk_takes_the_first_route_of_its_host_else_the_default() -> None:
    lst = listener(
        route("api", path_prefix="/api"),
        route("chat", host="a.example.com", path_prefix="/chat"),
        route("dflt"),
    )
    assert select_pool(lst, b"A.example.com:8080", "*") == "chat"  # the host's route, whatever its path
    assert select_pool(lst, b"b.example.com", "*") == "dflt"  # a path-only route is not about the server
    assert select_pool(listener(route("api", path_prefix="/api")), b"b.example.com", "*") is None


def test_default_route_before_others_shadows_them() -> None:
    lst = listener(route("dflt"), route("chat", path_prefix="/chat"))
    assert select_pool(lst, b"h", "/chat") == "dflt"


def test_no_match_means_none_for_a_404() -> None:
    lst = listener(route("chat", host="chat.example.com"), route("api", path_prefix="/api"))
    assert select_pool(lst, b"example.com", "/chat") is None


@pytest.mark.parametrize("pattern", ["chat.example.com.", "Chat.Example.COM", "*.example.com."])
def test_host_patterns_from_the_config_match_like_request_hosts(pattern: str) -> None:
    """A pattern written in the fully qualified form or in capitals matches like the request does."""
    config = parse_config(
        "listeners:\n"
        "  - address: 127.0.0.1:8080\n"
        f"    routes: [{{match: {{host: '{pattern}'}}, pool: p}}]\n"
        "pools:\n"
        "  p: {backends: [{address: 127.0.0.1:9001}]}\n"
    )
    lst = config.listeners[0]
    assert select_pool(lst, b"chat.example.com", "/") == "p"
    assert select_pool(lst, b"CHAT.example.com.:443", "/") == "p"
    assert select_pool(lst, b"example.net", "/") is None


# --- extract_hash_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"X-User", b"alice")], b"alice"),
        ([(b"x-user", b"alice"), (b"X-USER", b"bob")], b"alice"),  # first value
        ([(b"X-Other", b"alice")], None),
        ([(b"X-User", b"")], None),
        ([], None),
    ],
)
def test_header_key(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    spec = HashKey("header", "x-user")
    assert extract_hash_key(spec, upgrade(headers=headers), "192.0.2.1") == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Cookie", b"sid=abc")], b"abc"),
        ([(b"Cookie", b"a=1; sid=abc; b=2")], b"abc"),
        ([(b"Cookie", b"a=1;sid=abc")], b"abc"),
        ([(b"Cookie", b"a=1"), (b"cookie", b"b=2; sid=xyz")], b"xyz"),  # every Cookie header
        ([(b"Cookie", b"sid=first"), (b"Cookie", b"sid=second")], b"first"),
        ([(b"Cookie", b"xsid=abc; sidx=def")], None),  # names match exactly
        ([(b"Cookie", b"SID=abc")], None),  # cookie names are case-sensitive
        ([(b"Cookie", b"sid=")], None),
        ([(b"Cookie", b"sid")], None),  # no "=": not a name=value pair
        ([(b"Cookie", b"tok=a=b; sid=v=1")], b"v=1"),  # "=" inside a value is kept
        ([], None),
    ],
)
def test_cookie_key(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    spec = HashKey("cookie", "sid")
    assert extract_hash_key(spec, upgrade(headers=headers), "192.0.2.1") == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/ws?room=42", b"42"),
        (b"/ws?a=1&room=42&b=2", b"42"),
        (b"/ws?room=42&room=43", b"42"),
        (b"/ws?room=a%20b", b"a b"),
        (b"/ws?room=a+b", b"a b"),
        (b"/ws?room=%C3%A9", "é".encode()),  # percent-decoded to the original bytes
        (b"/ws?room=%FF", b"\xff"),  # not UTF-8: still exact bytes, no replacement char
        (b"/ws?room=", None),
        (b"/ws?room", None),
        (b"/ws?rooms=1", None),
        (b"/ws", None),
        (b"/room/42", None),
    ],
)
def test_query_key(target: bytes, expected: bytes | None) -> None:
    spec = HashKey("query", "room")
    assert extract_hash_key(spec, upgrade(target=target), "192.0.2.1") == expected


def test_path_key_excludes_the_query() -> None:
    spec = HashKey("path")
    assert extract_hash_key(spec, upgrade(target=b"/rooms/7?x=1"), "192.0.2.1") == b"/rooms/7"


def test_client_ip_key() -> None:
    spec = HashKey("client_ip")
    assert extract_hash_key(spec, upgrade(), "2001:db8::7") == b"2001:db8::7"
    assert extract_hash_key(spec, upgrade(), "") is None


def test_named_kinds_need_a_name_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a name"):
        extract_hash_key(HashKey("header"), upgrade(), "192.0.2.1")
    with pytest.raises(ValueError, match="unknown hash key kind"):
        extract_hash_key(HashKey("body"), upgrade(), "192.0.2.1")
