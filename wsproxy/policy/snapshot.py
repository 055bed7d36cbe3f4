"""One immutable view of the configuration plus the live pools built from it.

A session holds the snapshot it started with; a reload builds a new one and swaps a single
reference, so nothing a session depends on changes under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsproxy.config import Config
from wsproxy.policy.balancing import Pool, build_pool


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    pools: dict[str, Pool]

    @classmethod
    def build(cls, config: Config, previous: Snapshot | None = None) -> Snapshot:
        """A snapshot for `config`. On reload, pass the running one: backends that stay keep
        their live objects (active sessions, health), so nothing about them resets."""
        old = previous.pools if previous is not None else {}
        return cls(config=config, pools={name: build_pool(p, old.get(name)) for name, p in config.pools.items()})
