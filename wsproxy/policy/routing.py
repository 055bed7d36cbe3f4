"""Which pool serves a request, and which bytes of it are the hash key: pure functions.

Routing looks only at the Host header and the path, the two things every WebSocket client
sends and that proxies in front of us preserve. Host names compare without the port and
without case; paths arrive normalised (protocol/target.py: what the backend will be sent) and
compare byte for byte (case-sensitive, no case folding), by whole segments, so "/chat" never
captures "/chatroom". The hash key feeds
consistent hashing; an absent or empty key is None so the caller can apply `hash_fallback`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from wsproxy.config import HashKey, ListenerConfig, RouteMatch
from wsproxy.protocol.handshake import ClientUpgrade
from wsproxy.protocol.target import ASTERISK as ASTERISK_TARGET

ASTERISK = ASTERISK_TARGET.decode()  # the path of `OPTIONS *` (http1.asterisk_form)


def host_name(host: bytes) -> str:
    """The Host header's name part: lower case, no port, IPv6 without brackets.

    "Example.COM:8080" -> "example.com", "[::1]:8080" -> "::1". One trailing dot (the
    fully qualified form "example.com.") is dropped so it matches like "example.com".
    """
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        return text[1:end] if end >= 0 else text[1:]
    if text.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        text = text.partition(":")[0]
    return text[:-1] if text.endswith(".") else text


def host_allowed(host: bytes | None, names: frozenset[str]) -> bool:
    """The admin listener's DNS-rebinding guard: the Host header names one of `names` (lower
    case, no port, IPv6 without brackets). A request without Host (HTTP/1.0) comes from no
    browser, so it cannot be a rebinding page, and passes."""
    return host is None or host_name(host) in names


def host_matches(pattern: str, name: str) -> bool:
    """Exact match, or "*.example.com" for any name strictly under example.com (any depth)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return len(name) > len(suffix) and name.endswith(suffix)
    return name == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Segment-aware prefix: "/chat" matches "/chat", "/chat/", "/chat/x", not "/chatroom".

    A prefix ending in "/" is a plain string prefix ("/api/" matches "/api/v1", not "/api").
    """
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def route_matches(match: RouteMatch | None, name: str, path: str) -> bool:
    """A route with no match is a default route; otherwise every given condition must hold.

    `OPTIONS *` (path ASTERISK) asks about the server behind a host, no path of it: it takes
    the first route for its host whatever that route's path prefix, else the default route
    (a route for a path under any host is not about the server as a whole)."""
    if match is None:
        return True
    if path == ASTERISK:
        return match.host is not None and host_matches(match.host, name)
    if match.host is not None and not host_matches(match.host, name):
        return False
    return match.path_prefix is None or path_matches(match.path_prefix, path)


def select_pool(listener: ListenerConfig, host: bytes, path: str) -> str | None:
    """The pool for a request: the listener's own pool, else the first matching route.

    `path` is the path without the query (`ClientUpgrade.path`). None means no route matched
    and the caller answers 404.
    """
    if listener.pool is not None:
        return listener.pool
    name = host_name(host)
    for route in listener.routes:
        if route_matches(route.match, name, path):
            return route.pool
    return None


def cookie(upgrade: ClientUpgrade, name: bytes) -> bytes | None:
    """The first value of cookie `name` across every Cookie header ("a=1; b=2")."""
    for header, value in upgrade.raw_headers:
        if header.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, cookie_value = pair.partition(b"=")
            if sep and key.strip() == name:
                return cookie_value.strip()
    return None


def _query(upgrade: ClientUpgrade, name: str) -> bytes | None:
    """The first value of query parameter `name`, percent-decoded, as the original bytes.

    latin-1 maps each byte to one character, so decoding the query with it and encoding the
    value back gives exactly the bytes the client sent, whatever their charset.
    """
    wanted = name.encode("utf-8").decode("latin-1")
    for key, value in parse_qsl(upgrade.query, keep_blank_values=True, encoding="latin-1"):
        if key == wanted:
            return value.encode("latin-1")
    return None


def extract_hash_key(spec: HashKey, upgrade: ClientUpgrade, client_ip: str) -> bytes | None:
    """The bytes consistent hashing places on the ring, or None when absent or empty.

    header:NAME and query:NAME take the first value; cookie:NAME searches every Cookie header.
    Only the first occurrence counts: an empty first value gives None, not a later value.
    """
    if spec.kind == "header":
        value = upgrade.header(_name(spec).encode("latin-1"))
    elif spec.kind == "cookie":
        value = cookie(upgrade, _name(spec).encode("utf-8"))
    elif spec.kind == "query":
        value = _query(upgrade, _name(spec))
    elif spec.kind == "path":
        value = upgrade.path.encode("latin-1")
    elif spec.kind == "client_ip":
        value = client_ip.encode("ascii", "replace")
    else:
        raise ValueError(f"unknown hash key kind {spec.kind!r}")
    return value or None


def _name(spec: HashKey) -> str:
    if spec.name is None:
        raise ValueError(f"hash key {spec.kind} needs a name")
    return spec.name
