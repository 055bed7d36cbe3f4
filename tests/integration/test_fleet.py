"""A fleet: three wsproxy instances (one with workers: 2) sharing one real Redis and one real
dnsmasq, in front of backends that DNS names (issue 19's test, as it asks).

Every component is real and started here on loopback: redis-server and dnsmasq (tests/
fleet_support.py), the proxies as `python -m wsproxy run` processes, echo backends on 127.0.0.11-15
(one port, several addresses: what an A record names). Clients come from distinct loopback
addresses (127.0.1.x) so the per-address handshake rate is measured only where it is meant to be.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio
from wsproto.events import TextMessage

from tests.fleet_support import Dnsmasq, RedisProcess
from tests.support import RawClient, free_port, raw_http, watch_proxy_output
from wsproxy.demo import demo_backend

pytestmark = pytest.mark.timeout(180)

BACKEND_IPS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]
NEW_BACKEND_IP = "127.0.0.15"
RATE, BURST = 20.0, 5.0  # rate_limits.handshakes_per_ip for the fleet
REFRESH = 0.02  # shared_state.refresh: short, so the test's pace can be brisk
PACE = 0.03  # between two session opens: a little more than one refresh


def _client_ips() -> itertools.count:  # type: ignore[type-arg]
    return itertools.count(1)


class Proxy:
    """One wsproxy instance (`python -m wsproxy run`), its listener port and admin port(s)."""

    def __init__(self, path: Path, name: str, port: int, admin_ports: list[int]) -> None:
        self.name = name
        self.port = port
        self.admin_ports = admin_ports
        self.log = path.with_suffix(".log")
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=os.environ.copy(),
        )
        watch_proxy_output(self.log.read_text)  # an ERROR in its log fails the test (tests/conftest.py)

    async def wait_ready(self) -> None:
        with trio.move_on_after(20):
            while True:
                statuses = [await _status(p, "/readyz") for p in self.admin_ports]
                if all(s == 200 for s in statuses):
                    return
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()}"
                await trio.sleep(0.05)
        raise AssertionError(f"{self.name} not ready:\n{self.log.read_text()}")

    async def metric(self, name: str) -> list[float]:
        """`name`'s unlabelled value from every process of this instance."""
        values = []
        for port in self.admin_ports:
            request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            text = (await raw_http(port, request, read_timeout=3)).decode()
            m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
            assert m, f"{name} missing from {self.name}'s metrics"
            values.append(float(m.group(1)))
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


def free_ports_in_a_row(count: int) -> int:
    """The first of `count` consecutive free ports (worker i serves its admin listener on port + i)."""
    for _ in range(100):
        first = free_port()
        socks = []
        try:
            for i in range(1, count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", first + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first
    raise AssertionError("no run of free ports found")


async def _status(port: int, path: str) -> int:
    try:
        got = await raw_http(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), read_timeout=2)
    except OSError:
        return 0
    return int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0


def _config(port: int, admin: int, backend_port: int, dns: Dnsmasq, redis: RedisProcess | None, workers: int) -> str:
    shared = (
        f"shared_state: {{redis: '{redis.url}', key_prefix: 'fleet-test:', timeout: 100ms, "
        f"refresh: {REFRESH * 1000:g}ms, process_ttl: 1s}}\n"
        if redis is not None
        else ""
    )
    return f"""
listeners:
  - address: 127.0.0.1:{port}
    pool: chat
pools:
  chat:
    balance: least_conn
    retries: 0
    discovery:
      dns: {{name: chat.internal, type: A, port: {backend_port}, nameservers: ['{dns.nameserver}'],
             interval: 200ms, max_interval: 500ms, timeout: 1s}}
admin: {{address: 127.0.0.1:{admin}}}
rate_limits:
  handshakes_per_ip: {{rate: {RATE:g}, burst: {BURST:g}}}
reload: {{drain_window: 300ms}}
timeouts: {{handshake: 5s, connect: 2s, close: 1s}}
heartbeat: {{interval: off}}
shutdown: {{drain_window: 0s, deadline: 3s}}
workers: {workers}
{shared}"""


def start_fleet(tmp_path: Path, tag: str, backend_port: int, dns: Dnsmasq, redis: RedisProcess | None) -> list[Proxy]:
    """Instances A (workers: 2), B and C."""
    proxies = []
    taken: set[int] = set()  # ports given out here, admin + 1 of the two-worker instance included

    def fresh(count: int = 1) -> int:
        while True:
            first = free_ports_in_a_row(count)
            run = set(range(first, first + count))
            if not run & taken:
                taken.update(run)
                return first

    for name, workers in (("A", 2), ("B", 1), ("C", 1)):
        port, admin = fresh(), fresh(workers)
        path = tmp_path / f"{tag}-{name}.yaml"
        path.write_text(_config(port, admin, backend_port, dns, redis, workers))
        proxies.append(Proxy(path, name, port, [admin + i for i in range(workers)]))
    return proxies


class Session:
    def __init__(self, client: RawClient, backend: str, via: str) -> None:
        self.client = client
        self.backend = backend
        self.via = via


async def open_session(proxy: Proxy, source: str) -> Session:
    client = await RawClient.connect(proxy.port, "/chat", local_address=source)
    assert client.accept is not None, f"refused: {client.reject and client.reject.status_code}"
    return Session(client, await whoami(client), proxy.name)


async def whoami(client: RawClient) -> str:
    await client.send(TextMessage(data="/whoami"))
    answer = await client.receive_message()
    assert isinstance(answer, str)
    return answer


async def balance_scenario(proxies: list[Proxy], ips: itertools.count) -> tuple[Counter[str], list[Session]]:  # type: ignore[type-arg]
    """Open sessions unevenly through the instances, close unevenly, open more: the per-backend
    counts of the sessions left open, and the sessions."""
    a, b, c = proxies
    opened: list[Session] = []
    for _ in range(40):
        opened.append(await open_session(a, f"127.0.1.{next(ips)}"))
        await trio.sleep(PACE)
    closing = [s for s in opened if s.backend in ("b0", "b1")]  # close A's sessions on two backends
    for s in closing:
        await s.client.close()
    opened = [s for s in opened if s not in closing]
    await trio.sleep(0.3)  # the closes reach the fleet's counts
    for proxy, count in ((b, 24), (c, 12)):
        for _ in range(count):
            opened.append(await open_session(proxy, f"127.0.1.{next(ips)}"))
            await trio.sleep(PACE)
    return Counter(s.backend for s in opened), opened


def within(counts: Counter[str], names: list[str], tolerance: float) -> bool:
    average = sum(counts[n] for n in names) / len(names)
    return all(abs(counts[n] - average) <= tolerance * average for n in names)


async def handshake_burst(proxies: list[Proxy], source: str, seconds: float) -> tuple[int, float]:
    """Handshakes from one address, as fast as 6 loops go, round robin over every instance, for
    `seconds`: (how many got their 101, the window from first to last attempt)."""
    accepted = 0
    ports = itertools.cycle([p.port for p in proxies])
    first: float | None = None
    last = 0.0
    deadline = trio.current_time() + seconds

    async def loop() -> None:
        nonlocal accepted, first, last
        while trio.current_time() < deadline:
            now = trio.current_time()
            first = now if first is None else first
            client = await RawClient.connect(next(ports), "/rate", local_address=source)
            last = trio.current_time()
            if client.accept is not None:
                accepted += 1
            await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(loop)
    assert first is not None
    return accepted, last - first


def fleet_allowance(window: float) -> float:
    return BURST + RATE * window


async def test_a_fleet_on_redis_and_dns_balances_limits_follows_dns_and_survives_redis(nursery, tmp_path) -> None:
    backend_port = free_port()
    for i, ip in enumerate(BACKEND_IPS):
        await nursery.start(functools.partial(demo_backend, ip, backend_port, f"b{i}"))
    await nursery.start(functools.partial(demo_backend, NEW_BACKEND_IP, backend_port, "b4"))
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"chat.internal": BACKEND_IPS})
    dns.start()
    redis = RedisProcess().start()
    ips = _client_ips()
    started: list[Proxy] = []
    try:
        # --- the control run: no shared_state, each process balances alone ---------------------
        control = start_fleet(tmp_path, "control", backend_port, dns, None)
        started += control
        for p in control:
            await p.wait_ready()
        alone, sessions = await balance_scenario(control, ips)
        names = ["b0", "b1", "b2", "b3"]
        assert not within(alone, names, 0.10), f"the control run should show the skew: {alone}"
        for s in sessions:
            await s.client.stream.aclose()
        for p in control:
            p.stop()

        # --- the fleet: one Redis -----------------------------------------------------------------
        proxies = start_fleet(tmp_path, "fleet", backend_port, dns, redis)
        started += proxies
        for p in proxies:
            await p.wait_ready()
        together, sessions = await balance_scenario(proxies, ips)
        assert within(together, names, 0.10), f"fleet-wide least_conn: {together} (alone: {alone})"

        # the per-address handshake rate holds for the fleet (4 processes) within 10 %
        accepted, window = await handshake_burst(proxies, "127.0.0.77", 1.5)
        expected = fleet_allowance(window)
        assert abs(accepted - expected) <= 0.10 * expected, (accepted, expected)

        # --- DNS: a backend removed is drained with 1012 on every instance, the others untouched ---
        dns.set_hosts({"chat.internal": BACKEND_IPS[:3]})
        dns.reload()
        on_b3 = [s for s in sessions if s.backend == "b3"]
        assert {s.via for s in on_b3} == {"A", "B", "C"}, "b3 should hold sessions of every instance"
        with trio.fail_after(5):
            for s in on_b3:
                assert (await s.client.wait_close()).code == 1012
        sessions = [s for s in sessions if s.backend != "b3"]
        for s in sessions:
            assert await whoami(s.client) == s.backend  # untouched

        # ... and a backend added gets new sessions on every instance
        dns.set_hosts({"chat.internal": [*BACKEND_IPS[:3], NEW_BACKEND_IP]})
        dns.reload()
        await trio.sleep(0.8)  # a lookup interval or two, then a refresh
        for proxy in proxies:
            fresh = [await open_session(proxy, f"127.0.1.{next(ips)}") for _ in range(2)]
            assert any(s.backend == "b4" for s in fresh), f"{proxy.name} sent none to the new backend"
            sessions += fresh
            await trio.sleep(0.1)

        # --- Redis killed mid-test: nothing drops, limits fall back to local, and recover ---------
        redis.kill()
        await trio.sleep(0.5)
        for p in proxies:
            assert await p.metric("wsproxy_shared_state_up") == [0.0] * len(p.admin_ports)
        accepted, window = await handshake_burst(proxies, "127.0.0.78", 1.5)
        assert accepted > 1.5 * fleet_allowance(window), f"local limits only: {accepted} accepted"
        for s in sessions:
            assert await whoami(s.client) == s.backend  # no session dropped
        redis.start()  # same port, empty: every process writes its counts again
        await trio.sleep(0.8)
        for p in proxies:
            assert await p.metric("wsproxy_shared_state_up") == [1.0] * len(p.admin_ports)
        totals = redis.hgetall("fleet-test:fleet")
        per_backend = Counter(s.backend for s in sessions)
        by_ip = {"127.0.0.11": "b0", "127.0.0.12": "b1", "127.0.0.13": "b2", NEW_BACKEND_IP: "b4"}
        seen = {by_ip[k.split("|")[2].rsplit(":", 1)[0]]: v for k, v in totals.items() if k.startswith("b|")}
        assert seen == dict(per_backend), (seen, per_backend)
        accepted, window = await handshake_burst(proxies, "127.0.0.79", 1.5)
        expected = fleet_allowance(window)
        assert abs(accepted - expected) <= 0.10 * expected, (accepted, expected)
        for s in sessions:
            await s.client.close()
    finally:
        for p in started:
            p.stop()
        redis.kill()
        dns.stop()
