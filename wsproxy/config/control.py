"""The config keys of runtime control: the admin write API's token, the storm shield
(`admission`), reconnect tracking (`observability`) and sessions bound to their credentials
(`auth.session_expiry_header`, `auth.recheck_before`).

Kept apart from loader.py so each group of keys is parsed by one small function that the
loader calls; every problem is collected with its key path, as everywhere in config/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.model import AdmissionConfig, ObservabilityConfig, RateLimit
from wsproxy.config.values import (
    HEADER_NAME,
    parse_bounded_int,
    parse_duration,
    parse_optional_duration,
)

ADMIN_TOKEN_KEYS = ("token_file", "token_env")
AUTH_EXPIRY_KEYS = ("session_expiry_header", "recheck_before")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _token_file(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not ENV_NAME.fullmatch(value):
        raise ValueError(f"expected an environment variable name, got {value!r}")
    return value


def parse_admin_token(ck: Checker, admin: dict[str, Any], base: Path) -> tuple[Path | None, str | None]:
    """`admin.token_file` / `admin.token_env`: where the write API's secret is (never the secret)."""
    token_file = ck.get(admin, "token_file", "admin", lambda v: _token_file(v, base), defaults.ADMIN_TOKEN_FILE)
    token_env = ck.get(admin, "token_env", "admin", _env_name, defaults.ADMIN_TOKEN_ENV)
    if token_file is not None and token_env is not None:
        ck.fail("admin.token_env", "give admin.token_file or admin.token_env, not both")
    return token_file, token_env


def read_admin_token(token_file: Path | None, token_env: str | None) -> bytes:
    """The token itself (stripped), for the admin listener and `wsproxy ctl`. Raises ValueError
    with a message that names where it looked, never what it found."""
    if token_file is not None:
        try:
            with token_file.open("rb") as f:
                raw = f.read(defaults.ADMIN_MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"admin.token_file: cannot read {token_file}: {exc.strerror}") from None
        if len(raw) > defaults.ADMIN_MAX_TOKEN_BYTES:
            raise ValueError(f"admin.token_file: {token_file} is over {defaults.ADMIN_MAX_TOKEN_BYTES} bytes")
        where = f"admin.token_file ({token_file})"
    elif token_env is not None:
        raw = os.environ.get(token_env, "").encode()
        where = f"admin.token_env (${token_env})"
    else:
        raise ValueError("no admin.token_file or admin.token_env: the write API is off")
    token = raw.strip()
    if len(token) < 16:
        raise ValueError(f"{where}: the token is empty or shorter than 16 characters")
    return token


def parse_expiry_keys(ck: Checker, path: str, auth: dict[str, Any]) -> tuple[str | None, float | None]:
    """`auth.session_expiry_header` (a header name of the auth answer) and `auth.recheck_before`."""

    def header(value: Any) -> str:
        if not isinstance(value, str) or not HEADER_NAME.fullmatch(value):
            raise ValueError(f"expected a header name, got {value!r}")
        return value.lower()

    name = ck.get(auth, "session_expiry_header", path, header, defaults.AUTH_SESSION_EXPIRY_HEADER)
    recheck = ck.get(auth, "recheck_before", path, parse_optional_duration, defaults.AUTH_RECHECK_BEFORE)
    if recheck is not None and name is None:
        ck.fail(join(path, "recheck_before"), "needs session_expiry_header (the time to recheck before)")
    return name, recheck


def parse_admission(ck: Checker, raw: Any, pools: dict[str, Any]) -> AdmissionConfig:
    """`admission: {upgrades: {rate, burst}, per_pool: {NAME: {rate, burst}}, retry_after_spread}`."""
    from wsproxy.config.loader import rate_limit  # the one {rate, burst} parser

    path = "admission"
    m = ck.mapping(raw, path, ("upgrades", "per_pool", "retry_after_spread"))
    upgrades = rate_limit(ck, m, "upgrades", path, sizes=False)
    per_pool: dict[str, RateLimit] = {}
    pp_path = join(path, "per_pool")
    pp = ck.mapping(m.get("per_pool"), pp_path, tuple(m["per_pool"]) if isinstance(m.get("per_pool"), dict) else ())
    for name in pp:
        if name not in pools:
            ck.fail(join(pp_path, str(name)), "no such pool")
            continue
        limit = rate_limit(ck, pp, name, pp_path, sizes=False)
        if limit is not None:
            per_pool[name] = limit
    spread = ck.get(m, "retry_after_spread", path, parse_duration, defaults.ADMISSION_RETRY_AFTER_SPREAD)
    if spread < 1:
        ck.fail(join(path, "retry_after_spread"), "must be at least 1s (Retry-After counts whole seconds)")
    return AdmissionConfig(upgrades=upgrades, per_pool=per_pool, retry_after_spread=spread)


def parse_observability(ck: Checker, raw: Any) -> ObservabilityConfig:
    """`observability: {reconnect_window, reconnect_clients}`."""
    path = "observability"
    m = ck.mapping(raw, path, ("reconnect_window", "reconnect_clients"))
    return ObservabilityConfig(
        reconnect_window=ck.get(m, "reconnect_window", path, parse_duration, defaults.RECONNECT_WINDOW),
        reconnect_clients=ck.get(
            m, "reconnect_clients", path, parse_bounded_int(1, 10_000_000), defaults.RECONNECT_CLIENTS
        ),
    )
