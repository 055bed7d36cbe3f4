"""Token buckets, the bounded per-IP table, the session flow limiter and the LRU/TTL tables."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.policy.lru import LRUTable, TTLCache
from wsproxy.policy.ratelimit import FlowLimiter, KeyedBuckets, TokenBucket

# --- TokenBucket ------------------------------------------------------------------------------


def test_bucket_starts_full_and_refuses_once_empty():
    b = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)  # one token at 2/s
    assert b.take(0.25) == pytest.approx(0.25)  # a refused take takes nothing
    assert b.take(0.5) == 0.0


def test_bucket_refills_only_up_to_burst():
    b = TokenBucket(rate=10.0, burst=2.0, now=0.0)
    b.take(0.0)
    b.take(0.0)
    assert b.full(1000.0)
    assert [b.take(1000.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_cost_over_burst_never_fits():
    assert TokenBucket(rate=1.0, burst=2.0, now=0.0).take(0.0, cost=3.0) == math.inf


def test_a_clock_stepping_back_refills_nothing():
    b = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert b.take(10.0) == 0.0
    assert b.take(5.0) > 0
    assert b.take(10.5) == pytest.approx(0.5)


def test_charge_goes_into_debt_and_says_how_long_to_repay():
    b = TokenBucket(rate=100.0, burst=100.0, now=0.0)
    assert b.charge(0.0, 300.0) == pytest.approx(2.0)
    assert b.wait(1.0) == pytest.approx(1.0)
    assert b.wait(2.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1), (math.inf, 1), (1, math.nan)])
def test_bucket_rejects_nonsense(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(rate, burst, gaps):
    b = TokenBucket(rate, float(burst), 0.0)
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        if b.take(now) == 0.0:
            granted += 1
        assert granted <= burst + rate * now + 1e-6


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.5, 100.0), burst=st.integers(1, 20), n=st.integers(1, 100))
def test_a_refused_take_says_exactly_when_it_would_fit(rate, burst, n):
    b = TokenBucket(rate, float(burst), 0.0)
    for _ in range(burst):
        b.take(0.0)
    wait = b.take(0.0)
    assert wait > 0
    assert b.take(wait * (1 - 1e-9) * 0.5) > 0
    assert b.take(wait + 1e-9) == 0.0


# --- KeyedBuckets -------------------------------------------------------------------------------


def test_each_address_has_its_own_bucket():
    t = KeyedBuckets(rate=1.0, burst=2.0, max_entries=100)
    assert t.take("10.0.0.1", 0.0) == 0.0
    assert t.take("10.0.0.1", 0.0) == 0.0
    assert t.take("10.0.0.1", 0.0) > 0
    assert t.take("10.0.0.2", 0.0) == 0.0


def test_a_flood_of_addresses_cannot_grow_the_table():
    t = KeyedBuckets(rate=1.0, burst=1.0, max_entries=50)
    for i in range(10_000):
        t.take(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
        assert len(t) <= 50
    assert len(t) == 50
    assert t.table.evictions == 10_000 - 50


def test_a_refilled_bucket_is_dropped_before_a_busy_one_is_evicted():
    t = KeyedBuckets(rate=1.0, burst=1.0, max_entries=2)
    t.take("old", 0.0)  # refilled by t=5: as good as absent
    t.take("busy", 4.9)
    t.take("new", 5.0)
    assert "busy" in t.table and "new" in t.table and "old" not in t.table
    assert t.table.evictions == 0
    assert t.take("busy", 5.0) > 0  # still remembered: still limited


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(st.integers(0, 30), max_size=300),
    bound=st.integers(1, 10),
)
def test_table_stays_bounded_for_any_key_sequence(keys, bound):
    t = KeyedBuckets(rate=0.5, burst=1.0, max_entries=bound)
    for i, k in enumerate(keys):
        t.take(str(k), i * 0.01)
        assert len(t) <= bound


# --- FlowLimiter ----------------------------------------------------------------------------


def test_under_the_rate_nothing_waits():
    f = FlowLimiter(now=0.0, messages=(10.0, 10.0), close_after=1.0)
    for i in range(100):
        now = i * 0.1
        f.charge(now, messages=1, nbytes=100)
        assert f.pause(now) == 0.0
    assert f.limited_since is None


def test_over_the_rate_the_reader_waits_for_the_debt():
    f = FlowLimiter(now=0.0, nbytes=(1000.0, 1000.0), close_after=None)
    f.charge(0.0, messages=0, nbytes=3000)
    assert f.pause(0.0) == pytest.approx(2.0)
    assert f.pause(1.5) == pytest.approx(0.5)
    assert f.pause(2.0) == 0.0


def test_continuous_limiting_closes_after_close_after():
    f = FlowLimiter(now=0.0, messages=(10.0, 5.0), close_after=1.0)
    now = 0.0
    for _ in range(1000):
        f.charge(now, messages=10, nbytes=0)  # each read far more than the rate allows
        pause = f.pause(now)
        if pause is None:
            break
        assert pause > 0
        now += pause
    assert pause is None
    assert now == pytest.approx(1.0)


def test_a_burst_then_quiet_is_slowed_not_closed():
    f = FlowLimiter(now=0.0, messages=(10.0, 10.0), close_after=0.5)
    f.charge(0.0, messages=20, nbytes=0)  # one second's debt
    assert f.pause(0.0) == pytest.approx(0.5)  # capped at the close deadline...
    assert f.pause(0.5) is None  # ...where it is still in debt: continuous for close_after
    g = FlowLimiter(now=0.0, messages=(10.0, 10.0), close_after=2.0)
    g.charge(0.0, messages=20, nbytes=0)
    assert g.pause(0.0) == pytest.approx(1.0)
    g.charge(3.0, messages=1, nbytes=0)  # the next message came when the budget had room
    assert g.limited_since is None and g.pause(3.0) == 0.0


def test_a_read_without_a_whole_message_does_not_end_the_limiting():
    f = FlowLimiter(now=0.0, messages=(1.0, 1.0), close_after=3.0)
    f.charge(0.0, messages=3, nbytes=10)
    assert f.limited_since == 0.0
    f.charge(2.0, messages=0, nbytes=10)  # repaid at 2.0, but this read finished no message
    assert f.limited_since == 0.0
    f.charge(2.0, messages=1, nbytes=10)
    assert f.limited_since == 0.0 and f.pause(2.0) == pytest.approx(1.0)


def test_without_limits_the_limiter_is_inactive():
    f = FlowLimiter(now=0.0)
    assert not f.active
    f.charge(0.0, messages=10**6, nbytes=10**9)
    assert f.pause(0.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(1.0, 1000.0),
    reads=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 5)), min_size=1, max_size=100),
)
def test_a_sender_that_obeys_every_pause_stays_within_its_budget(rate, reads):
    """However reads arrive, once the reader has waited as told, the messages let through never
    exceed burst + rate * elapsed."""
    burst = 5.0
    f = FlowLimiter(now=0.0, messages=(rate, burst), close_after=None)
    now, total = 0.0, 0
    for gap, msgs in reads:
        now += gap
        f.charge(now, messages=msgs, nbytes=0)
        total += msgs
        pause = f.pause(now)
        assert pause is not None and pause >= 0
        now += pause
        assert total <= burst + rate * now + 1e-6


# --- LRU / TTL tables -----------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used():
    t: LRUTable[str, int] = LRUTable(2)
    t.put("a", 1)
    t.put("b", 2)
    assert t.get("a") == 1  # a is now the most recent
    t.put("c", 3)
    assert "b" not in t and t.get("a") == 1 and t.get("c") == 3
    assert t.evictions == 1
    with pytest.raises(ValueError):
        LRUTable(0)


def test_ttl_cache_forgets_expired_entries():
    c: TTLCache[str, str] = TTLCache(10, ttl=30.0)
    c.put("k", "v", now=0.0)
    assert c.get("k", 29.9) == "v"
    assert c.get("k", 30.0) is None
    assert len(c) == 0


def test_ttl_cache_is_bounded_and_drops_dead_entries_on_insert():
    c: TTLCache[int, int] = TTLCache(3, ttl=1.0)
    for i in range(100):
        c.put(i, i, now=float(i))
        assert len(c) <= 3
    assert len(c) == 1  # at t=99 every older entry had expired and was dropped
