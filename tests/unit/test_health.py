"""The pure health state machine: rise/fall, passive ejection with back-off, slow start, Retry-After."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.config import ActiveHealth, PassiveHealth
from wsproxy.policy.health import (
    DOWN,
    EJECTED,
    JITTER,
    RETRY_AFTER_MAX,
    SLOW_START,
    SLOW_START_FLOOR,
    UP,
    BackendHealth,
    ejection_duration,
    jittered,
    retry_after,
)

ACTIVE = ActiveHealth(interval=2.0, timeout=1.0, rise=2, fall=3)
PASSIVE = PassiveHealth(failures=3, window=10.0, eject_for=30.0, max_eject_for=300.0)


def down_health(active: ActiveHealth = ACTIVE, now: float = 0.0) -> BackendHealth:
    h = BackendHealth(active, None)
    for _ in range(active.fall):
        h.check_failed(now, "refused")
    assert h.state == DOWN
    return h


# --------------------------------------------------------------------------------------------
# active: rise and fall


def test_a_backend_starts_up_at_full_weight() -> None:
    h = BackendHealth(ACTIVE, PASSIVE)
    assert h.state == UP and h.available(0.0) and h.weight_factor(0.0) == 1.0 and h.status(0.0) == UP
    assert h.last_change is None and h.last_error is None


def test_fall_failed_checks_in_a_row_mark_down_with_the_last_reason() -> None:
    h = BackendHealth(ACTIVE, None)
    assert h.check_failed(1.0, "refused") is None
    assert h.check_failed(2.0, "refused") is None
    assert h.available(2.0)
    change = h.check_failed(3.0, "timed out")
    assert change is not None and change.state == DOWN and "timed out" in change.reason
    assert h.state == DOWN and not h.available(3.0) and h.weight_factor(3.0) == 0.0
    assert h.last_change == 3.0 and h.last_error == "timed out" and h.status(3.0) == DOWN


def test_a_passed_check_resets_the_failure_streak() -> None:
    h = BackendHealth(ACTIVE, None)
    for t in range(10):  # fail, fail, pass, fail, fail, pass, ...: never three in a row
        assert (h.check_passed(t) if t % 3 == 2 else h.check_failed(t, "x")) is None
    assert h.state == UP


def test_rise_passed_checks_in_a_row_mark_up_and_a_failure_restarts_the_count() -> None:
    h = down_health()
    assert h.check_passed(10.0) is None
    assert h.check_failed(11.0, "x") is None  # the streak restarts
    assert h.check_passed(12.0) is None
    assert h.state == DOWN
    change = h.check_passed(13.0)
    assert change is not None and change.state == UP
    assert h.state == UP and h.last_change == 13.0 and h.available(13.0)


@given(
    results=st.lists(st.booleans(), max_size=60),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
)
def test_state_matches_the_run_length_model(results: list[bool], rise: int, fall: int) -> None:
    """Model: split the results into runs of equal outcomes; an up backend goes down during a
    failure run of at least `fall`, a down one comes up during a success run of at least `rise`."""
    h = BackendHealth(ActiveHealth(rise=rise, fall=fall), None)
    changes = []
    for t, ok in enumerate(results):
        change = h.check_passed(t) if ok else h.check_failed(t, "x")
        if change is not None:
            changes.append(change.state)
    expected, flips = UP, []
    i = 0
    while i < len(results):
        j = i
        while j < len(results) and results[j] == results[i]:
            j += 1
        run = j - i
        if expected == UP and not results[i] and run >= fall:
            expected = DOWN
            flips.append(DOWN)
        elif expected == DOWN and results[i] and run >= rise:
            expected = UP
            flips.append(UP)
        i = j
    assert h.state == expected
    assert changes == flips
    assert h.checks_passed == sum(results) and h.checks_failed == len(results) - sum(results)


# --------------------------------------------------------------------------------------------
# slow start


def test_slow_start_ramps_the_weight_from_the_floor_to_full() -> None:
    active = ActiveHealth(rise=1, fall=1, slow_start=10.0)
    h = down_health(active)
    h.check_passed(100.0)
    assert h.weight_factor(100.0) == SLOW_START_FLOOR
    assert h.weight_factor(102.5) == pytest.approx(0.25)
    assert h.weight_factor(105.0) == pytest.approx(0.5)
    assert h.status(105.0) == SLOW_START and h.available(105.0)
    assert h.weight_factor(110.0) == 1.0 and h.status(110.0) == UP
    assert h.full_at == 110.0


@given(times=st.lists(st.floats(0, 50), min_size=2, max_size=20))
def test_slow_start_weight_never_decreases_over_time(times: list[float]) -> None:
    h = down_health(ActiveHealth(rise=1, fall=1, slow_start=20.0))
    h.check_passed(0.0)
    factors = [h.weight_factor(t) for t in sorted(times)]
    assert factors == sorted(factors)
    assert all(SLOW_START_FLOOR <= f <= 1.0 for f in factors)


def test_no_slow_start_for_a_backend_that_was_never_down() -> None:
    h = BackendHealth(ActiveHealth(slow_start=30.0), PASSIVE)
    assert h.weight_factor(0.0) == 1.0 and h.full_at == -math.inf


def test_slow_start_off_means_full_weight_at_once() -> None:
    h = down_health(ActiveHealth(rise=1, fall=1))
    h.check_passed(5.0)
    assert h.weight_factor(5.0) == 1.0 and h.full_at == 5.0


# --------------------------------------------------------------------------------------------
# passive ejection


def test_failures_in_a_row_within_the_window_eject() -> None:
    h = BackendHealth(None, PASSIVE)
    assert h.attempt_failed(0.0, "refused") is None
    assert h.attempt_failed(1.0, "refused") is None
    change = h.attempt_failed(2.0, "no answer")
    assert change is not None and change.state == EJECTED and change.duration == 30.0
    assert "no answer" in change.reason
    assert not h.available(2.0) and h.status(2.0) == EJECTED and h.weight_factor(31.9) == 0.0
    assert h.available(32.0) and h.state == UP  # passive ejection never touches the active state


def test_failures_spread_wider_than_the_window_do_not_eject() -> None:
    h = BackendHealth(None, PASSIVE)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):  # never three within 10 s
        assert h.attempt_failed(t, "refused") is None
    assert h.available(24.0)


def test_a_success_between_failures_restarts_the_count() -> None:
    h = BackendHealth(None, PASSIVE)
    h.attempt_failed(0.0, "x")
    h.attempt_failed(1.0, "x")
    h.attempt_succeeded(1.5)
    assert h.attempt_failed(2.0, "x") is None
    assert h.attempt_failed(3.0, "x") is None
    assert h.attempt_failed(4.0, "x") is not None


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    h = BackendHealth(None, PASSIVE)
    for t in (0.0, 0.1, 0.2):
        h.attempt_failed(t, "x")
    for t in (1.0, 2.0, 3.0, 4.0):  # attempts that started before the ejection, failing late
        assert h.attempt_failed(t, "x") is None
    assert h.ejected_until == pytest.approx(30.2)


def eject(h: BackendHealth, at: float) -> float:
    """Three failures at `at`; returns the ejection's duration."""
    h.attempt_failed(at, "x")
    h.attempt_failed(at, "x")
    change = h.attempt_failed(at, "x")
    assert change is not None
    return change.duration


def test_repeat_offenders_are_ejected_twice_as_long_up_to_the_cap() -> None:
    h = BackendHealth(None, PASSIVE)
    durations, t = [], 0.0
    for _ in range(6):
        d = eject(h, t)
        durations.append(d)
        t += d  # fails again the moment its ejection ends
    assert durations == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_a_backend_quiet_for_max_eject_for_is_a_first_offender_again() -> None:
    h = BackendHealth(None, PASSIVE)
    assert eject(h, 0.0) == 30.0
    assert eject(h, 30.0 + 299.0) == 60.0  # within max_eject_for of the last ejection's end
    end = h.ejected_until
    assert eject(h, end + 301.0) == 30.0


@given(level=st.integers(0, 200), eject_for=st.floats(0.01, 1000), extra=st.floats(0, 10000))
def test_ejection_duration_doubles_and_is_capped(level: int, eject_for: float, extra: float) -> None:
    p = PassiveHealth(eject_for=eject_for, max_eject_for=eject_for + extra)
    d = ejection_duration(p, level)
    assert eject_for <= d <= p.max_eject_for
    assert ejection_duration(p, level + 1) >= d
    assert ejection_duration(p, 0) == eject_for


def test_slow_start_also_follows_the_end_of_an_ejection() -> None:
    h = BackendHealth(ActiveHealth(slow_start=10.0), PASSIVE)
    eject(h, 0.0)
    assert h.weight_factor(29.0) == 0.0
    assert h.weight_factor(35.0) == pytest.approx(0.5)
    assert h.full_at == 40.0


def test_passive_off_never_ejects() -> None:
    h = BackendHealth(None, None)
    for t in range(50):
        assert h.attempt_failed(float(t) / 100, "x") is None
    assert h.available(1.0) and h.last_error == "x"


# --------------------------------------------------------------------------------------------
# reconfiguration (reload) and Retry-After


def test_removing_active_checks_brings_a_down_backend_up() -> None:
    h = down_health()
    h.configure(None, PASSIVE)
    assert h.state == UP and h.available(0.0) and h.full_at < 0


def test_turning_passive_off_ends_an_ejection() -> None:
    h = BackendHealth(None, PASSIVE)
    eject(h, 0.0)
    h.configure(None, None)
    assert h.available(1.0)


def test_retry_after_is_the_soonest_backend_rounded_up() -> None:
    ejected = BackendHealth(None, PASSIVE)
    eject(ejected, 0.0)  # back at 30
    down = down_health(ActiveHealth(interval=2.0, rise=3, fall=1))  # 3 passed checks: about 6 s
    assert retry_after([ejected], 10.0) == 20
    assert retry_after([ejected], 29.5) == 1
    assert retry_after([down], 10.0) == 6
    assert retry_after([ejected, down], 10.0) == 6
    down.check_passed(10.0)  # one of three done
    assert retry_after([down], 10.0) == 4


def test_retry_after_is_bounded() -> None:
    assert retry_after([], 0.0) == 1
    h = BackendHealth(None, PassiveHealth(eject_for=10_000.0, max_eject_for=10_000.0))
    eject(h, 0.0)
    assert retry_after([h], 0.0) == RETRY_AFTER_MAX


@given(interval=st.floats(0.01, 3600), u=st.floats(0, 1, exclude_max=True))
def test_jittered_interval_stays_within_the_jitter(interval: float, u: float) -> None:
    wait = jittered(interval, u)
    assert interval * (1 - JITTER) * 0.999999 <= wait <= interval * (1 + JITTER)


# --------------------------------------------------------------------------------------------
# active checks end a passive ejection


def test_rise_passed_checks_after_an_ejection_end_it_early_and_slow_start_ramps_from_there() -> None:
    h = BackendHealth(ActiveHealth(interval=1.0, rise=2, fall=3, slow_start=4.0), PASSIVE)
    assert eject(h, 10.0) == 30.0
    assert h.status(10.5) == EJECTED
    assert h.check_passed(11.0) is None  # one is not `rise`
    assert h.status(11.5) == EJECTED and not h.available(11.5)
    change = h.check_passed(12.0)
    assert change is not None and change.state == UP and "ejection" in change.reason
    assert h.available(12.0) and h.ejected_until == 12.0  # 28 s before eject_for would have ended it
    assert h.status(12.0) == SLOW_START and h.weight_factor(13.0) == pytest.approx(0.25)
    assert h.full_at == 16.0 and h.status(16.0) == UP


def test_checks_passed_before_the_ejection_do_not_count_toward_ending_it() -> None:
    h = BackendHealth(ActiveHealth(interval=1.0, rise=2, fall=3), PASSIVE)
    h.attempt_failed(0.0, "x")
    h.check_passed(0.5)  # an up backend passing: nothing to end yet
    h.attempt_failed(0.6, "x")
    assert h.attempt_failed(0.7, "x") is not None
    assert h.check_passed(1.0) is None
    assert not h.available(1.0)
    assert h.check_passed(2.0) is not None and h.available(2.0)


def test_a_failed_check_restarts_the_count_that_ends_an_ejection() -> None:
    h = BackendHealth(ActiveHealth(interval=1.0, rise=2, fall=3), PASSIVE)
    eject(h, 0.0)
    h.check_passed(1.0)
    h.check_failed(2.0, "refused")
    assert h.check_passed(3.0) is None and not h.available(3.0)
    assert h.check_passed(4.0) is not None and h.available(4.0)


def test_a_down_and_ejected_backend_comes_back_with_rise_checks() -> None:
    h = down_health(ActiveHealth(interval=1.0, rise=2, fall=1))
    h.configure(h.active, PASSIVE)
    eject(h, 0.5)
    assert h.status(1.0) == DOWN
    h.check_passed(1.0)
    change = h.check_passed(2.0)
    assert change is not None and change.state == UP
    assert h.available(2.0) and h.status(2.0) == UP


def test_without_active_checks_the_ejection_period_still_applies() -> None:
    h = BackendHealth(None, PASSIVE)
    eject(h, 0.0)
    assert not h.available(29.9) and h.available(30.0)


def test_retry_after_of_an_ejected_backend_with_checks_is_the_rise_checks_left() -> None:
    h = BackendHealth(ActiveHealth(interval=2.0, rise=3, fall=3), PASSIVE)
    eject(h, 0.0)
    assert retry_after([h], 1.0) == 6
    h.check_passed(2.0)
    assert retry_after([h], 2.0) == 4
    assert retry_after([BackendHealth(None, PASSIVE)], 0.0) == 1  # available: the minimum
