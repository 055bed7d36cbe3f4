"""Decisions of runtime control, pure: a backend's admin state, which sessions a selector
matches, how many sessions a rebalance moves off which backend, and what a request body asks.

The admin write API (runtime/admin_api.py) and `wsproxy ctl` carry these out; nothing here
waits or reads a clock. A backend's admin state is set by an operator and is independent of its
health: `drain` takes no new sessions and keeps the open ones, `maint` also closes the open ones
(1012, spread over a window), `ready` returns it. The state lives on the `Backend` object, which
a reload keeps while the backend stays in the file, so the state survives the reload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wsproxy.config import MAX_DURATION, defaults, parse_window

READY = "ready"
DRAIN = "drain"
MAINT = "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)
MAX_WEIGHT = 1000
CLOSE_CODE_MIN, CLOSE_CODE_MAX = 1000, 4999
# codes a close frame must never carry (RFC 6455 7.4.1: reserved, or only for local reports)
FORBIDDEN_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})
MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


class ControlError(ValueError):
    """A control request the proxy cannot carry out as asked: the message says why (a 400)."""


class BackendAdmin:
    """An operator's verdict on one backend, next to (not instead of) its health."""

    __slots__ = ("changed", "state", "weight")

    def __init__(self) -> None:
        self.state = READY
        self.weight: int | None = None  # a weight set at runtime; None: the config's
        self.changed: float | None = None  # when the state was last set (session clock)

    @property
    def accepting(self) -> bool:
        """May the balancer give it new sessions?"""
        return self.state == READY

    def set(self, state: str, now: float, weight: int | None = None) -> bool:
        """Apply a state (and maybe a weight); True if the state changed."""
        if state not in ADMIN_STATES:
            raise ControlError(f"state: expected one of {', '.join(ADMIN_STATES)}, got {state!r}")
        changed = state != self.state
        self.state = state
        if weight is not None:
            self.weight = weight
        if changed:
            self.changed = now
        return changed


# --- request bodies ----------------------------------------------------------------------------


def _text(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ControlError(f"{key}: missing")
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ControlError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _duration(
    body: Mapping[str, Any], key: str, default: float | None, limit: float = defaults.CONTROL_MAX_SPREAD
) -> float | None:
    if key not in body:
        return default
    try:
        seconds = parse_window(body[key])
    except ValueError as exc:
        raise ControlError(f"{key}: {exc}") from None
    if seconds > limit:
        raise ControlError(f"{key}: at most {limit:g}s")
    return seconds


def _only(body: Mapping[str, Any], allowed: Sequence[str]) -> None:
    if not isinstance(body, Mapping):
        raise ControlError("expected a JSON object")
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise ControlError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(allowed)}")


@dataclass(frozen=True, slots=True)
class Selector:
    """Which open sessions a request means: every given field must match (none given: all)."""

    pool: str | None = None
    backend: str | None = None  # host:port as the config spells it
    client: str | None = None  # an address ("10.0.0.7") or address:port
    route: str | None = None  # a path prefix of the session's request
    older_than: float | None = None  # seconds

    @classmethod
    def parse(cls, raw: Any) -> Selector:
        if raw is None:
            return cls()
        _only(raw, ("pool", "backend", "client", "route", "older_than"))
        return cls(
            pool=_text(raw, "pool"),
            backend=_text(raw, "backend"),
            client=_text(raw, "client"),
            route=_text(raw, "route"),
            older_than=_duration(raw, "older_than", None, MAX_DURATION),
        )

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.pool, self.backend, self.client, self.route, self.older_than))

    def matches(self, *, pool: str | None, backend: str | None, client: str, path: str | None, age: float) -> bool:
        """`client` is "host:port" ("[v6]:port" for IPv6), as the status page shows it."""
        if self.pool is not None and pool != self.pool:
            return False
        if self.backend is not None and backend != self.backend:
            return False
        if self.client is not None and client != self.client and client_host(client) != self.client.strip("[]"):
            return False
        if self.route is not None and (path is None or not path.startswith(self.route)):
            return False
        return self.older_than is None or age >= self.older_than


def client_host(client: str) -> str:
    """The address part of "host:port" / "[v6]:port"."""
    if client.startswith("["):
        return client[1:].split("]", 1)[0]
    return client.rsplit(":", 1)[0]


@dataclass(frozen=True, slots=True)
class BackendStateRequest:
    pool: str
    backend: str
    state: str
    weight: int | None = None
    spread: float | None = None  # maint: None means reload.drain_window

    @classmethod
    def parse(cls, body: Any) -> BackendStateRequest:
        _only(body, ("pool", "backend", "state", "weight", "spread"))
        state = _text(body, "state", required=True)
        if state not in ADMIN_STATES:
            raise ControlError(f"state: expected one of {', '.join(ADMIN_STATES)}, got {state!r}")
        weight = body.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT
        ):
            raise ControlError(f"weight: expected a whole number 1..{MAX_WEIGHT}, got {weight!r}")
        pool, backend = _text(body, "pool", required=True), _text(body, "backend", required=True)
        assert pool is not None and backend is not None and state is not None
        return cls(pool=pool, backend=backend, state=state, weight=weight, spread=_duration(body, "spread", None))


@dataclass(frozen=True, slots=True)
class CloseRequest:
    selector: Selector
    code: int
    reason: str
    spread: float

    @classmethod
    def parse(cls, body: Any) -> CloseRequest:
        _only(body, ("selector", "code", "reason", "spread"))
        code = body.get("code", 1000)
        if isinstance(code, bool) or not isinstance(code, int) or not CLOSE_CODE_MIN <= code <= CLOSE_CODE_MAX:
            raise ControlError(f"code: expected a close code {CLOSE_CODE_MIN}..{CLOSE_CODE_MAX}, got {code!r}")
        if code in FORBIDDEN_CLOSE_CODES or 1016 <= code <= 2999:
            raise ControlError(f"code: {code} may not be sent in a close frame")
        reason = body.get("reason", "closed by the operator")
        if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
            raise ControlError(f"reason: expected a string of at most {MAX_REASON_BYTES} bytes")
        spread = _duration(body, "spread", 0.0)
        assert spread is not None
        return cls(selector=Selector.parse(body.get("selector")), code=code, reason=reason, spread=spread)


@dataclass(frozen=True, slots=True)
class RebalanceRequest:
    pool: str
    percent: float
    over: float
    backend: str | None = None  # None: the most loaded backends

    @classmethod
    def parse(cls, body: Any) -> RebalanceRequest:
        _only(body, ("pool", "backend", "percent", "over"))
        percent = body.get("percent")
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100:
            raise ControlError(f"percent: expected a number in (0, 100], got {percent!r}")
        pool = _text(body, "pool", required=True)
        assert pool is not None
        over = _duration(body, "over", 0.0)
        assert over is not None
        return cls(pool=pool, percent=float(percent), over=over, backend=_text(body, "backend"))


# --- rebalancing -----------------------------------------------------------------------------


def rebalance_quota(loads: Sequence[tuple[int, int]], percent: float, only: int | None = None) -> list[int]:
    """How many sessions to move off each backend, given (open sessions, weight) per backend.

    With `only` (an index), that backend gives `percent` of its own sessions. Otherwise
    `percent` of the pool's sessions are taken one at a time from whichever backend has the
    most sessions per weight at that point, so the most loaded backends give first and the
    pool ends as level as the share allows. Rounded up: asking for any share of a non-empty
    backend moves at least one session.
    """
    quota = [0] * len(loads)
    if only is not None:
        quota[only] = math.ceil(loads[only][0] * percent / 100)
        return quota
    left = [active for active, _ in loads]
    for _ in range(math.ceil(sum(left) * percent / 100)):
        i = max(range(len(loads)), key=lambda k: (left[k] / max(loads[k][1], 1), -k))
        if left[i] <= 0:
            break
        left[i] -= 1
        quota[i] += 1
    return quota
