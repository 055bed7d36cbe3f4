"""Who the client is, and the forwarding headers that tell the backend: pure functions.

A client can send `X-Forwarded-For: 6.6.6.6` itself; a backend that reads the leftmost value
would then see a forged address. So forwarding headers are believed only from the peers a
listener lists in `trusted_proxies`:

- from any other peer, the incoming `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are removed
  and the proxy writes its own (the peer's address);
- from a trusted peer they are kept and appended to, and the client is the right-most address of
  the `X-Forwarded-For` chain (or of `X-Real-IP` when there is no chain) that is not itself a
  trusted proxy: what nginx's `real_ip_recursive` gives. That address is the session's client
  address everywhere: `client_ip` hashing, per-IP limits, the auth subrequest, logs.

`Forwarded` elements are written per RFC 7239: a value that is not a token is a quoted string
with `"` and `\\` escaped, and an IPv6 node is quoted with its brackets (`for="[::1]"`).
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 tchar: a Forwarded value made only of these needs no quotes.
TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: the peer that connected, and the client behind it."""

    peer: str  # the address the connection came from (a PROXY header's source, if any)
    client: str  # the client: the peer, or what a trusted peer's forwarding headers say
    trusted: bool = False  # the peer is a trusted proxy: its forwarding headers are kept

    @classmethod
    def direct(cls, peer: str) -> Origin:
        """A client that connected itself (no trusted proxy in between)."""
        return cls(peer=peer, client=peer)


def parse_ip(text: str) -> IPAddress | None:
    """An address from a forwarding value: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`.

    IPv4-mapped IPv6 addresses are returned as IPv4, so one list entry covers both spellings.
    None when the text is not an address (`unknown`, an obfuscated node, garbage).
    """
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(ip: IPAddress, trusted: Iterable[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def resolve_client(peer: str, headers: Iterable[tuple[bytes, bytes]], trusted: tuple[Network, ...]) -> Origin:
    """The request's origin: from an untrusted peer the peer itself; from a trusted one, the
    right-most address of its chain that is not trusted (the left-most, when all of them are;
    the last one read, when the chain holds something that is not an address)."""
    if not trusted:  # no address parsed at all: the common case, on every request
        return Origin.direct(peer)
    peer_ip = parse_ip(peer)
    if peer_ip is None or not is_trusted(peer_ip, trusted):
        return Origin.direct(peer)
    headers = list(headers)
    chain = [hop for k, v in headers if k.lower() == b"x-forwarded-for" for hop in v.decode("latin-1").split(",")]
    if not chain:
        chain = [v.decode("latin-1") for k, v in headers if k.lower() == b"x-real-ip"][-1:]
    client = str(peer_ip)
    for hop in reversed(chain):
        ip = parse_ip(hop)
        if ip is None:
            break
        client = str(ip)
        if not is_trusted(ip, trusted):
            break
    return Origin(peer=peer, client=client, trusted=True)


def forwarded_value(text: str) -> str:
    """An RFC 7239 value: the text itself when it is a token, else a quoted string."""
    if text and all(c in TCHAR for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwarded_node(ip: str) -> str:
    """A `for=` node: IPv6 in brackets, which makes it a quoted string (`"[2001:db8::1]"`)."""
    return forwarded_value(f"[{ip}]" if ":" in ip else ip)


def forwarding_headers(
    origin: Origin, raw_headers: Iterable[tuple[bytes, bytes]], *, scheme: str, host: bytes
) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For, X-Real-IP and Forwarded for the upstream request.

    The caller has removed the client's own (FORWARDING_HEADERS); from a trusted peer their
    values come back here, appended to.
    """
    prior_xff: list[bytes] = []
    prior_fwd: list[bytes] = []
    real_ip: bytes | None = None
    if origin.trusted:
        for name, value in raw_headers:
            low = name.lower()
            if low == b"x-forwarded-for" and value.strip():
                prior_xff.append(value.strip())
            elif low == b"forwarded" and value.strip():
                prior_fwd.append(value.strip())
            elif low == b"x-real-ip" and real_ip is None and value.strip():
                real_ip = value.strip()
    element = ";".join(
        [
            f"for={forwarded_node(origin.peer)}",
            f"proto={forwarded_value(scheme)}",
            f"host={forwarded_value(host.decode('latin-1'))}",
        ]
    )
    return [
        (b"X-Forwarded-For", b", ".join([*prior_xff, origin.peer.encode("latin-1")])),
        (b"X-Real-IP", real_ip if real_ip is not None else origin.client.encode("latin-1")),
        (b"Forwarded", b", ".join([*prior_fwd, element.encode("latin-1")])),
    ]
