"""The request target as routing and the backend both see it: parsed and normalised, pure.

A route with `auth` on `/admin` means nothing if `/%61dmin`, `//admin` or `/public/../admin`
reach the default route and the backend then serves `/admin`. So the target is normalised once,
before routing, and the backend receives the normalised target: the proxy and the backend agree
on what was asked for (Envoy's `normalize_path` + `merge_slashes`, HAProxy's `normalize-uri`).

- percent-encoded unreserved characters (RFC 3986 section 2.3: ALPHA DIGIT - . _ ~) are decoded,
  other percent-encodings are kept with upper-case hex;
- an encoded `/` (`%2F`), an encoded or literal `\\`, an encoded NUL, a `#` or a malformed
  percent-encoding is refused: backends disagree on what such a path means;
- repeated slashes are merged, dot segments resolved (RFC 3986 section 5.2.4); a `..` above the
  root is refused;
- the query is kept byte for byte;
- the absolute form (`GET http://host/path HTTP/1.1`) must name the same authority as `Host`; its
  path and query go on as an origin-form target.

Matching stays case-sensitive: `/ADMIN` is another path (docs/security.md says what to do for
case-insensitive backends). No trio, no sockets: bytes in, bytes out or `BadTarget`.
"""

from __future__ import annotations

import re

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HEXDIGITS = frozenset("0123456789abcdefABCDEF")
# Decoded, these would change where the path's segments are, or end it early in some backends.
_REFUSED_ESCAPES = {0x2F: "an encoded / (%2F)", 0x5C: "an encoded \\ (%5C)", 0x00: "an encoded NUL (%00)"}
ASTERISK = b"*"  # asterisk-form: only `OPTIONS *` of a plain request takes it (http1.py), never normalised
ABSOLUTE_SCHEMES = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_ABSOLUTE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)


class BadTarget(ValueError):
    """A request target that cannot be routed safely; the message says why (for a 400)."""


def normalize_path(path: str) -> str:
    """The normal form of an absolute path (see the module docstring); raises BadTarget."""
    if not path.startswith("/"):
        raise BadTarget(f"path must start with /, got {path[:100]!r}")
    decoded: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%":
            hx = path[i + 1 : i + 3]
            if len(hx) != 2 or not all(h in HEXDIGITS for h in hx):
                raise BadTarget("has a malformed percent-encoding in its path")
            byte = int(hx, 16)
            if byte in _REFUSED_ESCAPES:
                raise BadTarget(f"has {_REFUSED_ESCAPES[byte]} in its path")
            decoded.append(chr(byte) if chr(byte) in UNRESERVED else "%" + hx.upper())
            i += 3
            continue
        if c == "\\":
            raise BadTarget("has a \\ in its path")
        if c == "\x00":
            raise BadTarget("has a NUL in its path")
        if c == "#":
            raise BadTarget("has a # (a fragment is never sent in a request)")
        decoded.append(c)
        i += 1
    segments: list[str] = []
    trailing = False  # the path ends in "/" (after an empty, "." or ".." last segment)
    for segment in "".join(decoded).split("/")[1:]:
        trailing = segment in ("", ".", "..")
        if segment == "..":
            if not segments:
                raise BadTarget("goes above the root with ..")
            segments.pop()
        elif not trailing:
            segments.append(segment)
    return "/" + "/".join(segments) + ("/" if trailing and segments else "")


def normalize_target(target: bytes, *, host: bytes) -> bytes:
    """The target a request is routed by and sent to the backend with; raises BadTarget.

    `host` is the request's Host header, which an absolute-form target's authority must match.
    """
    text = target.decode("latin-1")
    if not text.startswith("/"):
        text = _origin_form(text, host.decode("latin-1"))
    path, sep, query = text.partition("?")
    if "#" in query:
        raise BadTarget("has a # (a fragment is never sent in a request)")
    return (normalize_path(path) + sep + query).encode("latin-1")


def _origin_form(text: str, host: str) -> str:
    """An absolute-form target as path and query, after checking its authority against Host."""
    m = _ABSOLUTE.fullmatch(text)
    if m is None:
        shown = text.partition("?")[0][:100]  # never the query: it may carry a token
        raise BadTarget(f"must be a path or an absolute http(s)/ws(s) URL, got {shown!r}")
    scheme = m.group("scheme").lower()
    if scheme not in ABSOLUTE_SCHEMES:
        raise BadTarget(f"has the scheme {scheme!r}; only http, https, ws and wss are proxied")
    authority = m.group("authority")
    if "@" in authority:
        raise BadTarget("carries user information in its authority")
    default = ABSOLUTE_SCHEMES[scheme]
    if _authority(authority, default) != _authority(host, default):
        raise BadTarget(f"names {authority[:100]!r}, which is not the Host header {host[:100]!r}")
    rest = m.group("rest")
    return rest if rest.startswith("/") else "/" + rest


def _authority(text: str, default_port: int) -> tuple[str, int] | None:
    """(lower-case host, port) of `host[:port]` or `[v6][:port]`; None when it is not one."""
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, port = text[: end + 1], text[end + 1 :]
    else:
        name, sep, port = text.partition(":")
        port = sep + port
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return None
    if not name:
        return None
    return (name.removesuffix("."), int(port[1:]) if port[1:] else default_port)
