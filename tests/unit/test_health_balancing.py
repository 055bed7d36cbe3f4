"""Policies under health: down or ejected backends are never offered; slow-start weights are used."""

from __future__ import annotations

import random
from collections import Counter
from contextlib import ExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.config import ActiveHealth, Address, BackendConfig, HashKey, PassiveHealth, PoolConfig
from wsproxy.policy.balancing import POLICIES, Pool, build_pool
from wsproxy.policy.balancing.random_two import RandomTwo

ACTIVE = ActiveHealth(interval=1.0, rise=1, fall=1, slow_start=100.0)


def make_pool(weights: list[int], balance: str, *, seed: int = 0) -> Pool:
    backends = tuple(BackendConfig(Address("10.0.0.1", 9000 + i), weight=w) for i, w in enumerate(weights))
    hash_key = HashKey("header", "x-user") if balance == "consistent_hash" else None
    config = PoolConfig(name="p", backends=backends, balance=balance, hash_key=hash_key, health=ACTIVE)
    if balance == "random_two":
        return Pool(config, lambda b, c: RandomTwo(b, c, rng=random.Random(seed)))  # type: ignore[arg-type, return-value]
    return build_pool(config)


def mark_down(pool: Pool, index: int, now: float = 0.0) -> None:
    assert pool.backends[index].health.check_failed(now, "refused") is not None


def bring_up(pool: Pool, index: int, now: float) -> None:
    assert pool.backends[index].health.check_passed(now) is not None


def picks(pool: Pool, count: int, now: float, key: bytes | None = None) -> Counter[int]:
    return Counter(next(iter(pool.candidates(key, now))).index for _ in range(count))


@settings(max_examples=150, deadline=None)
@given(
    balance=st.sampled_from(sorted(POLICIES)),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    data=st.data(),
)
def test_unavailable_backends_are_never_offered_and_the_rest_once_each(
    balance: str, weights: list[int], data: st.DataObject
) -> None:
    pool = make_pool(weights, balance)
    n = len(weights)
    down = data.draw(st.sets(st.integers(0, n - 1)), label="down")
    ejected = data.draw(st.sets(st.integers(0, n - 1)), label="ejected")
    for i in down:
        mark_down(pool, i)
    for i in ejected:
        h = pool.backends[i].health
        for _ in range(3):
            h.attempt_failed(0.0, "refused")
    gone = down | ejected
    actives = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n), label="actives")
    for b, a in zip(pool.backends, actives, strict=True):
        b.active = a
    for round_ in range(5):
        key = data.draw(st.one_of(st.none(), st.binary(max_size=8)), label="key")
        order = [b.index for b in pool.candidates(key, 1.0)]
        assert sorted(order) == sorted(set(range(n)) - gone), (round_, order)
    assert [b.active for b in pool.backends] == actives


@pytest.mark.parametrize("balance", sorted(POLICIES))
def test_all_backends_down_gives_no_candidates(balance: str) -> None:
    pool = make_pool([1, 2, 3], balance)
    for i in range(3):
        mark_down(pool, i)
    assert list(pool.candidates(b"k", 1.0)) == []
    assert list(pool.candidates(None, 1.0)) == []


def test_effective_weights_are_none_while_every_backend_is_steady() -> None:
    pool = make_pool([1, 2, 3], "round_robin")
    assert pool.effective_weights(0.0) is None
    mark_down(pool, 1, now=0.0)
    assert pool.effective_weights(1.0) == [1.0, 0.0, 3.0]
    bring_up(pool, 1, now=10.0)
    assert pool.effective_weights(60.0) == pytest.approx([1.0, 1.0, 3.0])  # half-way: 2 * 0.5
    assert pool.effective_weights(110.0) is None


def test_round_robin_gives_a_down_backends_turns_to_all_others_by_weight() -> None:
    pool = make_pool([1, 1, 1, 1], "round_robin")
    mark_down(pool, 1)
    got = picks(pool, 300, 1.0)
    assert got == {0: 100, 2: 100, 3: 100}  # not 0: 100, 2: 200 as "skip to the next" would give


@pytest.mark.parametrize("balance", ["round_robin", "random_two"])
def test_a_ramping_backend_gets_its_slow_start_share_of_new_sessions(balance: str) -> None:
    pool = make_pool([1, 1], balance)
    mark_down(pool, 0, now=0.0)
    bring_up(pool, 0, now=100.0)
    # at 125 s the ramp is at 25 %: weights 0.25 : 1, a share of 20 % (random_two: the less loaded
    # of two draws, with equal loads the first drawn, so also about 20 %)
    share = picks(pool, 4000, 125.0)[0] / 4000
    assert 0.15 < share < 0.25
    share_full = picks(pool, 4000, 200.0)[0] / 4000
    assert 0.45 < share_full < 0.55


def test_least_conn_fills_a_ramping_backend_gradually() -> None:
    pool = make_pool([1, 1, 1], "least_conn")
    mark_down(pool, 0, now=0.0)
    bring_up(pool, 0, now=100.0)
    with ExitStack() as stack:
        for b in pool.backends[1:]:
            b.active = 20
        placed = Counter()
        for _ in range(10):  # at 5 % of weight 1, one session counts as 20 and two as 40
            b = next(iter(pool.candidates(None, 105.0)))
            stack.enter_context(pool.acquire(b))
            placed[b.index] += 1
        assert placed[0] == 2  # the others went from 20 to 24 meanwhile
        for _ in range(30):  # at full weight the empty backend is filled first
            b = next(iter(pool.candidates(None, 200.0)))
            stack.enter_context(pool.acquire(b))
            placed[b.index] += 1
        assert pool.backends[0].active >= 15


def test_consistent_hash_moves_only_the_down_backends_keys_and_they_come_back() -> None:
    pool = make_pool([1, 1, 1, 1], "consistent_hash")
    keys = [f"user-{i}".encode() for i in range(400)]
    before = {k: next(iter(pool.candidates(k, 0.0))).index for k in keys}
    mark_down(pool, 2, now=0.0)
    during = {k: next(iter(pool.candidates(k, 1.0))).index for k in keys}
    moved = {k for k in keys if before[k] != during[k]}
    assert moved == {k for k in keys if before[k] == 2}
    assert 2 not in during.values()
    pool.backends[2].health.check_passed(2.0)
    after = {k: next(iter(pool.candidates(k, 500.0))).index for k in keys}
    assert after == before


def test_passive_ejection_is_per_backend_and_ends_on_time() -> None:
    config = PoolConfig(
        name="p",
        backends=tuple(BackendConfig(Address("10.0.0.1", 9000 + i)) for i in range(2)),
        passive=PassiveHealth(failures=1, eject_for=5.0, max_eject_for=5.0),
    )
    pool = build_pool(config)
    assert pool.backends[0].health.attempt_failed(0.0, "refused") is not None
    assert {b.index for _ in range(4) for b in pool.candidates(None, 4.9)} == {1}
    assert {b.index for _ in range(4) for b in pool.candidates(None, 5.0)} == {0, 1}
