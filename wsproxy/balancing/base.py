"""The one small interface every balancing policy implements.

A policy orders a pool's backends for one new session: `candidates(key)` yields them in
preference order, so retrying the next backend is the caller walking the iterator (Pingora's
shape). Active-session counts live on `Backend` and change only through `Pool.acquire`, a
context manager, so a session that crashes can never leak a count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from wsproxy.config import BackendConfig, PoolConfig


class Backend:
    """A backend's live state inside one pool."""

    __slots__ = ("active", "address", "config", "index", "name", "weight")

    def __init__(self, config: BackendConfig, index: int) -> None:
        self.config = config
        self.address = config.address
        self.name = config.name
        self.weight = config.weight
        self.index = index
        self.active = 0

    def __repr__(self) -> str:
        return f"Backend({self.name}, weight={self.weight}, active={self.active})"


class Policy(ABC):
    """Orders backends for a new session. Policies read `Backend.active`, never change it."""

    def __init__(self, backends: Sequence[Backend], config: PoolConfig) -> None:
        self.backends = list(backends)
        self.config = config

    @abstractmethod
    def candidates(self, key: bytes | None = None) -> Iterator[Backend]:
        """Every backend at most once, most preferred first. `key` is the hash key, if any."""


class Pool:
    """A pool's backends, its policy and the acquire/release pairing."""

    __slots__ = ("backends", "config", "name", "policy")

    def __init__(self, config: PoolConfig, policy_cls: type[Policy]) -> None:
        self.config = config
        self.name = config.name
        self.backends = [Backend(b, i) for i, b in enumerate(config.backends)]
        self.policy = policy_cls(self.backends, config)

    def candidates(self, key: bytes | None = None) -> Iterator[Backend]:
        return self.policy.candidates(key)

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    @contextmanager
    def acquire(self, backend: Backend) -> Iterator[Backend]:
        """Count a session on `backend` for as long as the block runs."""
        backend.active += 1
        try:
            yield backend
        finally:
            backend.active -= 1
