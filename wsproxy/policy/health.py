"""A backend's health as a pure state machine: active rise/fall, passive ejection, slow start.

Two independent verdicts make a backend unavailable for new sessions:

- **down**, from the active checks (HAProxy's rise/fall counters): `fall` failed checks in a row
  mark an up backend down, `rise` passed checks in a row mark it up again. A backend starts up,
  so a proxy that just started serves at once.
- **ejected**, from real sessions (passive): `failures` failed attempts in a row, all within
  `window`, eject the backend for `eject_for`. A backend ejected again within `max_eject_for`
  of its last ejection ending is ejected for twice as long as last time, up to `max_eject_for`.
  What counts as a failed attempt is the proxy's own verdict on the backend: the connect failed
  or timed out, the backend did not answer the Upgrade in time, or its answer was not a valid
  101. A normal HTTP response (401, 404, even a 5xx) is not: the backend is alive, and counting
  answers a client can provoke would let any client eject every backend.

With active checks, a passive ejection also ends when the checks say the backend is back:
`rise` passed checks in a row, all after the ejection began, end it early (Envoy's
`successful_active_health_check_uneject_host`; HAProxy brings a server back through its checks the
same way). A backend restarted after a crash then takes sessions as soon as its checks pass,
not `eject_for` later. Without active checks only the ejection's time ends it.

A backend that becomes available again (up after down, or at the end of an ejection) gets a
weight ramping linearly from almost 0 to its full weight over `slow_start`, so a cold backend
is not handed its full share in one burst. Everything is a function of `now`, passed in; the
trio shell (health_check.py, session.py) owns the clock and the sockets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from wsproxy.config import ActiveHealth, PassiveHealth

UP = "up"
DOWN = "down"
EJECTED = "ejected"
SLOW_START = "slow_start"

# The smallest share of its weight a ramping backend gets: never 0, so the first sessions on it
# still happen (and prove it works) instead of waiting for the ramp to reach some threshold.
SLOW_START_FLOOR = 0.01
# Each check waits interval * (1 ± JITTER), so backends checked together drift apart.
JITTER = 0.1
RETRY_AFTER_MAX = 3600


@dataclass(frozen=True, slots=True)
class Change:
    """A transition worth a log line: the new state and why."""

    state: str  # UP, DOWN or EJECTED
    reason: str
    duration: float = 0.0  # EJECTED: for how long


class BackendHealth:
    """The live health of one backend; readable by metrics (`state`, `status(now)`, `last_*`)."""

    __slots__ = (
        "_fail_streak",
        "_failures",
        "_ok_streak",
        "active",
        "back_since",
        "checks_failed",
        "checks_passed",
        "ejected_until",
        "ejections",
        "full_at",
        "last_change",
        "last_ejection",
        "last_error",
        "passive",
        "state",
    )

    def __init__(self, active: ActiveHealth | None = None, passive: PassiveHealth | None = None) -> None:
        self.active = active
        self.passive = passive
        self.state = UP
        self.last_change: float | None = None  # when `state` or the ejection last changed
        self.last_error: str | None = None  # the latest failed check or attempt, for operators
        self.back_since: float | None = None  # when it last became available again (slow start)
        self.ejected_until = -math.inf
        self.ejections = 0  # repeat-offender level: the next ejection lasts eject_for * 2^ejections
        self.last_ejection: float | None = None  # duration of the latest ejection
        self.checks_passed = 0
        self.checks_failed = 0
        self._ok_streak = 0
        self._fail_streak = 0
        self._failures: deque[float] = deque()
        self.full_at = -math.inf  # from when on it is at full weight (kept current by every transition)

    def configure(self, active: ActiveHealth | None, passive: PassiveHealth | None) -> None:
        """New settings (a reload). Without active checks nothing could mark it up: it is up."""
        if active is None and self.state == DOWN:
            self.state = UP
            self._ok_streak = self._fail_streak = 0
        if passive is None:
            self.ejected_until = -math.inf
            self.ejections = 0
            self._failures.clear()
        self.active = active
        self.passive = passive
        self._refresh()

    def joined(self, now: float) -> None:
        """Added to a running pool (by a reload or a DNS answer): ramp up over `slow_start`, as a
        backend back from down does, instead of taking its full share of new sessions at once."""
        self.back_since = now
        self._refresh()

    # --- what the balancer asks ---------------------------------------------------------------

    def available(self, now: float) -> bool:
        return self.state == UP and now >= self.ejected_until

    def weight_factor(self, now: float) -> float:
        """0 when unavailable, SLOW_START_FLOOR..1 while ramping, else 1."""
        if self.state != UP or now < self.ejected_until:
            return 0.0
        ramp = self.active.slow_start if self.active is not None else None
        since = max(self.back_since if self.back_since is not None else -math.inf, self.ejected_until)
        if ramp is None or since == -math.inf or now - since >= ramp:
            return 1.0
        return max((now - since) / ramp, SLOW_START_FLOOR)

    def _refresh(self) -> None:
        """Recompute `full_at` (an attribute, not a method: the pool reads it on every pick)."""
        if self.state != UP:
            self.full_at = math.inf
            return
        ramp = self.active.slow_start if self.active is not None else None
        since = max(self.back_since if self.back_since is not None else -math.inf, self.ejected_until)
        self.full_at = since + (ramp or 0.0)

    def status(self, now: float) -> str:
        """One word for the status page and metrics: down, ejected, slow_start or up."""
        if self.state == DOWN:
            return DOWN
        if now < self.ejected_until:
            return EJECTED
        return SLOW_START if self.weight_factor(now) < 1.0 else UP

    def restart_ramp(self, now: float) -> None:
        """Back in service after an operator's drain or maintenance: ramp up from `now` again
        (slow start, when configured) instead of taking its full share at once."""
        if self.state == UP:
            self.back_since = now
            self._refresh()

    def available_in(self, now: float) -> float:
        """Seconds until it may take sessions again (an estimate for Retry-After); 0 if it can now."""
        ejected_for = self.ejected_until - now
        if self.state != DOWN and ejected_for <= 0:
            return 0.0
        checks = math.inf
        if self.active is not None:  # `rise` passed checks end a down state and an ejection alike
            checks = self.active.interval * max(1, self.active.rise - self._ok_streak)
        if self.state == DOWN:
            return checks if self.active is not None else 1.0
        return max(min(checks, ejected_for), 0.0)

    # --- active checks ---------------------------------------------------------------------------

    def check_passed(self, now: float) -> Change | None:
        self.checks_passed += 1
        self._fail_streak = 0
        ejected = now < self.ejected_until
        if self.state == UP and not ejected:
            return None
        self._ok_streak += 1
        rise = self.active.rise if self.active is not None else 1
        if self._ok_streak < rise:
            return None
        was_down = self.state == DOWN
        self.state = UP
        self._ok_streak = 0
        self.last_change = now
        self.back_since = now
        if ejected:  # the checks outrank the ejection's clock: the backend is back
            self.ejected_until = now
        self._refresh()
        if was_down:
            return Change(UP, f"{rise} check(s) passed in a row")
        return Change(UP, f"{rise} check(s) passed in a row since its ejection: ejection ended early")

    def check_failed(self, now: float, reason: str) -> Change | None:
        self.checks_failed += 1
        self.last_error = reason
        self._ok_streak = 0
        if self.state == DOWN:
            return None
        self._fail_streak += 1
        fall = self.active.fall if self.active is not None else 1
        if self._fail_streak < fall:
            return None
        self.state = DOWN
        self._fail_streak = 0
        self.last_change = now
        self._refresh()
        return Change(DOWN, f"{fall} check(s) failed in a row, last: {reason}")

    # --- passive: real sessions' attempts ------------------------------------------------------

    def attempt_succeeded(self, now: float) -> None:
        """The backend answered a real session (a 101 or a normal HTTP response)."""
        self._failures.clear()

    def attempt_failed(self, now: float, reason: str) -> Change | None:
        """A real session's connect or handshake failed on this backend; maybe eject it."""
        self.last_error = reason
        p = self.passive
        if p is None or now < self.ejected_until:
            return None  # off, or already ejected: failures of attempts started before don't extend it
        failures = self._failures
        failures.append(now)
        while failures and now - failures[0] > p.window:
            failures.popleft()
        while len(failures) > p.failures:
            failures.popleft()
        if len(failures) < p.failures:
            return None
        failures.clear()
        if self.last_ejection is not None and now - self.ejected_until > p.max_eject_for:
            self.ejections = 0  # well-behaved long enough: a first offender again
        duration = ejection_duration(p, self.ejections)
        self.ejections += 1
        self.last_ejection = duration
        self.ejected_until = now + duration
        self._ok_streak = 0  # only checks passed after the ejection began may end it early
        self.last_change = now
        self._refresh()
        return Change(
            EJECTED,
            f"{p.failures} failed attempt(s) in a row within {p.window:g}s, last: {reason}",
            duration=duration,
        )


def ejection_duration(passive: PassiveHealth, level: int) -> float:
    """eject_for * 2^level, capped at max_eject_for."""
    if level >= 64:
        return passive.max_eject_for
    return min(passive.eject_for * (1 << level), passive.max_eject_for)


def jittered(interval: float, unit_random: float) -> float:
    """The wait before the next check: interval * (1 ± JITTER), from a value in [0, 1)."""
    return interval * (1.0 + JITTER * (2.0 * unit_random - 1.0))


def retry_after(healths: Iterable[BackendHealth], now: float) -> int:
    """Whole seconds (1..RETRY_AFTER_MAX) until some backend may take sessions again."""
    soonest = min((h.available_in(now) for h in healths), default=1.0)
    return int(min(max(math.ceil(soonest), 1), RETRY_AFTER_MAX))
