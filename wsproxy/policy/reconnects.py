"""Reconnect tracking, pure: was a new session's client here a moment ago?

A reconnect wave (clients dropped and coming straight back) shows in the rate of new sessions
from clients that had a session close within `observability.reconnect_window`, well before the
backends feel it. A client is its address, or its sticky cookie when the pool hashes on one
(many clients behind one NAT address then still count apart). Closes are remembered in a
bounded LRU table (lru.py), so a flood of distinct clients cannot grow memory: the oldest close
is forgotten first, which at worst misses a reconnect. Counts are kept by (pool, backend) of the
new session: labels from the config, so bounded.
"""

from __future__ import annotations

from collections import Counter

from wsproxy.policy.lru import LRUTable


class ReconnectTable:
    """Recent closes by client key, and the reconnects counted from them."""

    __slots__ = ("_closes", "counts", "window")

    def __init__(self, window: float, max_clients: int) -> None:
        self.window = window
        self._closes: LRUTable[str, float] = LRUTable(max_clients)
        self.counts: Counter[tuple[str, str]] = Counter()  # (pool, backend) -> reconnects

    def __len__(self) -> int:
        return len(self._closes)

    @property
    def max_clients(self) -> int:
        return self._closes.max_entries

    def resize(self, window: float, max_clients: int) -> None:
        """New settings (a reload): the window applies at once; a smaller table drops the oldest."""
        self.window = window
        if max_clients != self._closes.max_entries:
            old = self._closes
            self._closes = LRUTable(max_clients)
            for key in list(old):  # oldest first, so the newest are the ones kept
                stamp = old.get(key)
                if stamp is not None:
                    self._closes.put(key, stamp)

    def closed(self, key: str, now: float) -> None:
        """A session of `key` ended at `now`."""
        self._closes.put(key, now)

    def opened(self, key: str, pool: str, backend: str, now: float) -> bool:
        """A new session of `key` began at `now`: True (and counted) if it is a reconnect."""
        when = self._closes.pop(key)
        if when is None or now - when > self.window:
            return False
        self.counts[(pool, backend)] += 1
        return True
