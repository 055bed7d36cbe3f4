"""policy.relay_phase.RelayPhase with plain values: events in, actions out, no sockets, no clock.

The relay under it is the real passthrough relay (frames forwarded verbatim), so what a test
sends are real WebSocket frames; the "driver" here is the test, which reports what its sends took.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.policy import relay_phase as rp
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.policy.relay_phase import RelayPhase
from wsproxy.protocol.frames import build_close, build_frame, build_pong, parse_close
from wsproxy.protocol.heartbeat import Schedule, SendPing
from wsproxy.protocol.relay_passthrough import PING_MARKER, PassthroughRelay
from wsproxy.protocol.sides import Side


def phase(**kw: Any) -> RelayPhase:
    kw.setdefault("close_timeout", 5.0)
    return RelayPhase(PassthroughRelay(), **kw)


def taken(actions: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The actions of one event, as a driver takes them (the phase reuses its list)."""
    out = list(actions)
    actions.clear()
    return out


def sends(actions: list[tuple[Any, ...]], side: str) -> list[bytes]:
    return [bytes(a[2]) for a in actions if a[0] == rp.SEND and a[1] == side]


def text(data: bytes, *, from_client: bool = True) -> bytes:
    return build_frame(0x1, data, mask=from_client)


def test_a_read_from_the_client_becomes_a_send_to_the_backend() -> None:
    p = phase()
    frame = text(b"hello")
    got = taken(p.received("client", frame, now=1.0))
    assert got == [(rp.SEND, "backend", frame)]
    assert p.may_read(p.client) is False  # backpressure: its bytes are in flight
    assert taken(p.sent("backend", len(frame), now=1.0)) == []
    assert p.may_read(p.client) is True
    assert p.wants(p.backend) == (True, False)


def test_a_partial_send_keeps_the_rest_and_stops_reading_the_producer_until_it_is_out() -> None:
    p = phase(slow_consumer_timeout=3.0)
    frame = text(b"x" * 1000)
    taken(p.received("client", frame, now=1.0))
    got = taken(p.sent("backend", 400, now=1.0))
    assert got == [(rp.ARM, rp.STALL_TIMER, "backend", 4.0)]  # the slow-consumer deadline
    assert bytes(p.backend.out) == frame[400:]
    assert p.wants(p.client) == (False, False) and p.wants(p.backend) == (True, True)
    got = taken(p.sent("backend", len(frame) - 400, now=2.5))
    assert (rp.REPORT, rp.STALL_ENDED, "backend", 1.5) in got
    assert (rp.CANCEL, rp.STALL_TIMER, "backend") in got
    assert p.may_read(p.client)


def test_a_write_that_took_nothing_is_retried_with_the_same_buffer_and_new_bytes_wait_behind_it() -> None:
    """OpenSSL's rule: a write it answered with want-write is repeated with the same buffer. The
    proxy's own ping queued meanwhile must not grow it: it waits behind, and goes next."""
    p = phase()
    frame = text(b"y" * 100, from_client=False)
    out = taken(p.received("backend", frame, now=0.0))[0][2]
    taken(p.sent("client", 0, now=0.0))  # want-write: nothing taken
    assert p.relay.send_ping("client", PING_MARKER + b"1")
    assert taken(p.settle(now=0.1)) == []  # nothing sent while the first write is pending
    assert p.client.out is out  # the very buffer given to the first send
    got = taken(p.sent("client", len(frame), now=0.2))
    assert got == [(rp.SEND, "client", build_frame(0x9, PING_MARKER + b"1", mask=False))]


def test_the_slow_consumer_gets_1008_after_its_frame_in_flight_and_lingers() -> None:
    p = phase(slow_consumer_timeout=2.0)
    frame = text(b"z" * 50, from_client=False)
    taken(p.received("backend", frame, now=0.0))
    taken(p.sent("client", 10, now=0.0))
    got = taken(p.timer(rp.STALL_TIMER, "client", now=2.0))
    assert (rp.REPORT, rp.SLOW_CONSUMER, "client", 2.0) in got
    assert (rp.CLOSE, "client") not in got
    (close,) = sends(got, "backend")
    assert close[0] == 0x88  # a close frame, masked toward the backend, code 1001 with the reason
    assert p.relay.stats.proxy_close.code == 1008
    # the rest of the frame in flight, then the 1008, once the client reads again
    got = taken(p.sent("client", len(frame) - 10, now=2.5))
    (to_client,) = sends(got, "client")
    assert parse_close(to_client[2:]) == (1008, "client too slow: nothing accepted for 2s")
    got = taken(p.sent("client", len(to_client), now=2.5))
    assert got == [(rp.SHUT, "client")]  # a FIN after the close; reading and discarding goes on
    assert p.wants(p.client) == (True, False)
    taken(p.received("client", build_close(1008, "", mask=True), now=2.6))  # its answer, discarded
    assert not p.client.closed
    got = taken(p.received("client", b"", now=2.7))
    assert (rp.CLOSE, "client") in got


def test_a_slow_consumer_whose_frame_cannot_be_finished_is_dropped_without_a_close() -> None:
    p = phase(slow_consumer_timeout=2.0, finish_limit=100)
    head = build_frame(0x2, b"q" * 1000, mask=False)[:300]  # a frame of 1000, 700 still unread
    taken(p.received("backend", head, now=0.0))
    taken(p.sent("client", 10, now=0.0))
    got = taken(p.timer(rp.STALL_TIMER, "client", now=2.0))
    assert (rp.CLOSE, "client") in got and p.client.out == b""
    (close,) = sends(got, "backend")
    assert close[0] == 0x88


def test_a_side_closed_on_a_protocol_error_lingers_until_it_ends() -> None:
    p = phase()
    bad = build_frame(0x1, b"x", mask=False)  # unmasked from a client: 1002
    got = taken(p.received("client", bad, now=0.0))
    (to_backend,) = sends(got, "backend")  # the backend hears first (1001) ...
    assert sends(got, "client") == []
    taken(p.sent("backend", len(to_backend), now=0.0))
    got = taken(p.received("backend", build_close(1001, "", mask=False), now=0.0))  # ... and answers
    assert (rp.CLOSE, "backend") in got
    (to_client,) = sends(got, "client")
    assert parse_close(to_client[2:])[0] == 1002
    got = taken(p.sent("client", len(to_client), now=0.0))
    assert (rp.SHUT, "client") in got and (rp.CLOSE, "client") not in got
    assert p.may_read(p.client)  # its input is read and discarded: no reset swallows the 1002
    assert taken(p.received("client", text(b"more"), now=0.1)) == []
    assert (rp.CLOSE, "client") in taken(p.received("client", b"", now=0.2))


def test_a_stall_timer_that_fires_after_the_bytes_left_does_nothing() -> None:
    p = phase(slow_consumer_timeout=2.0)
    frame = text(b"z" * 50, from_client=False)
    taken(p.received("backend", frame, now=0.0))
    taken(p.sent("client", 10, now=0.0))
    taken(p.sent("client", len(frame) - 10, now=1.0))
    assert taken(p.timer(rp.STALL_TIMER, "client", now=2.0)) == []
    assert not p.client.closed


def test_a_client_over_its_byte_rate_is_held_then_read_again_then_closed_with_1008() -> None:
    flow = FlowLimiter(now=0.0, nbytes=(100.0, 100.0), close_after=2.0)
    p = phase(flow=flow)
    frame = text(b"a" * 150)  # 158 bytes on the wire: 100 within the burst, 58 held
    got = taken(p.received("client", frame, now=0.0))
    assert sends(got, "backend") == [frame[:100]]
    assert (rp.REPORT, rp.THROTTLED, "client", None) in got
    arm = next(a for a in got if a[0] == rp.ARM and a[1] == rp.THROTTLE_TIMER)
    assert arm[3] == pytest.approx(0.58)  # until the budget has room for what is held
    taken(p.sent("backend", 100, now=0.0))
    assert not p.may_read(p.client)  # held by the budget, not by backpressure
    got = taken(p.timer(rp.THROTTLE_TIMER, "client", now=arm[3]))
    assert sends(got, "backend") == [frame[100:]]  # what was held goes on, nothing was lost
    taken(p.sent("backend", 58, now=arm[3]))
    assert p.may_read(p.client)
    # over the rate again and again: once it has been held for close_after, 1008
    now = arm[3]
    for _ in range(20):
        got = taken(p.received("client", frame, now=now))
        while True:
            for a in got:
                if a[0] == rp.SEND:
                    got = taken(p.sent(a[1], len(a[2]), now=now))
                    break
            else:
                break
            if any(a[:2] == (rp.REPORT, rp.RATE_CLOSED) for a in got):
                break
        arm = next((a for a in got if a[0] == rp.ARM and a[1] == rp.THROTTLE_TIMER), None)
        if any(a[:2] == (rp.REPORT, rp.RATE_CLOSED) for a in got):
            break
        if arm is not None:
            now = arm[3]
            got = taken(p.timer(rp.THROTTLE_TIMER, "client", now=now))
            if any(a[:2] == (rp.REPORT, rp.RATE_CLOSED) for a in got):
                break
            for a in got:
                if a[0] == rp.SEND:
                    taken(p.sent(a[1], len(a[2]), now=now))
    else:
        raise AssertionError("never closed")
    (to_client,) = sends(got, "client")
    assert parse_close(to_client[2:])[0] == 1008


def test_a_message_budget_holds_messages_beyond_it_until_tokens_arrive() -> None:
    flow = FlowLimiter(now=0.0, messages=(10.0, 3.0), close_after=None)
    p = phase(flow=flow)
    frames = [text(f"m{i}".encode()) for i in range(8)]
    got = taken(p.received("client", b"".join(frames), now=0.0))  # one read, eight messages
    assert sends(got, "backend") == [b"".join(frames[:3])]  # the burst, whole messages
    assert p.relay.held("client") == sum(map(len, frames[3:]))
    arm = next(a for a in got if a[0] == rp.ARM and a[1] == rp.THROTTLE_TIMER)
    assert arm[3] == pytest.approx(0.1)  # one token
    taken(p.sent("backend", sum(map(len, frames[:3])), now=0.0))
    assert not p.may_read(p.client)
    got = taken(p.timer(rp.THROTTLE_TIMER, "client", now=0.25))  # two and a half tokens by now
    assert sends(got, "backend") == [b"".join(frames[3:5])]
    assert p.relay.stats.messages_to_backend == 5 and not p.may_read(p.client)


def test_a_close_from_the_client_arms_the_close_timer_which_ends_the_session() -> None:
    p = phase(close_timeout=5.0)
    got = taken(p.received("client", build_close(1000, "bye", mask=True), now=10.0))
    assert (rp.ARM, rp.CLOSE_TIMER, None, 15.0) in got
    taken(p.sent("backend", len(got[0][2]), now=10.0))
    assert taken(p.timer(rp.CLOSE_TIMER, None, now=15.0)) == [(rp.END,)]
    assert p.done and p.wants(p.client) == (False, False)


def test_a_full_closing_handshake_closes_both_sides_and_ends() -> None:
    p = phase()
    close = build_close(1000, "", mask=True)
    taken(p.received("client", close, now=0.0))
    assert taken(p.sent("backend", len(close), now=0.0)) == []
    answer = build_close(1000, "", mask=False)
    # the backend's answer closes the backend at once; the client once the answer is out
    assert taken(p.received("backend", answer, now=0.1)) == [(rp.SEND, "client", answer), (rp.CLOSE, "backend")]
    assert taken(p.sent("client", len(answer), now=0.1)) == [(rp.CLOSE, "client"), (rp.END,)]


def test_a_failed_send_closes_that_side_and_the_other_peer_hears_1001() -> None:
    p = phase()
    frame = text(b"q", from_client=False)
    taken(p.received("backend", frame, now=0.0))
    got = taken(p.send_failed("client", now=0.0))
    assert (rp.CLOSE, "client") in got
    (close,) = sends(got, "backend")
    assert close[0] == 0x88


def test_heartbeat_accounting_traffic_data_and_own_pongs() -> None:
    schedule = Schedule(0.0, interval=1.0, timeout=5.0, sides=(Side.CLIENT,), idle=60.0)
    p = phase(schedule=schedule)
    frame = text(b"hi")
    taken(p.received("client", frame, now=3.0))
    assert schedule.last_data == 3.0
    taken(p.sent("backend", len(frame), now=3.0))
    (ping,) = [a for a in schedule.due(4.5) if isinstance(a, SendPing)]  # the client is silent since 3.0
    assert p.relay.send_ping("client", ping.payload)
    (sent,) = sends(taken(p.settle(now=4.5)), "client")
    taken(p.sent("client", len(sent), now=4.5))
    got = taken(p.received("client", build_pong(ping.payload, mask=True), now=4.75))
    assert got == [(rp.REPORT, rp.PONG_RTT, "client", 0.25)]  # swallowed, measured
    assert schedule.rtt("client") == 0.25
    assert schedule.last_data == 3.0  # a pong is traffic, not data


def test_eof_from_both_peers_ends_the_session() -> None:
    p = phase()
    got = taken(p.received("client", b"", now=0.0))
    (close,) = sends(got, "backend")  # the client vanished: the backend hears 1001
    assert (rp.CLOSE, "client") in got and not p.may_read(p.client)
    got = taken(p.sent("backend", len(close), now=0.0)) + taken(p.received("backend", b"", now=0.1))
    assert got == [(rp.CLOSE, "backend"), (rp.END,)]


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12),
    takes=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=60),
    pings=st.lists(st.booleans(), min_size=1, max_size=60),
)
def test_whatever_the_sends_take_every_byte_arrives_once_in_order(
    messages: list[bytes], takes: list[int], pings: list[bool]
) -> None:
    """Reads from the client whenever the phase allows, sends that take arbitrary amounts (0
    included: want-write), the proxy's pings queued at arbitrary moments: the backend receives
    exactly the client's frames in order with the pings between frames, the in-flight buffer is
    only ever replaced once it was sent whole, and pending bytes never exceed one read plus the
    queued control frames."""
    p = phase()
    frames = [text(m) for m in messages]
    wire = bytearray()
    queue = list(frames)
    step = 0
    pings_queued = 0
    in_flight: bytes | memoryview = b""
    while queue or p.backend.out:
        step += 1
        assert step < 10_000
        if pings[step % len(pings)] and pings_queued < 5 and p.relay.send_ping("backend", PING_MARKER + b"%d" % step):
            pings_queued += 1
            for a in taken(p.settle(now=float(step))):
                assert a[0] == rp.SEND and not in_flight, "a new buffer while one was in flight"
                in_flight = a[2]
        if p.may_read(p.client) and queue:
            for a in taken(p.received("client", queue.pop(0), now=float(step))):
                assert a[0] == rp.SEND and not in_flight
                in_flight = a[2]
        assert len(p.backend.out) + sum(map(len, p.backend.more or ())) <= 300 + 8 + 5 * 20
        if in_flight:
            # arbitrary amounts for a while (0: the peer takes nothing), then whole sends
            n = min(takes[step % len(takes)], len(in_flight)) if step < 3 * len(takes) else len(in_flight)
            wire += bytes(in_flight)[:n]
            assert p.backend.out is in_flight
            next_actions = taken(p.sent("backend", n, now=float(step)))
            in_flight = p.backend.out
            for a in next_actions:
                if a[0] == rp.SEND:
                    assert a[2] is p.backend.out
    assert _strip_pings(bytes(wire)) == b"".join(frames)


# --- splicing: payload bytes that cross outside the relay (a kernel pipe in the driver) ----------


def test_a_large_frames_payload_is_spliced_after_its_head_and_the_next_head_is_read_alone() -> None:
    p = phase(splice_min_bytes=1000, finish_limit=4096)
    frame = text(b"a" * 3000)
    first = frame[:100]  # a read that got the head and the start of the payload
    got = taken(p.received("client", first, now=1.0))
    assert sends(got, "backend") == [first]
    taken(p.sent("backend", len(first), now=1.0))
    assert p.splice_size(p.client) == len(frame) - 100  # the rest of the payload, one read's worth at most
    got = taken(p.spliced("client", 1000, now=2.0))
    assert got == [(rp.PIPE, "backend")]
    assert p.backend.piped == 1000 and not p.may_read(p.client)  # backpressure: the pipe is pending bytes
    assert p.wants(p.backend) == (True, True)
    assert taken(p.piped_sent("backend", 1000, now=2.0)) == []
    assert p.may_read(p.client) and p.splice_size(p.client) == len(frame) - 1100
    taken(p.spliced("client", len(frame) - 1100, now=3.0))
    taken(p.piped_sent("backend", len(frame) - 1100, now=3.0))
    stats = p.relay.stats
    assert stats.client_bytes_in == len(frame) and stats.messages_to_backend == 1
    # the frame was large: the next read takes a frame head only, so its payload can be spliced whole
    assert p.read_size(p.client, 4096) == 14
    small = text(b"hi")
    taken(p.received("client", small, now=4.0))
    assert p.read_size(p.client, 4096) == 4096  # a small frame: back to whole reads


def test_below_the_threshold_or_without_it_nothing_is_spliced() -> None:
    p = phase(finish_limit=4096)  # splice_min_bytes None: never
    taken(p.received("client", text(b"a" * 3000)[:100], now=1.0))
    taken(p.sent("backend", 100, now=1.0))
    assert p.splice_size(p.client) == 0 and p.read_size(p.client, 4096) == 4096
    p = phase(splice_min_bytes=5000, finish_limit=4096)
    taken(p.received("client", text(b"a" * 3000)[:100], now=1.0))
    taken(p.sent("backend", 100, now=1.0))
    assert p.splice_size(p.client) == 0


def test_a_client_under_a_rate_limit_is_never_spliced() -> None:
    flow = FlowLimiter(now=0.0, nbytes=(1e9, 1e9), close_after=None)
    p = phase(splice_min_bytes=100, finish_limit=4096, flow=flow)
    taken(p.received("client", text(b"a" * 3000)[:100], now=1.0))
    taken(p.sent("backend", 100, now=1.0))
    assert p.splice_size(p.client) == 0 and p.read_size(p.client, 4096) == 4096


def test_a_pipe_that_takes_nothing_starts_the_slow_consumer_clock_and_a_stuck_one_is_dropped() -> None:
    p = phase(splice_min_bytes=100, finish_limit=500, slow_consumer_timeout=3.0)
    frame = text(b"a" * 3000)
    taken(p.received("client", frame[:100], now=1.0))
    taken(p.sent("backend", 100, now=1.0))
    taken(p.spliced("client", 500, now=1.0))
    assert taken(p.piped_sent("backend", 0, now=1.0)) == [(rp.ARM, rp.STALL_TIMER, "backend", 4.0)]
    got = taken(p.timer(rp.STALL_TIMER, "backend", now=4.0))
    # more than finish_limit of the frame is still to come: it cannot be finished, the backend is dropped
    assert (rp.CLOSE, "backend") in got and p.backend.piped == 0
    (close,) = sends(got, "client")
    assert parse_close(close[2:]) == (1001, "backend too slow: nothing accepted for 3s")


def test_the_proxys_own_frames_wait_behind_the_spliced_payload() -> None:
    p = phase(splice_min_bytes=100, finish_limit=4096)
    frame = text(b"a" * 1000)
    taken(p.received("client", frame[:50], now=1.0))
    taken(p.sent("backend", 50, now=1.0))
    assert p.relay.send_ping("backend", PING_MARKER + b"1")
    assert taken(p.settle(now=1.0)) == []  # mid-frame: the ping waits for its end
    got = taken(p.spliced("client", len(frame) - 50, now=2.0))
    assert got == [(rp.PIPE, "backend")]  # the frame ended: the ping is queued behind the pipe
    assert p.backend.out == b"" and p.backend.more
    got = taken(p.piped_sent("backend", len(frame) - 50, now=2.0))
    assert [a[0] for a in got] == [rp.SEND] and bytes(got[0][2])[0] & 0x0F == 0x9


def test_a_peer_that_ends_in_the_middle_of_a_spliced_payload_leaves_the_other_without_a_close() -> None:
    p = phase(splice_min_bytes=100, finish_limit=4096)
    frame = text(b"a" * 3000)
    taken(p.received("client", frame[:100], now=1.0))
    taken(p.sent("backend", 100, now=1.0))
    taken(p.spliced("client", 400, now=1.0))
    taken(p.piped_sent("backend", 400, now=1.0))
    got = taken(p.received("client", b"", now=2.0))  # the client vanished mid-frame
    # no close frame can follow a cut frame: the backend's write side is shut (a lingering close)
    assert (rp.CLOSE, "client") in got and (rp.SHUT, "backend") in got
    assert not sends(got, "backend")


def _strip_pings(got: bytes) -> bytes:
    """The client-to-backend wire without the proxy's pings (every frame whole, all masked)."""
    stripped = bytearray()
    pos = 0
    while pos < len(got):
        length = got[pos + 1] & 0x7F
        head = 2 + (2 if length == 126 else 0) + 4
        if length == 126:
            length = int.from_bytes(got[pos + 2 : pos + 4], "big")
        end = pos + head + length
        if got[pos] & 0x0F != 0x9:
            stripped += got[pos:end]
        pos = end
    return bytes(stripped)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=10),
    chunks=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=30),
    takes=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=60),
    pings=st.lists(st.booleans(), min_size=1, max_size=60),
)
def test_with_splicing_every_byte_arrives_once_in_order(
    sizes: list[int], chunks: list[int], takes: list[int], pings: list[bool]
) -> None:
    """The client's stream read in arbitrary chunks, or spliced where the phase allows it (an
    arbitrary part of what it allows), the pipe and the sends taking arbitrary amounts, the
    proxy's pings queued at arbitrary moments: the backend receives exactly the client's frames
    in order, with the pings only between frames; nothing new is sent while a send or the pipe
    is in flight; pending bytes stay within one read plus the queued control frames; and the
    relay counts every byte and message, spliced or read."""
    read = 256
    p = phase(splice_min_bytes=64, finish_limit=read)
    messages = [bytes((k + i) % 256 for i in range(size)) for k, size in enumerate(sizes)]
    frames = [text(m) for m in messages]
    stream = b"".join(frames)
    pos = 0
    pipe = bytearray()  # what the driver moved into the pipe toward the backend, not yet sent on
    wire = bytearray()
    in_flight: bytes | memoryview = b""
    step = 0
    pings_queued = 0

    def carry_out(actions: list[tuple[Any, ...]]) -> None:
        nonlocal in_flight
        for a in taken(actions):
            if a[0] == rp.SEND:
                assert a[1] == "backend" and not in_flight and not p.backend.piped, (
                    "a new buffer while bytes were in flight"
                )
                in_flight = a[2]
            else:  # (the stall clock's reports and timers come and go with the arbitrary takes)
                assert a == (rp.PIPE, "backend") or a[0] in (rp.REPORT, rp.ARM, rp.CANCEL), a

    while pos < len(stream) or p.backend.out or p.backend.piped:
        step += 1
        assert step < 20_000
        if pings[step % len(pings)] and pings_queued < 5 and p.relay.send_ping("backend", PING_MARKER + b"%d" % step):
            pings_queued += 1
            carry_out(p.settle(now=float(step)))
        if p.may_read(p.client) and pos < len(stream):
            chunk = chunks[step % len(chunks)]
            allowed = p.splice_size(p.client)
            if allowed:
                n = min(allowed, chunk)
                pipe += stream[pos : pos + n]
                pos += n
                carry_out(p.spliced("client", n, now=float(step)))
            else:
                n = min(p.read_size(p.client, read), chunk)
                data = stream[pos : pos + n]
                pos += n
                carry_out(p.received("client", data, now=float(step)))
        assert len(p.backend.out) + p.backend.piped + sum(map(len, p.backend.more or ())) <= read + 14 + 5 * 20
        assert len(pipe) == p.backend.piped
        late = step >= 3 * len(takes)  # arbitrary amounts for a while (0 included), then whole sends
        if p.backend.piped:
            n = len(pipe) if late else min(takes[step % len(takes)], len(pipe))
            wire += pipe[:n]
            del pipe[:n]
            carry_out(p.piped_sent("backend", n, now=float(step)))
        elif in_flight:
            n = len(in_flight) if late else min(takes[step % len(takes)], len(in_flight))
            wire += bytes(in_flight)[:n]
            assert p.backend.out is in_flight
            next_actions = p.sent("backend", n, now=float(step))
            in_flight = p.backend.out
            for a in next_actions:
                if a[0] == rp.SEND:
                    assert a[2] is p.backend.out
            next_actions.clear()
    assert _strip_pings(bytes(wire)) == stream
    stats = p.relay.stats
    assert stats.client_bytes_in == len(stream) and stats.messages_to_backend == len(messages)


def test_a_lingering_peer_whose_last_frame_was_large_is_read_in_whole_buffers_again() -> None:
    p = phase(splice_min_bytes=1000, finish_limit=4096)
    frame = text(b"a" * 3000)
    taken(p.received("client", frame, now=1.0))
    taken(p.sent("backend", len(frame), now=1.0))
    assert p.read_size(p.client, 4096) == 14  # at a frame boundary after a large frame: a head only
    p.client.lingering = True  # the proxy closed toward it and only drains what it still sends
    assert p.read_size(p.client, 4096) == 4096 and p.splice_size(p.client) == 0
