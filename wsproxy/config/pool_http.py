"""`pools.NAME.tls`, `pools.NAME.http_pool` and `pools.NAME.sticky`: how the proxy reaches a
pool's backends (TLS, mutual TLS, kept-alive HTTP connections) and keeps a client on the backend
that served it first (the affinity cookie). The pool walker (pools.py) calls these."""

from __future__ import annotations

import re
from typing import Any

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.model import SAME_SITE, BackendTLS, HttpPool, Sticky
from wsproxy.config.values import (
    is_off,
    parse_bool,
    parse_bounded_int,
    parse_choice,
    parse_duration,
    parse_host_pattern,
    parse_optional_duration,
)

POOL_HTTP_KEYS = ("tls", "http_pool", "sticky")
TLS_KEYS = ("ca", "server_name", "verify", "cert", "key")
COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 6265 cookie-name (a token)
MIN_SECRET = 16  # characters of a configured sticky secret


def parse_backend_tls(ck: Checker, path: str, raw: Any) -> BackendTLS | None:
    if is_off(raw):
        return None
    m = ck.mapping(raw, path, TLS_KEYS)
    ca = None
    if "ca" in m and m["ca"] != "system":
        ca = ck.get(m, "ca", path, ck.path_to_file, None)
    server_name = ck.get(m, "server_name", path, _server_name, None)
    verify = ck.get(m, "verify", path, parse_bool, defaults.BACKEND_TLS_VERIFY)
    cert = ck.get(m, "cert", path, ck.path_to_file, None)
    key = ck.get(m, "key", path, ck.path_to_file, None)
    if ("cert" in m) != ("key" in m):
        ck.fail(join(path, "key" if "cert" in m else "cert"), "a client certificate needs both cert and key")
    if not verify and ("ca" in m or "server_name" in m):
        ck.fail(join(path, "verify"), "verify: false checks nothing: ca and server_name would be ignored")
    return BackendTLS(ca=ca, server_name=server_name, verify=verify, cert=cert, key=key)


def _server_name(value: Any) -> str:
    name = parse_host_pattern(value)
    if name.startswith("*."):
        raise ValueError(f"expected one host name, not a pattern, got {value!r}")
    return name


def parse_http_pool(ck: Checker, path: str, raw: Any) -> HttpPool:
    m = ck.mapping(raw, path, ("max_idle", "idle_timeout"))
    return HttpPool(
        max_idle=ck.get(m, "max_idle", path, parse_bounded_int(0, 10_000), defaults.HTTP_POOL_MAX_IDLE),
        idle_timeout=ck.get(m, "idle_timeout", path, parse_duration, defaults.HTTP_POOL_IDLE_TIMEOUT),
    )


def parse_sticky(ck: Checker, path: str, raw: Any) -> Sticky | None:
    if is_off(raw):
        return None
    if raw is True:
        return Sticky()
    m = ck.mapping(raw, path, ("cookie", "max_age", "secure", "http_only", "same_site", "secret"))
    secure = ck.get(m, "secure", path, _secure, defaults.STICKY_SECURE)
    same_site = ck.get(m, "same_site", path, parse_choice(SAME_SITE), defaults.STICKY_SAME_SITE)
    if same_site == "none" and secure == "false":
        ck.fail(join(path, "same_site"), "browsers drop SameSite=None cookies without Secure (secure is false)")
    return Sticky(
        cookie=ck.get(m, "cookie", path, _cookie_name, defaults.STICKY_COOKIE),
        max_age=ck.get(m, "max_age", path, parse_optional_duration, defaults.STICKY_MAX_AGE),
        secure=secure,
        http_only=ck.get(m, "http_only", path, parse_bool, defaults.STICKY_HTTP_ONLY),
        same_site=same_site,
        secret=ck.get(m, "secret", path, _secret, None),
    )


def _cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not COOKIE_NAME.fullmatch(value):
        raise ValueError(f"expected a cookie name (letters, digits, !#$%&'*+-.^_`|~), got {value!r}")
    return value


def _secure(value: Any) -> str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    raise ValueError(f"expected auto, true or false, got {value!r}")


def _secret(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) < MIN_SECRET:
        raise ValueError(f"expected a string of at least {MIN_SECRET} characters")  # never echo a secret
    return value.encode("utf-8")
