"""The one small interface every balancing policy implements.

A policy orders a pool's backends for one new session: `candidates(key)` yields them in
preference order, so retrying the next backend is the caller walking the iterator (Pingora's
shape). Active-session counts live on `Backend` and change only through `Pool.acquire`, a
context manager, so a session that crashes can never leak a count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from wsproxy.config import BackendConfig, PoolConfig
from wsproxy.policy.control import BackendAdmin
from wsproxy.policy.health import BackendHealth


class Backend:
    """A backend's live state inside one pool."""

    __slots__ = ("active", "address", "admin", "config", "health", "index", "name", "weight")

    def __init__(self, config: BackendConfig, index: int, health: BackendHealth | None = None) -> None:
        self.health = health if health is not None else BackendHealth()  # survives reloads with the object
        self.admin = BackendAdmin()  # the operator's ready/drain/maint: survives reloads with the object
        self.config = config
        self.address = config.address
        self.name = config.name
        self.weight = config.weight
        self.index = index
        self.active = 0

    def __repr__(self) -> str:
        return f"Backend({self.name}, weight={self.weight}, active={self.active})"

    @property
    def full(self) -> bool:
        """At its `max_sessions`: the balancer skips it rather than accept and drop a session."""
        cap = self.config.max_sessions
        return cap is not None and self.active >= cap


class Policy(ABC):
    """Orders backends for a new session. Policies read `Backend.active`, never change it."""

    def __init__(self, backends: Sequence[Backend], config: PoolConfig) -> None:
        self.backends = list(backends)
        self.config = config

    @abstractmethod
    def candidates(self, key: bytes | None = None, weights: Sequence[float] | None = None) -> Iterator[Backend]:
        """Every backend at most once, most preferred first. `key` is the hash key, if any.

        `weights` (one per backend, by position; None: every backend at its configured weight)
        are the effective weights from health: 0 means unavailable, never yielded; less than the
        configured weight means ramping up after a recovery (slow start).
        """


class Pool:
    """A pool's backends, its policy and the acquire/release pairing."""

    __slots__ = ("backends", "config", "name", "policy")

    def __init__(self, config: PoolConfig, policy_cls: type[Policy], previous: Pool | None = None) -> None:
        self.config = config
        self.name = config.name
        self.backends = [Backend(b, i) for i, b in enumerate(config.backends)]
        if previous is not None:
            self._carry_over(previous)
        for b in self.backends:
            b.health.configure(config.health, config.passive)
        self.policy = policy_cls(self.backends, config)

    def _carry_over(self, previous: Pool) -> None:
        """Keep the live objects of backends that survive a reload (same address), so their
        active counts and health go on; their config (weight) is the new one."""
        old = {b.address: b for b in previous.backends}
        for i, fresh in enumerate(self.backends):
            kept = old.get(fresh.address)
            if kept is not None:
                weight = kept.admin.weight if kept.admin.weight is not None else fresh.weight  # set at runtime
                kept.config, kept.name, kept.weight, kept.index = fresh.config, fresh.name, weight, i
                self.backends[i] = kept

    def candidates(self, key: bytes | None = None, now: float | None = None) -> Iterator[Backend]:
        """The policy's order; with `now`, only backends healthy at `now`, at their slow-start weight.
        A full backend (`Backend.full`) or one an operator drains is skipped, judged when the walk
        reaches it."""
        ordered = self.policy.candidates(key, None if now is None else self.effective_weights(now))
        return (b for b in ordered if not b.full and b.admin.accepting)

    def find(self, name: str) -> Backend | None:
        """The backend called `name` (host:port as the config spells it)."""
        return next((b for b in self.backends if b.name == name), None)

    def set_weight(self, backend: Backend, weight: int) -> None:
        """A weight set at runtime: kept across reloads while the backend stays; the policy is
        rebuilt, since some (consistent hashing) place backends by weight."""
        backend.admin.weight = weight
        backend.weight = weight
        self.policy = type(self.policy)(self.backends, self.config)

    def effective_weights(self, now: float) -> list[float] | None:
        """Each backend's weight * its health factor; None while every backend is at full weight."""
        backends = self.backends
        for b in backends:
            if b.health.full_at > now:
                break
        else:
            return None
        return [b.weight if b.health.full_at <= now else b.weight * b.health.weight_factor(now) for b in backends]

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    def acquire(self, backend: Backend) -> Lease:
        """Count a session on `backend` until the lease is released (or its block ends)."""
        return Lease(backend)


class Lease:
    """One session counted on a backend. A plain object rather than a generator context
    manager: an idle session holds its lease for hours, and this is 56 bytes, not 600."""

    __slots__ = ("backend",)

    def __init__(self, backend: Backend) -> None:
        backend.active += 1
        self.backend: Backend | None = backend

    def release(self) -> None:
        """Stop counting; harmless when already released."""
        if self.backend is not None:
            self.backend.active -= 1
            self.backend = None

    def __enter__(self) -> Backend:
        assert self.backend is not None
        return self.backend

    def __exit__(self, *exc: object) -> None:
        self.release()
