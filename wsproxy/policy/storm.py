"""The storm shield: a budget of new upgrades, global and per pool, pure.

When thousands of clients reconnect at once (a backend restart, a network blip), admitting them
all at the rate they arrive moves the storm onto the backends. `StormShield` holds one token
bucket (ratelimit.py's) for all upgrades and one per configured pool; an upgrade over either
budget is refused with 503 and a `Retry-After` drawn at random over `retry_after_spread`
seconds, so the clients told to come back do not all come back in the same second. Refusals
are summed and reported at most once per `STORM_LOG_INTERVAL` (the shell logs them), never per
request. Time and randomness come in from the caller.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from wsproxy.config import AdmissionConfig, defaults
from wsproxy.policy.ratelimit import TokenBucket

GLOBAL = "*"  # the `pool` label of refusals by the global budget


def spread_retry_after(spread: float, unit_random: float) -> int:
    """Whole seconds 1..ceil(spread), uniform from a value in [0, 1)."""
    top = max(1, math.ceil(spread))
    return 1 + min(int(min(max(unit_random, 0.0), 0.999999) * top), top - 1)


class StormShield:
    """Upgrade budgets of one server; rebuilt (refilled) when a reload changes them."""

    __slots__ = (
        "_admitted_since",
        "_config",
        "_global",
        "_last_log",
        "_per_pool",
        "_unlogged",
        "admitted",
        "refused",
    )

    def __init__(self) -> None:
        self._config: AdmissionConfig | None = None
        self._global: TokenBucket | None = None
        self._per_pool: dict[str, TokenBucket] = {}
        self.refused: Counter[str] = Counter()  # by pool (GLOBAL: the global budget): a metric
        self.admitted: Counter[str] = Counter()  # upgrades that passed the budgets, by pool
        self._unlogged: Counter[str] = Counter()
        self._last_log: float | None = None
        self._admitted_since = 0

    def configure(self, config: AdmissionConfig, now: float) -> None:
        if config is self._config or config == self._config:
            return
        self._config = config
        up = config.upgrades
        self._global = TokenBucket(up.rate, up.burst, now) if up is not None else None
        self._per_pool = {name: TokenBucket(r.rate, r.burst, now) for name, r in config.per_pool.items()}

    def admit(self, pool: str, now: float, unit_random: float) -> int | None:
        """None: the upgrade may go on (a token taken from each budget). Else the Retry-After
        (whole seconds) of the 503; nothing is taken from a budget the upgrade did not pass."""
        config = self._config
        if config is None:
            return None
        which = None
        if self._global is not None and self._global.take(now) > 0.0:
            which = GLOBAL
        else:
            bucket = self._per_pool.get(pool)
            if bucket is not None and bucket.take(now) > 0.0:
                which = pool
                if self._global is not None:
                    self._global.tokens += 1.0  # refused after all: the global token goes back
        if which is None:
            self.admitted[pool] += 1
            self._admitted_since += 1
            return None
        self.refused[which] += 1
        self._unlogged[which] += 1
        return spread_retry_after(config.retry_after_spread, unit_random)

    def log_due(self, now: float) -> StormReport | None:
        """What happened since the last report, once STORM_LOG_INTERVAL has passed and something
        was refused (else None). The first refusal opens the first interval."""
        if not self._unlogged:
            return None
        if self._last_log is None:
            self._last_log = now
            return None
        if now - self._last_log < defaults.STORM_LOG_INTERVAL:
            return None
        report = StormReport(dict(self._unlogged), self._admitted_since, now - self._last_log)
        self._unlogged.clear()
        self._admitted_since = 0
        self._last_log = now
        return report


@dataclass(frozen=True, slots=True)
class StormReport:
    """One log line's worth: refusals by pool (GLOBAL: the global budget) and upgrades admitted
    over the last `seconds`."""

    refused: dict[str, int]
    admitted: int
    seconds: float
