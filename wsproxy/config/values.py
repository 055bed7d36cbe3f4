"""Parsers of single configuration values (durations, sizes, rates, addresses, names).

Each takes what YAML gave and returns the typed value, or raises ValueError with a message that
says what was expected; the loader adds the key path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from wsproxy.config.model import (
    HASH_KEY_KINDS,
    HASH_KEY_PLAIN,
    Address,
    HashKey,
)
from wsproxy.config.origins import OriginPattern, parse_origin_pattern, parse_subprotocol

# ---------------------------------------------------------------------------------------------
# primitive parsers: each returns the value or raises ValueError with a message for the user

MAX_DURATION = 365 * 24 * 3600.0
DURATION_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "250ms", "10s", "5m", "1h"."""
    number: float | str
    unit: str | None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = value, None
    elif isinstance(value, str) and (m := DURATION_PATTERN.match(value)):
        number, unit = m.group(1), m.group(2)
    else:
        raise ValueError(f'expected a duration such as 10, "250ms", "10s", "5m", got {value!r}')
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except OverflowError:
        raise ValueError(f"duration {value!r} is too large") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is over the maximum of {MAX_DURATION:g}s (one year)")
    return seconds


def parse_window(value: Any) -> float:
    """A duration that may be 0 (a drain window of 0: all at once)."""
    if value in (0, "0", "0s", "0ms"):
        return 0.0
    return parse_duration(value)


def parse_optional_duration(value: Any) -> float | None:
    """A duration, or `off` (also null / false) for a timer that never fires."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return parse_duration(value)


def parse_fraction(value: Any) -> float:
    """0.1 or "10%": a fraction in [0, 1)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise ValueError(f'expected a fraction such as 0.1 or "10%", got {value!r}') from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too large for a fraction") from None
    else:
        raise ValueError(f'expected a fraction such as 0.1 or "10%", got {value!r}')
    if not 0.0 <= number < 1.0:
        raise ValueError(f"expected a fraction from 0 up to (not including) 100%, got {value!r}")
    return number


def parse_size(value: Any) -> int:
    """Bytes: a whole number or "64KiB", "16MiB", "1GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", value)
        if m:
            number = int(m.group(1)) * {None: 1, "B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
            if number > 0:
                return number
    raise ValueError(f'expected a positive size in bytes such as 65536 or "64MiB", got {value!r}')


def parse_address(value: Any, *, allow_port_zero: bool = False) -> Address:
    """`host:port` or `[v6]:port`."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f'expected host:port such as "127.0.0.1:{value}", got the bare number {value}')
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    text = value.strip()
    if "://" in text:
        rest = text.partition("://")[2]
        raise ValueError(f"addresses are host:port without a scheme: {rest.rstrip('/')!r}, not {value!r}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, as [{host}]:{port_text}")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r} in {value!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}..65535, got {port}")
    return Address(host, port)


def parse_hash_key(value: Any) -> HashKey:
    if not isinstance(value, str):
        raise ValueError(f"expected header:NAME, cookie:NAME, query:NAME, path or client_ip, got {value!r}")
    if value in HASH_KEY_PLAIN:
        return HashKey(value)
    kind, sep, name = value.partition(":")
    if sep and kind in HASH_KEY_KINDS and name.strip():
        name = name.strip()
        return HashKey(kind, name.lower() if kind == "header" else name)
    raise ValueError(f"expected header:NAME, cookie:NAME, query:NAME, path or client_ip, got {value!r}")


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def parse_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1.0 < value <= 100.0:
        raise ValueError(f"expected a number greater than 1 (at most 100), got {value!r}")
    return float(value)


def parse_bounded_int(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number {low}..{high}, got {value!r}")
        return value

    return parse


def parse_host_pattern(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a host name or *.domain, got {value!r}")
    host = value.strip().lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # "example.com." is "example.com", as routing.host_name treats requests
    body = host[2:] if host.startswith("*.") else host
    if not body or "*" in body or "/" in body or ":" in body:
        raise ValueError(f"expected a host name (no port) or *.domain, got {value!r}")
    return host


def parse_path_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected a path starting with /, got {value!r}")
    return value


# --- edge protection: rates, caps, origins, subprotocols, auth (docs/security.md) -------------------

RATE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)?\s*/\s*(s|m|h)\s*$")
SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}
RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_RATE = 1e12
# Headers an auth check may neither pass on nor copy into the upstream request: the HTTP framing
# of each hop and the headers the proxy sets itself.
AUTH_RESERVED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
COPY_RESERVED = AUTH_RESERVED | {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_rate(value: Any, *, sizes: bool = False) -> float:
    """Events per second from a number (per second) or "20/s", "600/m", "1MiB/s" (sizes: bytes)."""
    hint = '"1MiB/s", "500KiB/s" or a number of bytes per second' if sizes else '"20/s", "600/m" or a number'
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and (m := RATE_PATTERN.match(value)) and (sizes or m.group(2) is None):
        rate = float(m.group(1)) * SIZE_UNITS[m.group(2)] / RATE_PERIODS[m.group(3)]
    else:
        raise ValueError(f"expected a rate such as {hint}, got {value!r}")
    if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE:
        raise ValueError(f"expected a positive rate (at most {MAX_RATE:g}/s), got {value!r}")
    return rate


def parse_burst(sizes: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if sizes and isinstance(value, str):
            return float(parse_size(value))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= MAX_RATE:
            raise ValueError(f"expected a burst of at least 1 (a whole number of tokens), got {value!r}")
        return float(value)

    return parse


def is_off(value: Any) -> bool:
    """`off`, false or null: a limit or check that is not applied."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off")


def parse_optional_size(value: Any) -> int | None:
    """A size in bytes (parse_size), or off: `off`, null, false or 0."""
    if is_off(value) or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    return parse_size(value)


def parse_optional_count(value: Any) -> int | None:
    if is_off(value):
        return None
    return parse_bounded_int(1, 10_000_000)(value)


def parse_header_names(reserved: frozenset[str]) -> Callable[[Any], tuple[str, ...]]:
    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of header names, got {value!r}")
        names: list[str] = []
        for item in value:
            if not isinstance(item, str) or not HEADER_NAME.fullmatch(item):
                raise ValueError(f"expected a header name, got {item!r}")
            name = item.lower()
            if name in reserved or name.startswith("sec-websocket-"):
                raise ValueError(f"{item} is set by the proxy for each hop and cannot be listed here")
            if name not in names:
                names.append(name)
        return tuple(names)

    return parse


def parse_auth_url(value: Any) -> tuple[str, int, str]:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// URL, got {value!r}")
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme != "http":
        raise ValueError(f"expected an http:// URL (the auth service should be on a trusted network), got {value!r}")
    if not url.hostname or url.username is not None or url.fragment:
        raise ValueError(f"expected http://host[:port]/path without user or fragment, got {value!r}")
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in target):
        raise ValueError(f"the URL's path must be plain ASCII without spaces, got {value!r}")
    return url.hostname, port or 80, target


def parse_trusted_proxies(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of CIDRs (`10.0.0.0/8`, `::1/128`) or single addresses (`192.0.2.7`)."""
    if not isinstance(value, list):
        raise ValueError(f'expected a list of addresses or CIDRs such as ["10.0.0.0/8", "::1"], got {value!r}')
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f'expected an address or CIDR such as "10.0.0.0/8" (a string), got {item!r}')
        try:
            net = ipaddress.ip_network(item.strip())
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an address or CIDR: {exc}") from None
        if net not in nets:
            nets.append(net)
    return tuple(nets)


def parse_host_names(value: Any) -> tuple[str, ...]:
    """Names a Host header may carry (`metrics.internal`, `10.0.0.5`, `::1`): lower case, no port."""
    if not isinstance(value, list):
        raise ValueError(f'expected a list of host names such as ["metrics.internal"], got {value!r}')
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9.:_-]+", item.strip().strip("[]")):
            raise ValueError(f"expected a host name or address without a port or scheme, got {item!r}")
        name = item.strip().strip("[]").lower().removesuffix(".")
        if ":" in name:
            try:
                ipaddress.IPv6Address(name)
            except ValueError:
                raise ValueError(f"{item!r}: give the name without a port (the port is the listener's)") from None
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_origins(value: Any) -> tuple[OriginPattern, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('expected a non-empty list of origins such as ["https://app.example.com"] (omit: any)')
    return tuple(parse_origin_pattern(v) for v in value)


def parse_subprotocols(value: Any) -> tuple[str, ...] | None:
    if is_off(value):
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of subprotocol names (off: any)")
    return tuple(dict.fromkeys(parse_subprotocol(v) for v in value))


HEALTH_PATH = re.compile(r"/[\x21-\x7e]*")  # printable ASCII, no spaces: it goes into a request line


def parse_health_path(value: Any) -> str:
    if not isinstance(value, str) or not HEALTH_PATH.fullmatch(value):
        raise ValueError(f"expected a path starting with / (printable ASCII, no spaces), got {value!r}")
    return value


def says_off(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def parse_positive_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100_000:
        raise ValueError(f"expected a number of sessions per second in (0, 100000], got {value!r}")
    return float(value)


def parse_workers(value: Any) -> int:
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    return parse_bounded_int(1, 256)(value)
