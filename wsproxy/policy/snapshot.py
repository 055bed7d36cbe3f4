"""One immutable view of the configuration plus the live pools built from it.

A session holds the snapshot it started with; a reload builds a new one and swaps a single
reference, so nothing a session depends on changes under it. The affinity secret (sticky.py)
belongs to the proxy, not to one config: a reload carries it over, so cookies stay valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from wsproxy.config import Config
from wsproxy.policy.balancing import Pool, build_pool

SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    pools: dict[str, Pool]
    secret: bytes = field(default=b"", repr=False)  # the affinity cookies' HMAC key

    @classmethod
    def build(cls, config: Config, previous: Snapshot | None = None, *, secret: bytes | None = None) -> Snapshot:
        """A snapshot for `config`. On reload, pass the running one: backends that stay keep
        their live objects (active sessions, health), so nothing about them resets, and the
        affinity secret stays. `secret`: the one this proxy's workers share (else a random one)."""
        old = previous.pools if previous is not None else {}
        if secret is None:
            secret = previous.secret if previous is not None else os.urandom(SECRET_BYTES)
        pools = {name: build_pool(p, old.get(name)) for name, p in config.pools.items()}
        return cls(config=config, pools=pools, secret=secret)

    def sticky_secret(self, pool: str) -> bytes:
        """The HMAC key of `pool`'s affinity cookie: its configured secret, else the proxy's."""
        spec = self.config.pools[pool].sticky if pool in self.config.pools else None
        return spec.secret if spec is not None and spec.secret is not None else self.secret
