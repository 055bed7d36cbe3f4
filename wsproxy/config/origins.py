"""Browser origins and subprotocol names as configuration values: `allowed_origins` patterns
(`[scheme://]host[:port]`, an optional leading `*.` on the host for any subdomain at any depth,
never the bare domain; `null` for opaque origins) and the parser of an Origin header value.
Host and scheme compare without case; a default port (80 for http/ws, 443 for https/wss) equals
no port. The decisions that use them are policy/origin.py's."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
# RFC 6455 section 4.1: a subprotocol is a token (RFC 2616 section 2.2): no separators, no controls.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class Origin:
    """A parsed Origin header value (`null` is scheme "null", host "")."""

    scheme: str
    host: str
    port: int | None  # None: no explicit port

    @property
    def effective_port(self) -> int | None:
        return self.port if self.port is not None else DEFAULT_PORTS.get(self.scheme)


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """One `allowed_origins` entry."""

    scheme: str | None  # None: any scheme
    host: str  # lower case; "*.example.com" for subdomains; "" for the `null` pattern
    port: int | None  # None: the scheme's default port
    null: bool = False

    def __str__(self) -> str:
        if self.null:
            return "null"
        text = f"{self.scheme}://{self.host}" if self.scheme else self.host
        return f"{text}:{self.port}" if self.port is not None else text

    def matches(self, origin: Origin) -> bool:
        if self.null or origin.scheme == "null":
            return self.null and origin.scheme == "null"
        if self.scheme is not None and self.scheme != origin.scheme:
            return False
        if self.host.startswith("*."):
            suffix = self.host[1:]
            if not (len(origin.host) > len(suffix) and origin.host.endswith(suffix)):
                return False
        elif self.host != origin.host:
            return False
        if self.port is None:  # the default port of the origin's own scheme (or none at all)
            return origin.port is None or origin.port == DEFAULT_PORTS.get(origin.scheme)
        return origin.effective_port == self.port


def _split_host_port(text: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host, port), or None if malformed."""
    if text.startswith("["):
        end = text.find("]")
        if end < 2:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if not re.fullmatch(r"\[[0-9a-f:.]+\]", host):
            return None
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
            return None
        port = int(rest[1:])
        if not 0 < port <= 65535:
            return None
        return host, port
    return host, None


def _valid_host(host: str, *, wildcard: bool) -> bool:
    if host.startswith("["):
        return True  # checked by _split_host_port
    if wildcard and host.startswith("*."):
        host = host[2:]
    if not host or len(host) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in host.split("."))


def parse_origin(value: bytes | str) -> Origin | None:
    """An Origin header value, or None if it is not one origin (a list, a path, garbage)."""
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return None
    text = text.strip().lower()
    if text == "null":
        return Origin("null", "", None)
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    split = _split_host_port(rest)
    if split is None or not _valid_host(split[0], wildcard=False):
        return None
    return Origin(scheme, split[0], split[1])


def parse_origin_pattern(value: object) -> OriginPattern:
    """A config entry; raises ValueError with a message for the user."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected an origin such as "https://app.example.com" or "*.example.com", got {value!r}')
    text = value.strip().lower()
    if text == "null":
        return OriginPattern(None, "", None, null=True)
    scheme: str | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if not _SCHEME.fullmatch(scheme):
            raise ValueError(f"{value!r}: {scheme!r} is not a URL scheme")
    split = _split_host_port(text)
    if split is None or not _valid_host(split[0], wildcard=True):
        raise ValueError(
            f"{value!r} is not [scheme://]host[:port] (a host may start with *. for its subdomains; no path)"
        )
    host, port = split
    if port is not None and scheme is not None and port == DEFAULT_PORTS.get(scheme):
        port = None
    return OriginPattern(scheme, host, port)


def parse_subprotocol(value: object) -> str:
    """A config entry for `allowed_subprotocols`; raises ValueError."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"expected a subprotocol name (an HTTP token such as chat.v2), got {value!r}")
    return value
