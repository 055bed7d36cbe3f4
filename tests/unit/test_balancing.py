"""Balancing policies: ordering, once-each candidates, tie rotation, weights, load preference."""

from __future__ import annotations

import random
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.config import BALANCE_POLICIES, Address, BackendConfig, HashKey, PoolConfig
from wsproxy.policy.balancing import POLICIES, Pool, build_pool
from wsproxy.policy.balancing.least_conn import LeastConn
from wsproxy.policy.balancing.random_two import RandomTwo
from wsproxy.policy.balancing.round_robin import RoundRobin

ROOT = Path(__file__).resolve().parents[2]


def make_config(weights: list[int], balance: str = "round_robin") -> PoolConfig:
    backends = tuple(BackendConfig(address=Address(f"10.0.0.{i + 1}", 9000), weight=w) for i, w in enumerate(weights))
    hash_key = HashKey("header", "x-user") if balance == "consistent_hash" else None
    return PoolConfig(name="p", backends=backends, balance=balance, hash_key=hash_key)


def make_pool(weights: list[int], balance: str, seed: int = 0) -> Pool:
    config = make_config(weights, balance)
    if balance == "random_two":
        return Pool(config, partial(RandomTwo, rng=random.Random(seed)))  # type: ignore[arg-type]
    return build_pool(config)


def set_active(pool: Pool, actives: list[int]) -> None:
    """Give backends fixed loads (what many held-open sessions would leave behind)."""
    for backend, active in zip(pool.backends, actives, strict=True):
        backend.active = active


def first(pool: Pool, key: bytes | None = None) -> int:
    return next(iter(pool.candidates(key))).index


def fill_held_open(pool: Pool, sessions: int, stack: ExitStack) -> Counter[int]:
    """Place `sessions` sessions, each on its first candidate, keeping every one open."""
    placed: Counter[int] = Counter()
    for i in range(sessions):
        backend = next(iter(pool.candidates(f"user-{i}".encode())))
        stack.enter_context(pool.acquire(backend))
        placed[backend.index] += 1
    return placed


# --- the registry and the interface every policy shares -------------------------------------


def test_every_configurable_policy_is_registered() -> None:
    assert set(POLICIES) == set(BALANCE_POLICIES)
    for name in BALANCE_POLICIES:
        assert build_pool(make_config([1, 1], name)).policy.__class__ is POLICIES[name]


@pytest.mark.parametrize("balance", BALANCE_POLICIES)
def test_empty_pool_has_no_candidates(balance: str) -> None:
    pool = make_pool([], balance)
    assert list(pool.candidates(b"k")) == []
    assert list(pool.candidates(None)) == []


@pytest.mark.parametrize("balance", BALANCE_POLICIES)
def test_single_backend_is_the_only_candidate(balance: str) -> None:
    pool = make_pool([3], balance)
    set_active(pool, [7])
    assert [b.index for b in pool.candidates(b"k")] == [0]


@pytest.mark.parametrize("balance", BALANCE_POLICIES)
@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 20)), min_size=1, max_size=8),
    key=st.none() | st.binary(max_size=8),
    picks=st.integers(1, 4),
)
def test_candidates_yield_every_backend_exactly_once_and_never_change_counts(
    balance: str, data: list[tuple[int, int]], key: bytes | None, picks: int
) -> None:
    pool = make_pool([w for w, _ in data], balance)
    set_active(pool, [a for _, a in data])
    for _ in range(picks):
        order = [b.index for b in pool.candidates(key)]
        assert sorted(order) == list(range(len(data)))
        assert [b.active for b in pool.backends] == [a for _, a in data]


def test_acquire_counts_while_held_and_releases_on_error() -> None:
    pool = make_pool([1, 1], "least_conn")
    backend = pool.backends[0]
    with pytest.raises(RuntimeError), pool.acquire(backend):
        assert backend.active == 1
        raise RuntimeError("session crashed")
    assert backend.active == 0


# --- round_robin ---------------------------------------------------------------------------


def test_round_robin_is_smooth_for_weights_5_1_1() -> None:
    pool = make_pool([5, 1, 1], "round_robin")
    assert [first(pool) for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_retries_follow_ring_order_after_the_winner() -> None:
    pool = make_pool([1, 1, 1, 1], "round_robin")
    next(iter(pool.candidates()))  # winner 0
    assert [b.index for b in pool.candidates()] == [1, 2, 3, 0]


@pytest.mark.parametrize("balance", ["round_robin", "least_conn"])
@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 5], [3, 7], [10, 1, 4, 4]])
def test_long_run_share_follows_weights_within_5_percent(balance: str, weights: list[int]) -> None:
    pool = make_pool(weights, balance)
    sessions = 3000
    with ExitStack() as stack:
        placed = fill_held_open(pool, sessions, stack)
        assert pool.active == sessions
    assert pool.active == 0
    total_weight = sum(weights)
    for i, w in enumerate(weights):
        expected = sessions * w / total_weight
        assert abs(placed[i] - expected) <= 0.05 * expected, (i, placed, expected)


# Any weights, any session count (not just whole rounds): deviation from the weighted share is
# bounded by about one weight unit per backend, which 40+ rounds keep under 5%.
@pytest.mark.parametrize("balance", ["round_robin", "least_conn"])
@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 10), min_size=1, max_size=8), extra=st.integers(0, 10**6))
def test_weights_are_respected_in_the_long_run_for_any_weights(balance: str, weights: list[int], extra: int) -> None:
    total_weight = sum(weights)
    sessions = 40 * total_weight + extra % (20 * total_weight)
    pool = make_pool(weights, balance)
    with ExitStack() as stack:
        placed = fill_held_open(pool, sessions, stack)
    for i, w in enumerate(weights):
        expected = sessions * w / total_weight
        assert abs(placed[i] - expected) <= 0.05 * expected, (i, placed, expected)


# --- least_conn ----------------------------------------------------------------------------


def test_least_conn_prefers_lowest_active_per_weight() -> None:
    pool = make_pool([1, 4, 2], "least_conn")
    set_active(pool, [2, 4, 3])  # loads 2.0, 1.0, 1.5
    assert [b.index for b in pool.candidates()] == [1, 2, 0]


def test_least_conn_orders_retries_by_increasing_load() -> None:
    pool = make_pool([1, 1, 1, 1, 1], "least_conn")
    set_active(pool, [9, 3, 7, 1, 5])
    assert [b.index for b in pool.candidates()] == [3, 1, 4, 2, 0]


def test_least_conn_rotates_ties_instead_of_always_taking_the_first() -> None:
    pool = make_pool([1, 1, 1, 1], "least_conn")
    firsts = [first(pool) for _ in range(8)]
    assert firsts == [0, 1, 2, 3, 0, 1, 2, 3]


def test_least_conn_rotation_only_among_the_tied() -> None:
    pool = make_pool([1, 1, 1, 1], "least_conn")
    set_active(pool, [5, 2, 5, 2])
    assert [first(pool) for _ in range(6)] == [1, 1, 3, 3, 1, 1]


def test_least_conn_equal_ratios_are_ties() -> None:
    pool = make_pool([3, 6], "least_conn")
    set_active(pool, [1, 2])  # 1/3 == 2/6
    assert sorted(first(pool) for _ in range(2)) == [0, 1]


def test_least_conn_ignores_the_key() -> None:
    pool = make_pool([1, 1, 1], "least_conn")
    set_active(pool, [3, 0, 3])
    assert {first(pool, f"k{i}".encode()) for i in range(10)} == {1}


# --- random_two ----------------------------------------------------------------------------


def test_random_two_of_two_backends_always_takes_the_less_loaded() -> None:
    pool = make_pool([1, 1], "random_two", seed=1)
    set_active(pool, [10, 2])
    assert {first(pool) for _ in range(200)} == {1}


def test_random_two_never_puts_the_single_most_loaded_backend_first() -> None:
    pool = make_pool([1, 1, 1, 1, 1], "random_two", seed=2)
    set_active(pool, [0, 0, 100, 0, 0])
    firsts = Counter(first(pool) for _ in range(2000))
    assert 2 not in firsts
    assert set(firsts) == {0, 1, 3, 4}  # still random among the rest


def test_random_two_prefers_less_loaded_backends_more_often() -> None:
    pool = make_pool([1, 1, 1, 1], "random_two", seed=3)
    set_active(pool, [0, 1, 2, 3])
    firsts = Counter(first(pool) for _ in range(4000))
    # Exact odds with 2 distinct uniform picks out of 4: 3/6, 2/6, 1/6, 0.
    assert firsts[3] == 0
    assert firsts[0] > firsts[1] > firsts[2] > 0
    assert abs(firsts[0] / 4000 - 0.5) < 0.04


def test_random_two_samples_by_weight_when_loads_tie() -> None:
    pool = make_pool([1, 3], "random_two", seed=4)
    firsts = Counter(first(pool) for _ in range(4000))
    assert abs(firsts[1] / 4000 - 0.75) < 0.03


def test_random_two_rest_follow_by_increasing_load() -> None:
    pool = make_pool([1, 1, 1, 1, 1], "random_two", seed=5)
    set_active(pool, [4, 0, 3, 1, 2])
    for _ in range(50):
        order = [b.index for b in pool.candidates()]
        rest = order[1:]
        assert [pool.backends[i].active for i in rest] == sorted(pool.backends[i].active for i in rest)


def test_random_two_is_reproducible_with_a_seeded_rng() -> None:
    a = make_pool([1, 2, 3, 4], "random_two", seed=42)
    b = make_pool([1, 2, 3, 4], "random_two", seed=42)
    assert [first(a) for _ in range(100)] == [first(b) for _ in range(100)]


def test_random_two_held_open_sessions_follow_weights_within_5_percent() -> None:
    weights = [1, 2, 5]
    pool = make_pool(weights, "random_two", seed=6)
    with ExitStack() as stack:
        placed = fill_held_open(pool, 3000, stack)
    for i, w in enumerate(weights):
        expected = 3000 * w / sum(weights)
        assert abs(placed[i] - expected) <= 0.05 * expected, placed


def test_random_two_builds_with_a_default_rng_through_the_registry() -> None:
    pool = build_pool(make_config([1, 1, 1], "random_two"))
    assert isinstance(pool.policy, RandomTwo)
    assert sorted(b.index for b in pool.candidates()) == [0, 1, 2]


def test_policy_classes_are_the_documented_ones() -> None:
    assert POLICIES["round_robin"] is RoundRobin
    assert POLICIES["least_conn"] is LeastConn
    assert POLICIES["random_two"] is RandomTwo
