"""Sessions bound to their credentials, pure: when an auth answer's expiry means a session
must be checked again or closed.

The auth service may say how long its yes holds (`auth.session_expiry_header`, e.g.
`X-Auth-Expires`): seconds from now, an absolute Unix time, or an HTTP date. At that time the
session is closed with 1008 ("credentials expired"), or, with `auth.recheck_before`, the auth
subrequest is sent again that long before and the session goes on while it still passes. Each
session's moment is moved earlier by a random part of a short spread (at most
AUTH_EXPIRY_SPREAD, at most a tenth of the time left), so a fleet of tokens minted together does
not expire, or hit the auth service, in one instant. Never later than the expiry itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from wsproxy.config import defaults

UNIX_TIME_FROM = 1e9  # a number at least this large is an absolute Unix time (2001 on), else seconds
CLOSE_REASON = "credentials expired"
RECHECK = "recheck"
EXPIRE = "expire"


def parse_expiry(value: bytes, wall_now: float) -> float | None:
    """The absolute (Unix) time a header value names; None if it names none."""
    text = value.decode("latin-1").strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        try:
            return parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if number != number or number < 0 or number > 1e12:  # NaN, negative, absurd
        return None
    return number if number >= UNIX_TIME_FROM else wall_now + number


@dataclass(frozen=True, slots=True)
class Step:
    what: str  # RECHECK or EXPIRE
    delay: float  # seconds from now


def next_step(remaining: float, recheck_before: float | None, unit_random: float) -> Step:
    """What to do about credentials valid for `remaining` more seconds, and when."""
    spread = min(defaults.AUTH_EXPIRY_SPREAD, max(remaining, 0.0) * 0.1) * min(max(unit_random, 0.0), 1.0)
    if recheck_before is not None and remaining > recheck_before:
        return Step(RECHECK, max(0.0, remaining - recheck_before - spread))
    return Step(EXPIRE, max(0.0, remaining - spread))
