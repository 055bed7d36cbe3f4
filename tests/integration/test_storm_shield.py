"""The storm shield under a replayed reconnect storm: thousands of upgrade attempts within a
second, the refused clients told to come back at times spread over admission.retry_after_spread,
and coming back then (once each): the accepted upgrades per second stay flat at the budget for
as long as the storm lasts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import trio

from tests.integration.test_relay import ProxyProcess
from tests.support import free_port, proxy_yaml, raw_http, status_of

RATE = 40
STORM = 4000  # attempts in the storm
SPREAD = 5  # seconds: long enough for several once-a-second reports between the burst and the end
BACKEND = (
    "import functools, sys, trio; from wsproxy.demo import demo_backend; "
    "trio.run(functools.partial(demo_backend, '127.0.0.1', int(sys.argv[1]), 'b0'))"
)
UPGRADE = (
    b"GET /storm HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _answer(stream: trio.SocketStream) -> tuple[int, int | None]:
    """(status, Retry-After) of the answer to an upgrade request; the connection is dropped after."""
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    finally:
        await trio.aclose_forcefully(stream)
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    after = next((int(ln.split(b":", 1)[1]) for ln in lines[1:] if ln.lower().startswith(b"retry-after:")), None)
    return status, after


async def test_a_reconnect_storm_is_admitted_at_the_budget_and_told_to_come_back_spread(tmp_path) -> None:
    # the proxy in its own process, so the storm (this process) and the proxy do not share a loop
    # the backend in its own process too: the 101s must not wait for this process's readers
    port, admin, backend_port = free_port(), free_port(), free_port()
    backend = subprocess.Popen(
        [sys.executable, "-c", BACKEND, str(backend_port)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    extra = (
        f"admission: {{upgrades: {{rate: {RATE}/s, burst: {RATE}}}, retry_after_spread: {SPREAD}s}}\n"
        f"heartbeat: {{interval: off}}\nadmin: {{address: 127.0.0.1:{admin}}}\nlog: {{level: warning}}\n"
        "timeouts: {handshake: 30s}\n"
    )
    path = tmp_path / "wsproxy.yaml"
    path.write_text(proxy_yaml([backend_port], extra=extra).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    proc = ProxyProcess(path)
    try:
        with trio.fail_after(20):
            while True:
                try:
                    if status_of(await raw_http(admin, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == 200:
                        break
                except OSError:  # not listening yet
                    assert proc.proc.poll() is None, "".join(proc.lines)
                await trio.sleep(0.1)
        await _storm(port, admin, proc)
    finally:
        proc.stop()
        backend.kill()
        backend.wait(10)


async def _storm(port: int, admin: int, proc: ProxyProcess) -> None:
    # Clients that lost their sessions all come back at once: STORM connections, opened first,
    # then every upgrade request sent within a second (bounded: STORM attempts, 60 s in all).
    streams: list[trio.SocketStream] = []
    retry_after: Counter[int] = Counter()
    statuses: Counter[int] = Counter()  # the first attempts' answers
    again: Counter[int] = Counter()  # the answers to the refused clients' second attempts
    with trio.fail_after(60):
        async with trio.open_nursery() as opening:
            for _ in range(32):
                opening.start_soon(_connect_some, port, streams, STORM // 32)
        start = trio.current_time()
        sent_at = []
        for stream in streams:
            await stream.send_all(UPGRADE)
            sent_at.append(trio.current_time() - start)
        last_answer = start

        async def read(stream: trio.SocketStream) -> None:
            nonlocal last_answer
            status, after = await _answer(stream)
            statuses[status] += 1
            last_answer = trio.current_time()
            if status != 101:
                assert status == 503 and after is not None, status
                retry_after[after] += 1
                await trio.sleep(after)  # told when to come back: it does, once
                retry = await trio.open_tcp_stream("127.0.0.1", port)
                await retry.send_all(UPGRADE)
                status, _ = await _answer(retry)
                again[status] += 1
                last_answer = trio.current_time()

        async with trio.open_nursery() as readers:
            for stream in streams:
                readers.start_soon(read, stream)
    busy = last_answer - start  # the proxy answered the whole storm within this long
    in_first_second = sum(t < 1.0 for t in sent_at)
    assert len(streams) == STORM and in_first_second >= 2000, in_first_second  # thousands within a second
    assert statuses[101] + statuses[503] == STORM
    assert again[101] + again[503] == statuses[503]
    admitted = statuses[101] + again[101]

    # The proxy's own once-a-second report says how many it admitted over how long, measured
    # where the decision is taken (a client here sees its 101 later, after the backend's).
    reports = [re.search(r"in the last ([\d.]+)s admitted (\d+) upgrade\(s\), refused (\d+)", ln) for ln in proc.lines]
    rates = [int(m.group(2)) / float(m.group(1)) for m in reports if m]
    print("admitted per second, by report:", [round(r, 1) for r in rates], "retry-after:", sorted(retry_after.items()))
    # the first report also holds the burst (and what passed before the first refusal), the last
    # may cover the storm's end; every one between is flat at the budget (the comebacks, spread
    # over SPREAD seconds, keep asking for more than the budget all along)
    assert len(rates) >= 3, rates
    assert all(RATE * 0.75 <= r <= RATE * 1.25 for r in rates[1:-1]), rates
    assert rates[-1] <= RATE * 1.25, rates
    assert admitted <= RATE + RATE * busy + 2
    # retry times spread over the whole window, none all at once
    refused = statuses[503]
    assert set(retry_after) == set(range(1, SPREAD + 1)), retry_after
    assert max(retry_after.values()) <= 2 * refused / SPREAD
    # counted, and logged about once a second rather than once per refusal
    metrics = (await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).decode()
    assert f'wsproxy_storm_refused_total{{pool="*"}} {float(refused + again[503])}' in metrics
    lines = [ln for ln in proc.lines if "storm shield" in ln]
    assert len(lines) <= busy + 2, len(lines)
    assert not [ln for ln in proc.lines if "over the upgrade budget" in ln]  # no line per refusal


async def _connect_some(port: int, streams: list[trio.SocketStream], count: int) -> None:
    for _ in range(count):
        streams.append(await trio.open_tcp_stream("127.0.0.1", port))
