"""heartbeat.Schedule: when a leg is pinged, when a peer is dead, when a session is idle or too old.

The schedule is pure (every method takes `now`), so these tests drive it with plain numbers:
interval 20 s, timeout 10 s unless a test says otherwise.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.protocol.heartbeat import (
    BACKEND,
    CLIENT,
    PING_MARKER,
    Expired,
    PeerDead,
    Schedule,
    SendPing,
    lifetime_with_jitter,
)

INTERVAL = 20.0
TIMEOUT = 10.0


def make(now: float = 0.0, **kwargs: object) -> Schedule:
    kwargs.setdefault("interval", INTERVAL)
    kwargs.setdefault("timeout", TIMEOUT)
    return Schedule(now, **kwargs)  # type: ignore[arg-type]


def pings(actions: list) -> dict[str, bytes]:
    return {a.side: a.payload for a in actions if isinstance(a, SendPing)}


def dead(actions: list) -> dict[str, float]:
    return {a.side: a.silent_for for a in actions if isinstance(a, PeerDead)}


# --- pings --------------------------------------------------------------------------------------


def test_nothing_is_due_before_the_interval() -> None:
    s = make()
    assert s.due(19.999) == []
    assert s.next_deadline() == pytest.approx(20.0)


def test_silent_legs_are_pinged_after_the_interval() -> None:
    s = make()
    sent = pings(s.due(20.0))
    assert set(sent) == {CLIENT, BACKEND}
    for payload in sent.values():
        assert payload.startswith(PING_MARKER)
        assert len(payload) <= 125
    assert sent[CLIENT] != sent[BACKEND]


def test_ping_payloads_differ_from_ping_to_ping() -> None:
    s = make()
    first = pings(s.due(20.0))[CLIENT]
    s.saw_traffic(CLIENT, 21.0)
    s.saw_own_pong(CLIENT, first, 21.0)
    second = pings(s.due(41.0))[CLIENT]
    assert second != first and second.startswith(PING_MARKER)


def test_a_pinged_leg_is_not_pinged_again_while_the_ping_is_outstanding() -> None:
    s = make()
    assert set(pings(s.due(20.0))) == {CLIENT, BACKEND}
    assert s.due(25.0) == []


def test_traffic_postpones_the_ping() -> None:
    s = make()
    s.saw_traffic(CLIENT, 15.0)
    actions = s.due(20.0)
    assert set(pings(actions)) == {BACKEND}
    s.saw_traffic(BACKEND, 20.1)
    assert s.due(34.9) == []
    assert set(pings(s.due(35.0))) == {CLIENT}


def test_traffic_on_one_leg_does_not_postpone_the_other() -> None:
    s = make()
    for t in (5.0, 10.0, 15.0, 19.0):
        s.saw_traffic(BACKEND, t)
    assert set(pings(s.due(20.0))) == {CLIENT}


def test_legs_client_only_pings_the_client() -> None:
    s = make(sides=(CLIENT,))
    assert set(pings(s.due(20.0))) == {CLIENT}
    # the backend leg is never watched: no ping and no death, however long it is silent
    for t in (100.0, 1000.0):
        assert all(getattr(a, "leg", CLIENT) == CLIENT for a in s.due(t))


def test_legs_backend_only_pings_the_backend() -> None:
    s = make(sides=(BACKEND,))
    assert set(pings(s.due(20.0))) == {BACKEND}


def test_no_interval_means_no_pings_and_no_deadline() -> None:
    s = make(interval=None)
    assert s.next_deadline() is None
    assert s.due(10_000.0) == []


def test_no_legs_means_no_pings() -> None:
    s = make(sides=())
    assert s.next_deadline() is None
    assert s.due(10_000.0) == []


# --- dead peers -----------------------------------------------------------------------------------


def test_no_pong_and_no_traffic_within_timeout_means_peer_dead() -> None:
    s = make()
    s.due(20.0)
    assert s.due(29.9) == []
    actions = s.due(30.0)
    assert dead(actions) == {CLIENT: pytest.approx(30.0), BACKEND: pytest.approx(30.0)}


def test_peer_dead_reports_time_since_last_traffic() -> None:
    s = make()
    s.saw_traffic(CLIENT, 7.0)
    assert set(pings(s.due(27.0))) == {CLIENT, BACKEND}  # both overdue by now: both pinged at 27
    assert dead(s.due(37.0)) == {CLIENT: pytest.approx(30.0), BACKEND: pytest.approx(37.0)}


def test_peer_dead_at_exactly_interval_plus_timeout_after_last_traffic() -> None:
    s = make(sides=(CLIENT,))
    s.saw_traffic(CLIENT, 3.0)
    assert s.next_deadline() == pytest.approx(23.0)
    assert set(pings(s.due(23.0))) == {CLIENT}
    assert s.next_deadline() == pytest.approx(33.0)
    assert dead(s.due(33.0)) == {CLIENT: pytest.approx(30.0)}


def test_own_pong_keeps_the_leg_alive_and_schedules_the_next_ping() -> None:
    s = make(sides=(CLIENT,))
    payload = pings(s.due(20.0))[CLIENT]
    s.saw_traffic(CLIENT, 20.5)
    s.saw_own_pong(CLIENT, payload, 20.5)
    assert dead(s.due(30.0)) == {}
    assert s.due(40.4) == []
    assert set(pings(s.due(40.5))) == {CLIENT}


def test_traffic_after_the_ping_without_a_pong_is_not_dead_and_is_pinged_again_later() -> None:
    s = make(sides=(CLIENT,))
    assert set(pings(s.due(20.0))) == {CLIENT}
    s.saw_traffic(CLIENT, 25.0)  # data, but no pong (it may be queued behind that data)
    assert s.due(30.0) == []
    actions = s.due(35.0)
    assert dead(actions) == {}
    # pinged again once the leg has been silent an interval since that traffic
    assert s.next_deadline() is not None and s.next_deadline() <= 45.0
    again = pings(s.due(45.0))
    assert set(again) == {CLIENT}
    assert dead(s.due(55.0)) == {CLIENT: pytest.approx(30.0)}


def test_a_pong_with_another_payload_does_not_count_as_the_answer() -> None:
    s = make(sides=(CLIENT,))
    payload = pings(s.due(20.0))[CLIENT]
    s.saw_own_pong(CLIENT, PING_MARKER + b"not-ours", 20.0)
    s.saw_own_pong(CLIENT, payload + b"x", 20.0)
    assert s.rtt(CLIENT) is None
    assert dead(s.due(30.0)) == {CLIENT: pytest.approx(30.0)}


# --- rtt -------------------------------------------------------------------------------------------


def test_own_pong_records_rtt() -> None:
    s = make()
    sent = pings(s.due(20.0))
    assert s.rtt(CLIENT) is None and s.rtt(BACKEND) is None
    s.saw_traffic(CLIENT, 20.25)
    s.saw_own_pong(CLIENT, sent[CLIENT], 20.25)
    assert s.rtt(CLIENT) == pytest.approx(0.25)
    assert s.rtt(BACKEND) is None
    s.saw_traffic(BACKEND, 21.5)
    s.saw_own_pong(BACKEND, sent[BACKEND], 21.5)
    assert s.rtt(BACKEND) == pytest.approx(1.5)


def test_rtt_is_the_last_pong_s() -> None:
    s = make(sides=(CLIENT,))
    first = pings(s.due(20.0))[CLIENT]
    s.saw_traffic(CLIENT, 21.0)
    s.saw_own_pong(CLIENT, first, 21.0)
    second = pings(s.due(41.0))[CLIENT]
    s.saw_traffic(CLIENT, 41.1)
    s.saw_own_pong(CLIENT, second, 41.1)
    assert s.rtt(CLIENT) == pytest.approx(0.1)


def test_a_pong_for_the_other_legs_ping_does_not_record_rtt() -> None:
    s = make()
    sent = pings(s.due(20.0))
    s.saw_own_pong(CLIENT, sent[BACKEND], 20.5)
    assert s.rtt(CLIENT) is None
    assert s.rtt(BACKEND) is None


def test_a_repeated_pong_does_not_overwrite_rtt() -> None:
    s = make(sides=(CLIENT,))
    payload = pings(s.due(20.0))[CLIENT]
    s.saw_own_pong(CLIENT, payload, 20.2)
    s.saw_own_pong(CLIENT, payload, 29.0)
    assert s.rtt(CLIENT) == pytest.approx(0.2)


def test_rtt_of_an_unwatched_leg_is_none() -> None:
    s = make(sides=(CLIENT,))
    s.due(20.0)
    s.saw_own_pong(BACKEND, PING_MARKER + b"x", 20.1)
    assert s.rtt(BACKEND) is None


# --- idle ------------------------------------------------------------------------------------------


def test_idle_expires_without_data() -> None:
    s = make(interval=None, idle=60.0)
    assert s.next_deadline() == pytest.approx(60.0)
    assert s.due(59.9) == []
    assert s.due(60.0) == [Expired("idle")]


def test_data_postpones_idle() -> None:
    s = make(interval=None, idle=60.0)
    s.saw_data(40.0)
    assert s.due(60.0) == []
    assert s.next_deadline() == pytest.approx(100.0)
    assert s.due(100.0) == [Expired("idle")]


def test_traffic_that_is_not_data_does_not_postpone_idle() -> None:
    s = make(idle=60.0)
    for t in (10.0, 20.0, 30.0, 40.0, 50.0):
        s.saw_traffic(CLIENT, t)
        s.saw_traffic(BACKEND, t)
    assert s.due(60.0) == [Expired("idle")]


def test_idle_off_never_expires() -> None:
    s = make(interval=None, idle=None)
    assert s.due(1e9) == []


# --- max lifetime ---------------------------------------------------------------------------------


def test_max_lifetime_expires() -> None:
    s = make(5.0, interval=None, lifetime=100.0)
    assert s.next_deadline() == pytest.approx(105.0)
    assert s.due(104.9) == []
    assert s.due(105.0) == [Expired("max_lifetime")]


def test_data_does_not_postpone_max_lifetime() -> None:
    s = make(interval=None, lifetime=100.0)
    for t in (10.0, 50.0, 99.0):
        s.saw_data(t)
        s.saw_traffic(CLIENT, t)
    assert s.due(100.0) == [Expired("max_lifetime")]


# --- next_deadline --------------------------------------------------------------------------------


def test_next_deadline_is_the_min_of_what_is_pending() -> None:
    s = make(sides=(CLIENT, BACKEND), idle=60.0, lifetime=100.0)
    assert s.next_deadline() == pytest.approx(20.0)
    s.saw_traffic(CLIENT, 15.0)
    s.saw_traffic(BACKEND, 12.0)
    assert s.next_deadline() == pytest.approx(32.0)
    assert set(pings(s.due(32.0))) == {BACKEND}
    assert s.next_deadline() == pytest.approx(35.0)  # the client's ping
    assert set(pings(s.due(35.0))) == {CLIENT}
    assert s.next_deadline() == pytest.approx(42.0)  # the backend's ping timeout


def test_next_deadline_is_idle_when_it_comes_first() -> None:
    s = make(idle=5.0, lifetime=100.0)
    assert s.next_deadline() == pytest.approx(5.0)


def test_next_deadline_is_lifetime_when_it_comes_first() -> None:
    s = make(idle=60.0, lifetime=3.0)
    assert s.next_deadline() == pytest.approx(3.0)


def test_next_deadline_after_a_ping_is_its_timeout() -> None:
    s = make(sides=(CLIENT,))
    s.due(20.0)
    assert s.next_deadline() == pytest.approx(30.0)


# --- jitter ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [0.0, 0.25, 0.5, 0.999999])
def test_lifetime_with_jitter_stays_within_the_band(unit: float) -> None:
    got = lifetime_with_jitter(100.0, 0.1, unit)
    assert 90.0 <= got <= 100.0


def test_lifetime_with_jitter_spreads_lifetimes() -> None:
    got = {lifetime_with_jitter(100.0, 0.1, u / 10) for u in range(10)}
    assert len(got) == 10


def test_lifetime_without_jitter_is_the_lifetime() -> None:
    assert lifetime_with_jitter(100.0, 0.0, 0.7) == pytest.approx(100.0)


@given(
    lifetime=st.floats(min_value=0.001, max_value=1e7, allow_nan=False),
    jitter=st.floats(min_value=0.0, max_value=0.999, allow_nan=False),
    unit=st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False),
)
def test_lifetime_with_jitter_is_always_in_band(lifetime: float, jitter: float, unit: float) -> None:
    got = lifetime_with_jitter(lifetime, jitter, unit)
    assert lifetime * (1 - jitter) * (1 - 1e-12) <= got <= lifetime * (1 + 1e-12)


# --- property: random event sequences ----------------------------------------------------------

_events = st.lists(
    st.tuples(
        st.sampled_from(["traffic", "data", "own_pong", "stray_pong", "due", "due_at_deadline"]),
        st.sampled_from([CLIENT, BACKEND]),
        st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=_events,
    interval=st.one_of(st.none(), st.floats(min_value=0.01, max_value=60.0)),
    timeout=st.floats(min_value=0.01, max_value=30.0),
    sides=st.sampled_from([(CLIENT, BACKEND), (CLIENT,), (BACKEND,), ()]),
    idle=st.one_of(st.none(), st.floats(min_value=0.01, max_value=200.0)),
    lifetime=st.one_of(st.none(), st.floats(min_value=0.01, max_value=500.0)),
)
def test_random_events_never_move_the_deadline_back_to_or_before_now(
    events: list[tuple[str, str, float]],
    interval: float | None,
    timeout: float,
    sides: tuple[str, ...],
    idle: float | None,
    lifetime: float | None,
) -> None:
    now = 0.0
    s = Schedule(now, interval=interval, timeout=timeout, sides=sides, idle=idle, lifetime=lifetime)
    last_ping: dict[str, bytes] = {}
    for kind, leg, step in events:
        if kind == "due_at_deadline":
            deadline = s.next_deadline()
            if deadline is None:
                continue
            now = max(now, deadline)
        else:
            now += step
        if kind == "traffic":
            s.saw_traffic(leg, now)
        elif kind == "data":
            s.saw_data(now)
        elif kind == "own_pong":
            s.saw_traffic(leg, now)
            s.saw_own_pong(leg, last_ping.get(leg, PING_MARKER), now)
        elif kind == "stray_pong":
            s.saw_own_pong(leg, PING_MARKER + b"stray", now)
        else:
            actions = s.due(now)
            for a in actions:
                assert isinstance(a, SendPing | PeerDead | Expired)
                if isinstance(a, SendPing):
                    assert a.side in sides and interval is not None
                    assert a.payload.startswith(PING_MARKER) and len(a.payload) <= 125
                    last_ping[a.side] = a.payload
                if isinstance(a, PeerDead):
                    assert a.side in sides and a.silent_for >= 0
            if any(isinstance(a, PeerDead | Expired) for a in actions):
                return  # the session ends: the timer is not re-armed
            deadline = s.next_deadline()
            # after processing what is due at `now`, the next deadline lies strictly ahead:
            # a deadline at or before `now` would make the timer task spin
            assert deadline is None or deadline > now
        for leg_name in (CLIENT, BACKEND):
            rtt = s.rtt(leg_name)
            assert rtt is None or rtt >= 0


# --- a ping held behind a long frame ------------------------------------------------------------


def test_a_held_ping_times_out_only_after_it_could_be_sent() -> None:
    s = make(sides=(CLIENT,))
    assert pings(s.due(20.0))
    s.ping_held(CLIENT, 29.0)  # still queued behind a frame the client is receiving
    assert dead(s.due(30.0)) == {}
    assert s.next_deadline() == pytest.approx(39.0)
    assert dead(s.due(39.0)) == {CLIENT: 39.0}


def test_ping_held_without_an_outstanding_ping_changes_nothing() -> None:
    s = make()
    s.ping_held(CLIENT, 15.0)
    assert s.next_deadline() == pytest.approx(20.0)
