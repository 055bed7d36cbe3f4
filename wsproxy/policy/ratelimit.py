"""Token buckets for handshake and traffic rates: pure, with the time passed in as `now`.

Three users: the per-IP handshake rate (a bounded table of buckets, one per client address,
where an empty bucket means 429), and a session's message and byte rates (`FlowLimiter`), where
going over the rate is not refused but held: the relay acts on what the budget allows (whole
messages, bytes), holds the rest of the read, and the session reads no more until the budget
allows again (TCP backpressure); a sender that stays held for `close_after` seconds is closed.
Buckets start full, refill continuously at `rate` per second up to `burst`.
"""

from __future__ import annotations

import math

from wsproxy.policy.lru import LRUTable


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst > 0 and math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError("rate and burst must be positive and finite")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:  # a clock that steps back refills nothing (and takes nothing back)
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens if there are that many: 0.0. Else take nothing and return the
        seconds until there will be (a cost over `burst` never fits: infinity)."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        if cost > self.burst:
            return math.inf
        return (cost - self.tokens) / self.rate

    def charge(self, now: float, cost: float) -> float:
        """Take `cost` tokens even into debt; return the seconds until the debt is repaid."""
        self._refill(now)
        self.tokens -= cost
        return self.wait(now)

    def wait(self, now: float, need: float = 0.0) -> float:
        """Seconds until the bucket holds `need` tokens (by default: until it is out of debt)."""
        self._refill(now)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def whole(self, now: float) -> int:
        """The whole tokens there are now (0 in debt); a token short by a rounding error counts."""
        self._refill(now)
        return max(0, math.floor(self.tokens + 1e-9))

    def full(self, now: float) -> bool:
        """A full bucket is the same as a fresh one: its entry may be forgotten."""
        self._refill(now)
        return self.tokens >= self.burst


class KeyedBuckets:
    """One bucket per key (a client IP) in a table of at most `max_entries` keys.

    A flood of distinct addresses cannot grow memory: the least recently seen key is forgotten
    to make room. Forgetting a key only forgives it (its next bucket starts full), and the least
    recently seen key is the one most likely to have refilled anyway.
    """

    __slots__ = ("burst", "rate", "table")

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        TokenBucket(rate, burst, 0.0)  # validate once, here
        self.rate = rate
        self.burst = burst
        self.table: LRUTable[str, TokenBucket] = LRUTable(max_entries)

    def __len__(self) -> int:
        return len(self.table)

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """As `TokenBucket.take`, for `key`'s bucket."""
        bucket = self.table.get(key)
        if bucket is None:
            oldest = self.table.oldest()
            if oldest is not None and oldest[1].full(now):
                self.table.pop(oldest[0])  # as good as absent: free its slot before evicting anyone
            bucket = TokenBucket(self.rate, self.burst, now)
            self.table.put(key, bucket)
        return bucket.take(now, cost)


class FlowLimiter:
    """One session's message and byte budget in one direction (client to backend).

    `allowance` is what the relay may act on now (whole messages, bytes); `charge` records what
    it did, and whether it had to hold the rest of the input back; `pause` says how long the
    reader must now wait (0.0: read on) or None when the sender has been over its rate for
    `close_after` seconds without a break and must be closed. "Without a break" means the input
    stayed held back, or every new read that carried something went over: a sender that is over
    its rate only in bursts gets slowed, never closed.
    """

    __slots__ = ("_buckets", "close_after", "limited_since")

    def __init__(
        self,
        *,
        now: float,
        messages: tuple[float, float] | None = None,
        nbytes: tuple[float, float] | None = None,
        close_after: float | None = None,
    ) -> None:
        self._buckets: list[tuple[str, TokenBucket]] = []
        if messages is not None:
            self._buckets.append(("messages", TokenBucket(messages[0], messages[1], now)))
        if nbytes is not None:
            self._buckets.append(("bytes", TokenBucket(nbytes[0], nbytes[1], now)))
        self.close_after = close_after
        self.limited_since: float | None = None  # start of the current run of reads in debt

    @property
    def active(self) -> bool:
        return bool(self._buckets)

    def allowance(self, now: float) -> tuple[int | None, int | None]:
        """(messages, bytes) the relay may act on now: the whole tokens (None: no such limit)."""
        messages = nbytes = None
        for kind, bucket in self._buckets:
            if kind == "messages":
                messages = bucket.whole(now)
            else:
                nbytes = bucket.whole(now)
        return messages, nbytes

    def charge(self, now: float, *, messages: int, nbytes: int, held: bool = False, fresh: bool = True) -> None:
        """The relay acted on `nbytes` bytes and completed `messages` messages; `held`: it held
        the rest of the input back (over the budget); `fresh`: that was a new read (not held
        input resumed), which may end a run of limiting."""
        charged = False
        in_debt = False
        for kind, bucket in self._buckets:
            cost = messages if kind == "messages" else nbytes
            if cost:
                charged = True
                in_debt = bucket.charge(now, cost) > 0 or in_debt
            else:
                in_debt = bucket.wait(now) > 0 or in_debt
        if in_debt or held:
            if self.limited_since is None:
                self.limited_since = now
        elif charged and fresh:
            self.limited_since = None  # this read fitted in the budget: the run of limiting ends

    def pause(self, now: float, *, wanted: int = 0) -> float | None:
        """Seconds to stop reading before the next read (0.0: none), or None: close the sender.
        `wanted`: bytes held back: wait until each spent bucket allows one message, or
        min(burst, wanted) bytes; else until no bucket is in debt."""
        wait = 0.0
        for kind, bucket in self._buckets:
            need = 0.0
            if wanted and bucket.whole(now) == 0:
                need = 1.0 if kind == "messages" else min(bucket.burst, float(wanted))
            wait = max(wait, bucket.wait(now, need))
        if wait <= 0:
            return 0.0
        if self.close_after is None or self.limited_since is None:
            return wait
        left = self.limited_since + self.close_after - now
        if left <= 0:
            return None
        return min(wait, left)
