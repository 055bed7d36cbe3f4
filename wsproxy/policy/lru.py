"""Bounded tables for state keyed by something a client chooses (its IP, its credentials).

Anything keyed by client input grows with the number of distinct keys an attacker can make up,
so every such table here has a fixed maximum number of entries and evicts the least recently
used one to admit a new key. `TTLCache` adds an expiry passed in as `now` (pure: no clock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUTable(Generic[K, V]):
    """A mapping of at most `max_entries` keys; adding one more evicts the least recently used."""

    __slots__ = ("_data", "evictions", "max_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._data: OrderedDict[K, V] = OrderedDict()
        self.evictions = 0  # how many entries were pushed out to make room (a metric)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def get(self, key: K) -> V | None:
        """The value, marked as just used; None if absent."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Insert or replace, as the most recently used; evict the oldest beyond the bound."""
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.max_entries:
            data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def oldest(self) -> tuple[K, V] | None:
        """The least recently used entry, without touching it."""
        for key, value in self._data.items():
            return key, value
        return None


class TTLCache(Generic[K, V]):
    """An `LRUTable` whose entries also expire `ttl` seconds after they were stored."""

    __slots__ = ("_table", "ttl")

    def __init__(self, max_entries: int, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._table: LRUTable[K, tuple[float, V]] = LRUTable(max_entries)
        self.ttl = ttl

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: K, now: float) -> V | None:
        entry = self._table.get(key)
        if entry is None:
            return None
        expires, value = entry
        if now >= expires:
            self._table.pop(key)
            return None
        return value

    def put(self, key: K, value: V, now: float) -> None:
        self._expire(now)
        self._table.put(key, (now + self.ttl, value))

    def _expire(self, now: float) -> None:
        """Drop a few expired entries from the least recently used end, so dead ones do not pile up."""
        for _ in range(8):
            oldest = self._table.oldest()
            if oldest is None or oldest[1][0] > now:
                return
            self._table.pop(oldest[0])
