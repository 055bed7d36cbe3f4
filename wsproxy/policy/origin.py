"""Which browser origins and which subprotocols a listener or route lets through: pure matching.

Browsers send `Origin` on every WebSocket handshake and let any page open a socket to any site,
so a server that authenticates by cookie must check the origin itself (cross-site WebSocket
hijacking). `allowed_origins` patterns are `[scheme://]host[:port]` with an optional leading
`*.` on the host (any subdomain, at any depth, never the bare domain); the literal `null`
matches the opaque origin of sandboxed frames and `file:` pages. Host and scheme compare
without case; a default port (80 for http/ws, 443 for https/wss) equals no port. Subprotocol
names compare exactly (RFC 6455 tokens are case-sensitive). The patterns and the Origin
parser are configuration values (config/origins.py); strings in, decisions out.
"""

from __future__ import annotations

from wsproxy.config.origins import OriginPattern, parse_origin


def origin_allowed(patterns: tuple[OriginPattern, ...], values: list[bytes]) -> bool:
    """May a request carrying these Origin header values pass?

    No Origin header: yes. Browsers always send one on a WebSocket handshake, so its absence
    means a non-browser client, which cross-site hijacking cannot use; such clients need their
    own authentication (see `auth`). More than one Origin header, or a value that is not a
    single origin: no.
    """
    if not values:
        return True
    if len(values) > 1:
        return False
    origin = parse_origin(values[0])
    return origin is not None and any(p.matches(origin) for p in patterns)


def filter_subprotocols(offered: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The client's offers that are allowed, in the client's order (duplicates kept once)."""
    allowed_set = set(allowed)
    out: list[str] = []
    for name in offered:
        if name in allowed_set and name not in out:
            out.append(name)
    return tuple(out)
