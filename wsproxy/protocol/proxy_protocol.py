"""PROXY protocol v1 and v2 (haproxy.org/download/2.9/doc/proxy-protocol.txt), parse and build.

An L4 balancer in front of wsproxy (AWS NLB, HAProxy in TCP mode) prepends one header naming the
real client; behind wsproxy, a backend may want the same. Parsing is incremental and bounded: the
caller feeds what it has read and gets `NEED_MORE`, a `ProxyHeader`, or a `ValueError` with the
reason, never a read past the header (the rest is returned as `rest`).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest valid v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_TLV: Final = 2048  # addresses plus TLVs we are willing to read; real headers are far shorter
NEED_MORE: Final = None


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header said. `source` is None for LOCAL/UNKNOWN (health checks of the balancer):
    the connection's own peer address stands."""

    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    rest: bytes  # bytes read after the header: the start of the real stream


def parse(data: bytes) -> ProxyHeader | None:
    """Parse a header at the start of `data`: a ProxyHeader, None (read more), or ValueError."""
    k = min(len(data), len(V1_PREFIX))
    if data[:k] == V1_PREFIX[:k]:
        return NEED_MORE if k < len(V1_PREFIX) else _parse_v1(data)
    k = min(len(data), len(V2_SIGNATURE))
    if data[:k] == V2_SIGNATURE[:k]:
        return _parse_v2(data)
    raise ValueError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ValueError("PROXY v1 line longer than 107 bytes")
        return NEED_MORE
    parts = data[:end].decode("ascii", "replace").split(" ")
    rest = data[end + 2 :]
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None, None, rest)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError("malformed PROXY v1 line")
    family = 4 if parts[1] == "TCP4" else 6
    src, dst = _ip(parts[2], family), _ip(parts[3], family)
    return ProxyHeader((src, _port(parts[4])), (dst, _port(parts[5])), rest)


def _ip(text: str, family: int) -> str:
    if "%" in text:  # ipaddress takes any bytes after % as a scope id; they would become the client address
        raise ValueError(f"bad address {text!r} in PROXY header (no scope id)")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"bad address {text!r} in PROXY header") from None
    if addr.version != family:
        raise ValueError(f"address {text!r} does not match the protocol family")
    return str(addr)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(f"bad port {text!r} in PROXY header")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return NEED_MORE
    if data[:12] != V2_SIGNATURE:
        raise ValueError("bad PROXY v2 signature")
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ValueError("unsupported PROXY protocol version")
    if length > V2_MAX_TLV:
        raise ValueError(f"PROXY v2 header of {length} bytes is over {V2_MAX_TLV}")
    if len(data) < 16 + length:
        return NEED_MORE
    body, rest = data[16 : 16 + length], data[16 + length :]
    cmd = ver_cmd & 0x0F
    if cmd == 0x0:  # LOCAL: the balancer's own connection (e.g. its health check)
        return ProxyHeader(None, None, rest)
    if cmd != 0x1:
        raise ValueError("unknown PROXY v2 command")
    if fam == 0x11:  # TCP over IPv4
        if length < 12:
            raise ValueError("PROXY v2 IPv4 address block too short")
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
    elif fam == 0x21:  # TCP over IPv6
        if length < 36:
            raise ValueError("PROXY v2 IPv6 address block too short")
        src, dst = str(ipaddress.IPv6Address(body[0:16])), str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
    elif fam >> 4 == 0:  # AF_UNSPEC: keep the connection's own address
        return ProxyHeader(None, None, rest)
    else:
        raise ValueError("unsupported PROXY v2 address family (only TCP over IPv4/IPv6)")
    return ProxyHeader((src, sport), (dst, dport), rest)


def build(version: str, source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A header telling the next hop that `source` connected to `dest`."""
    src_ip, dst_ip = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
    if src_ip.version != dst_ip.version:  # e.g. an IPv4 client on an IPv6 listener: map both to v6
        src_ip, dst_ip = _as_v6(src_ip), _as_v6(dst_ip)
    if version == "v1":
        proto = "TCP4" if src_ip.version == 4 else "TCP6"
        return f"PROXY {proto} {src_ip} {dst_ip} {source[1]} {dest[1]}\r\n".encode("ascii")
    if src_ip.version == 4:
        fam, addrs = 0x11, src_ip.packed + dst_ip.packed
    else:
        fam, addrs = 0x21, src_ip.packed + dst_ip.packed
    body = addrs + struct.pack("!HH", source[1], dest[1])
    return V2_SIGNATURE + bytes((0x21, fam)) + struct.pack("!H", len(body)) + body


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ip if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}")
