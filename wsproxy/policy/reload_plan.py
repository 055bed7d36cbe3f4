"""What a reload changes, decided from two configs alone, and how closes are spread over time.

The server applies a plan; deciding it needs no sockets. Listeners are identified by address: one
whose address stays keeps its socket (no refused connect during a reload) and serves new
connections with its new settings (listeners on port 0, an ephemeral port, are matched by their
position instead, since several may share that address). A backend is identified by (pool, address): sessions on a pair
that the new config no longer has are closed with 1012, spread over the drain window so their
clients do not reconnect in one wave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsproxy.config import Address, Config, ListenerConfig

ListenerKey = Address | tuple[Address, int]


def listener_keys(config: Config) -> dict[ListenerKey, ListenerConfig]:
    """Each listener by its identity across reloads: its address, or (address, position) for port 0."""
    return {(lst.address if lst.address.port else (lst.address, i)): lst for i, lst in enumerate(config.listeners)}


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    open: tuple[tuple[ListenerKey, ListenerConfig], ...]  # listeners on new addresses
    close: tuple[ListenerKey, ...]  # addresses no longer listened on
    keep: tuple[tuple[ListenerKey, ListenerConfig], ...]  # same address: the socket stays, new settings apply
    removed: frozenset[tuple[str, Address]]  # (pool, backend address) gone from the config
    added: frozenset[tuple[str, Address]] = frozenset()  # (pool, backend address) new in the config

    def drops(self, pool: str | None, backend: Address | None) -> bool:
        """Must a session relayed to `backend` of `pool` close?"""
        return pool is not None and backend is not None and (pool, backend) in self.removed

    def describe(self) -> str:
        return (
            f"{len(self.open)} listener(s) opened, {len(self.close)} closed, {len(self.keep)} kept; "
            f"{len(self.removed)} backend(s) removed"
        )


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    old_keys, new_keys = listener_keys(old), listener_keys(new)
    removed = frozenset(
        (pool_name, backend.address)
        for pool_name, pool in old.pools.items()
        for backend in pool.backends
        if pool_name not in new.pools or backend.address not in {b.address for b in new.pools[pool_name].backends}
    )
    added = frozenset(
        (pool_name, backend.address)
        for pool_name, pool in new.pools.items()
        for backend in pool.backends
        if pool_name not in old.pools or backend.address not in {b.address for b in old.pools[pool_name].backends}
    )
    return ReloadPlan(
        open=tuple((k, lst) for k, lst in new_keys.items() if k not in old_keys),
        close=tuple(k for k in old_keys if k not in new_keys),
        keep=tuple((k, lst) for k, lst in new_keys.items() if k in old_keys),
        removed=removed,
        added=added,
    )


def spread(count: int, window: float, unit_randoms: Sequence[float]) -> list[float]:
    """Offsets (seconds from now, ascending) at which to close `count` sessions over `window`.

    The window is cut into `count` equal slots and each close lands at a random point of its own
    slot: the rate stays flat (never two slots' worth at once) and sessions opened together still
    get different times. `unit_randoms` are `count` values in [0, 1) from the caller.
    """
    if count <= 0:
        return []
    if window <= 0:
        return [0.0] * count
    slot = window / count
    return [(i + min(max(u, 0.0), 0.999999)) * slot for i, u in zip(range(count), unit_randoms, strict=True)]


def rebalance_victim(loads: Sequence[tuple[int, int]]) -> int | None:
    """Which backend to move one session off, given (active sessions, weight) per backend; None
    once the spread is within weight.

    The victim is the backend with the most sessions per weight; a move is worth it only if the
    session, reconnecting to the least loaded other backend (as least_conn places it), lands where
    sessions per weight stays below the victim's: so every move strictly lowers the peak and
    rebalancing always stops.
    """
    if len(loads) < 2:
        return None
    peak, victim = max((active / weight, i) for i, (active, weight) in enumerate(loads))
    landing = min((active + 1) / weight for i, (active, weight) in enumerate(loads) if i != victim)
    return victim if landing < peak else None


def drain_window(requested: float, deadline: float, close_timeout: float) -> float:
    """The spread actually used at shutdown: the last close must still have `close_timeout` for
    its closing handshake before `deadline` cuts everything."""
    return max(0.0, min(requested, deadline - close_timeout))
