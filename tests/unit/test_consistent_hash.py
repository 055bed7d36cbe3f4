"""The hash ring: known answers, stability under pool changes, bounded loads, determinism."""

from __future__ import annotations

import math
from collections import Counter
from contextlib import ExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.config import Address, BackendConfig, HashKey, PoolConfig
from wsproxy.policy.balancing import Pool, build_pool
from wsproxy.policy.balancing.consistent_hash import (
    VNODES_PER_WEIGHT,
    ConsistentHash,
    cap,
    key_hash,
    vnode_points,
)

THREE = (
    BackendConfig(Address("10.0.0.1", 9001)),
    BackendConfig(Address("10.0.0.2", 9002)),
    BackendConfig(Address("10.0.0.3", 9003)),
)

# Computed once with this implementation (BLAKE2b, 100 vnodes per weight, 8 points per digest).
# If one of these changes, every deployed mapping changes: sessions lose their stickiness.
KNOWN_ANSWERS = [
    (b"user-1", "10.0.0.2:9002"),
    (b"user-2", "10.0.0.3:9003"),
    (b"user-3", "10.0.0.2:9002"),
    (b"alice", "10.0.0.2:9002"),
    (b"bob", "10.0.0.2:9002"),
    (b"room:42", "10.0.0.3:9003"),
    (b"session=abc", "10.0.0.1:9001"),
    (b"\x00\xff", "10.0.0.2:9002"),
    (b"192.0.2.1", "10.0.0.3:9003"),
    (b"/chat/lobby", "10.0.0.1:9001"),
    ("é".encode(), "10.0.0.2:9002"),
]

KEYS = [f"key-{i}".encode() for i in range(1500)]


def pool_of(backends: tuple[BackendConfig, ...] | list[BackendConfig], factor: float = 1.25) -> Pool:
    config = PoolConfig(
        name="sticky",
        backends=tuple(backends),
        balance="consistent_hash",
        hash_key=HashKey("header", "x-user"),
        hash_balance_factor=factor,
    )
    return build_pool(config)


def owners(pool: Pool, keys: list[bytes]) -> list[str]:
    """Where each key goes on an idle pool (no load bound in play)."""
    return [next(iter(pool.candidates(k))).name for k in keys]


def reference_walk(backends: tuple[BackendConfig, ...], key: bytes) -> list[str]:
    """A slow, obviously correct ring walk: linear scan instead of bisect."""
    ring = sorted((p, b.name) for b in backends for p in vnode_points(b.name, VNODES_PER_WEIGHT * b.weight))
    h = key_hash(key)
    start = next((i for i, (p, _) in enumerate(ring) if p >= h), 0)
    order: list[str] = []
    for step in range(len(ring)):
        name = ring[(start + step) % len(ring)][1]
        if name not in order:
            order.append(name)
    return order


addresses = st.lists(
    st.tuples(st.integers(1, 254), st.integers(1, 254), st.integers(1, 65535)),
    min_size=1,
    max_size=8,
    unique=True,
).map(lambda xs: [BackendConfig(Address(f"10.{a}.{b}.1", port)) for a, b, port in xs])


# --- known answers ---------------------------------------------------------------------------


def test_key_hash_known_answers() -> None:
    assert key_hash(b"alice") == 0x4DEAEC0CCE54DA89
    assert key_hash(b"") == 0xE4A6A0577479B2B4


def test_vnode_points_known_answers() -> None:
    assert vnode_points("10.0.0.1:9001", 3) == [
        0xC687BBAD8FE9DFB1,
        0x0EC452C9A2086545,
        0xF93DD73BEEA71333,
    ]
    assert len(vnode_points("10.0.0.1:9001", 101)) == 101


@pytest.mark.parametrize(("key", "expected"), KNOWN_ANSWERS)
def test_known_keys_map_to_known_backends(key: bytes, expected: str) -> None:
    assert owners(pool_of(THREE), [key]) == [expected]


@pytest.mark.parametrize(("key", "expected"), KNOWN_ANSWERS)
def test_known_answers_do_not_depend_on_config_order(key: bytes, expected: str) -> None:
    pool = pool_of((THREE[2], THREE[0], THREE[1]))
    assert owners(pool, [key]) == [expected]
    assert isinstance(pool.policy, ConsistentHash)
    assert pool.policy.owner(key).name == expected


# --- ring walk -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k, _ in KNOWN_ANSWERS] + KEYS[:20])
def test_idle_candidates_follow_the_ring_walk(key: bytes) -> None:
    backends = (*THREE, BackendConfig(Address("10.0.0.4", 9004), weight=2))
    assert [b.name for b in pool_of(backends).candidates(key)] == reference_walk(backends, key)


def test_share_of_keys_follows_weight() -> None:
    backends = (
        BackendConfig(Address("10.0.0.1", 9001), 1),
        BackendConfig(Address("10.0.0.2", 9002), 3),
    )
    keys = [f"w-{i}".encode() for i in range(8000)]
    share = Counter(owners(pool_of(backends), keys))["10.0.0.2:9002"] / len(keys)
    assert abs(share - 0.75) < 0.05


def test_over_cap_owner_is_skipped_for_the_next_backend_clockwise() -> None:
    pool = pool_of(THREE)
    for key, owner_name in KNOWN_ANSWERS:
        for b in pool.backends:
            b.active = 10 if b.name == owner_name else 0  # cap = ceil(1.25 * 11 / 3) = 5
        order = [b.name for b in pool.candidates(key)]
        without_owner = pool_of(tuple(c for c in THREE if c.name != owner_name))
        assert order[0] == owners(without_owner, [key])[0]
        assert order[-1] == owner_name  # over cap: still offered, last, for retries


def test_missing_key_falls_back_to_least_conn() -> None:
    pool = pool_of(THREE)
    for b, active in zip(pool.backends, [3, 0, 2], strict=True):
        b.active = active
    assert [b.index for b in pool.candidates(None)] == [1, 2, 0]
    for b in pool.backends:
        b.active = 0
    firsts = [next(iter(pool.candidates(None))).index for _ in range(3)]
    assert sorted(firsts) == [0, 1, 2]  # ties rotate, as in least_conn


def test_hot_key_spills_over_without_exceeding_the_cap() -> None:
    pool = pool_of(THREE)
    with ExitStack() as stack:
        for total in range(60):
            backend = next(iter(pool.candidates(b"the-one-big-room")))
            stack.enter_context(pool.acquire(backend))
            assert backend.active <= cap(1.25, total, 1, 3)
        counts = sorted(b.active for b in pool.backends)
    assert counts[-1] <= math.ceil(1.25 * 60 / 3)
    assert counts[0] > 0  # the overflow reached every backend


def test_cap_counts_the_session_being_placed() -> None:
    assert cap(1.25, 0, 1, 3) == 1  # an idle pool still accepts a session anywhere
    assert cap(1.25, 11, 1, 3) == 5
    assert cap(2.0, 9, 3, 4) == 15


# --- hypothesis properties -----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(backends=addresses.filter(lambda bs: len(bs) >= 2), data=st.data())
def test_removing_a_backend_moves_only_its_own_keys(backends: list[BackendConfig], data: st.DataObject) -> None:
    gone = data.draw(st.integers(0, len(backends) - 1), label="removed")
    before = owners(pool_of(backends), KEYS)
    after = owners(pool_of(backends[:gone] + backends[gone + 1 :]), KEYS)
    removed = backends[gone].name
    for old, new in zip(before, after, strict=True):
        if old != removed:
            assert new == old
        else:
            assert new != removed


# Tolerance: the moved share must be within +-50% (relative) of 1/(N+1). With 100 vnodes per
# backend a backend's share has a relative spread of about 10%, and 1500 keys add about 8%.
# Derandomized so a rare draw beyond that spread cannot make CI flaky.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(backends=addresses, data=st.data())
def test_adding_a_backend_moves_about_one_in_n_plus_one_keys(
    backends: list[BackendConfig], data: st.DataObject
) -> None:
    taken = {b.name for b in backends}
    port = data.draw(st.integers(1, 65535).filter(lambda p: f"10.0.0.7:{p}" not in taken), label="port")
    new = BackendConfig(Address("10.0.0.7", port))
    before = owners(pool_of(backends), KEYS)
    after = owners(pool_of([*backends, new]), KEYS)
    moved = [(old, n) for old, n in zip(before, after, strict=True) if old != n]
    assert all(n == new.name for _, n in moved)  # keys only ever move to the newcomer
    expected = 1 / (len(backends) + 1)
    assert 0.5 * expected <= len(moved) / len(KEYS) <= 1.5 * expected


@settings(max_examples=30, deadline=None)
@given(backends=addresses, data=st.data())
def test_mapping_is_the_same_in_two_independently_built_pools(
    backends: list[BackendConfig], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(backends), label="order")
    a, b = pool_of(backends), pool_of(shuffled)
    loads = data.draw(st.lists(st.integers(0, 5), min_size=len(backends), max_size=len(backends)))
    by_name = dict(zip((c.name for c in backends), loads, strict=True))
    for pool in (a, b):
        for backend in pool.backends:
            backend.active = by_name[backend.name]
    for key in KEYS[:100]:
        assert [x.name for x in a.candidates(key)] == [x.name for x in b.candidates(key)]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 30)),  # few distinct keys: hot spots
        st.tuples(st.just("depart"), st.integers(0, 10**6)),
    ),
    max_size=250,
)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    factor=st.floats(1.01, 3.0),
    ops=operations,
)
def test_bounded_loads_are_never_exceeded_under_arrivals_and_departures(
    weights: list[int], factor: float, ops: list[tuple[str, int]]
) -> None:
    backends = tuple(BackendConfig(Address(f"10.0.0.{i + 1}", 9000), w) for i, w in enumerate(weights))
    pool = pool_of(backends, factor)
    total_weight = sum(weights)
    walks: dict[int, list[str]] = {}
    sessions: list[ExitStack] = []
    for op, n in ops:
        if op == "depart":
            if sessions:
                sessions.pop(n % len(sessions)).close()
            continue
        key = f"user-{n}".encode()
        total = pool.active
        caps = {b.name: cap(factor, total, b.weight, total_weight) for b in pool.backends}
        under = {b.name for b in pool.backends if b.active < caps[b.name]}
        order = [b.name for b in pool.candidates(key)]
        walk = walks.setdefault(n, reference_walk(backends, key))
        # under-cap backends first, in ring-walk order, then the over-cap ones in walk order
        assert order == [x for x in walk if x in under] + [x for x in walk if x not in under]
        chosen = next(iter(pool.candidates(key)))
        stack = ExitStack()
        stack.enter_context(pool.acquire(chosen))
        sessions.append(stack)
        assert chosen.active <= caps[chosen.name]
    for stack in sessions:
        stack.close()
    assert pool.active == 0
