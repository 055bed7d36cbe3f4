"""The shared-state client against a real redis-server: two processes' views of each other, a
dead process's sessions expiring, fleet-wide caps and handshake rate, failing open and resyncing.

Each "process" is a SharedStateClient with its own snapshot and admission, as a server holds them;
both talk to one redis-server started here on a free port.
"""

from __future__ import annotations

import pytest
import trio

from tests.fleet_support import RedisProcess
from tests.integration.test_reload import start_backends, whoami
from tests.support import RawClient, free_port, start_proxy
from wsproxy.config import Config, parse_config
from wsproxy.policy import fleet
from wsproxy.policy.admission import Admission, Ticket
from wsproxy.policy.snapshot import Snapshot
from wsproxy.runtime.shared_state import SharedStateClient

REFRESH = 0.02


@pytest.fixture
def redis():  # type: ignore[no-untyped-def]
    server = RedisProcess().start()
    yield server
    server.kill()


def make_config(redis: RedisProcess, extra: str = "", ttl: str = "300ms") -> Config:
    return parse_config(
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        "pools: {p: {balance: least_conn, backends: [127.0.0.1:9001, 127.0.0.1:9002]}}\n"
        f"shared_state: {{redis: '{redis.url}', timeout: 200ms, refresh: {REFRESH * 1000:g}ms, process_ttl: {ttl}}}\n"
        + extra
    )


class Process:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.snapshot = Snapshot.build(config)
        self.admission = Admission()
        assert config.shared_state is not None
        self.state = SharedStateClient(
            config.shared_state, pools=lambda: self.snapshot.pools, admission=self.admission, config=lambda: config
        )
        self.scope = trio.CancelScope()

    @property
    def backends(self):  # type: ignore[no-untyped-def]
        return self.snapshot.pools["p"].backends

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with self.scope:
            await self.state.run(task_status=task_status)

    async def admit(self, ip: str) -> Ticket | str:
        ticket = self.admission.admit(self.config, ip, "p")
        assert isinstance(ticket, Ticket)
        cfg = self.config
        caps = {
            fleet.TOTAL: cfg.limits.max_sessions,
            fleet.pool_field("p"): cfg.pools["p"].max_sessions,
            fleet.ip_field(ip): cfg.rate_limits.max_sessions_per_ip,
        }
        over = await self.state.admit(ip, "p", caps)
        if over is not None:
            ticket.release()
            return over
        return ticket


async def settle() -> None:
    await trio.sleep(REFRESH * 5)


async def test_each_process_sees_the_others_sessions_and_a_dead_ones_expire(nursery, redis) -> None:
    a, b = Process(make_config(redis)), Process(make_config(redis))
    await nursery.start(a.run)
    await nursery.start(b.run)
    leases = [a.snapshot.pools["p"].acquire(a.backends[0]) for _ in range(3)]
    await settle()
    assert [x.others for x in b.backends] == [3, 0]
    assert [x.others for x in a.backends] == [0, 0]  # its own are `active`, not `others`
    assert next(b.snapshot.pools["p"].candidates()).name == "127.0.0.1:9002"
    a.scope.cancel()  # the process dies: no goodbye
    with trio.fail_after(3):
        while b.backends[0].others:
            await trio.sleep(REFRESH)
    assert redis.hgetall("wsproxy:fleet") == {}
    for lease in leases:
        lease.release()


async def test_a_clean_exit_takes_its_sessions_out_at_once(nursery, redis) -> None:
    a, b = Process(make_config(redis, ttl="30s")), Process(make_config(redis, ttl="30s"))
    await nursery.start(a.run)
    await nursery.start(b.run)
    lease = a.snapshot.pools["p"].acquire(a.backends[1])
    await settle()
    assert b.backends[1].others == 1
    await a.state.leave()
    await settle()
    assert b.backends[1].others == 0  # long before its 30 s heartbeat would have run out
    lease.release()


async def test_session_caps_hold_for_the_fleet(nursery, redis) -> None:
    extra = "limits: {max_sessions: 3}\nrate_limits: {max_sessions_per_ip: 2}\n"
    a, b = Process(make_config(redis, extra)), Process(make_config(redis, extra))
    await nursery.start(a.run)
    await nursery.start(b.run)
    first = await a.admit("10.0.0.1")
    second = await b.admit("10.0.0.1")
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert await a.admit("10.0.0.1") == fleet.ip_field("10.0.0.1")  # 2 per address, across both
    third = await b.admit("10.0.0.2")
    assert isinstance(third, Ticket)
    assert await a.admit("10.0.0.3") == fleet.TOTAL  # 3 in all, across both
    second.release()
    await settle()  # the release reaches the fleet with b's next refresh
    again = await a.admit("10.0.0.3")
    assert isinstance(again, Ticket)
    assert a.state.decisions["session_caps", "fleet"] == 4  # every one decided by the fleet


async def test_the_handshake_rate_is_one_bucket_for_the_fleet(nursery, redis) -> None:
    a, b = Process(make_config(redis)), Process(make_config(redis))
    await nursery.start(a.run)
    await nursery.start(b.run)
    waits = [await p.state.handshake_wait("10.9.9.9", 10.0, 3.0) for p in (a, b, a, b)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] is not None and 0.0 < waits[3] <= 0.1  # the burst of 3 is the fleet's, not each one's
    assert await a.state.handshake_wait("10.9.9.8", 10.0, 3.0) == 0.0  # another address: its own bucket


async def test_redis_gone_means_local_decisions_and_back_means_resync(nursery, redis) -> None:
    a, b = Process(make_config(redis, ttl="30s")), Process(make_config(redis, ttl="30s"))
    await nursery.start(a.run)
    await nursery.start(b.run)
    lease = a.snapshot.pools["p"].acquire(a.backends[0])
    await settle()
    assert b.backends[0].others == 1 and a.state.up
    redis.kill()
    await settle()
    assert not a.state.up and not b.state.up
    assert b.backends[0].others == 0  # decisions on its own counts now
    assert await a.state.handshake_wait("10.0.0.1", 1.0, 1.0) is None
    assert a.state.decisions["handshake_rate", "local"] == 1
    redis.start()  # the same port, empty
    with trio.fail_after(3):
        while not (a.state.up and b.backends[0].others == 1):
            await trio.sleep(REFRESH)
    assert redis.hgetall("wsproxy:fleet")["b|p|127.0.0.1:9001"] == 1
    lease.release()


async def test_a_write_older_than_the_last_applied_one_changes_nothing(nursery, redis) -> None:
    a = Process(make_config(redis, ttl="30s"))
    await nursery.start(a.run)
    lease = a.snapshot.pools["p"].acquire(a.backends[0])
    await settle()
    assert redis.hgetall("wsproxy:fleet") == {"b|p|127.0.0.1:9001": 1}
    keys = a.state.keys
    stale = [a.state.process_id, "1", "30000", "16", keys.ledger_prefix, "delta", "1", "b|p|127.0.0.1:9001", "0"]
    script = a.state._scripts["sync"]
    answer = await script(keys=[keys.fleet, keys.ips, keys.procs, keys.ledger(a.state.process_id)], args=stale)
    assert answer[0] in (b"stale", "stale")
    assert redis.hgetall("wsproxy:fleet") == {"b|p|127.0.0.1:9001": 1}
    lease.release()


async def test_a_proxy_whose_redis_is_down_at_start_serves_on_its_own(nursery) -> None:
    backends = await start_backends(nursery, 1)
    dead = free_port()  # nothing listens here
    proxy = await start_proxy(
        nursery,
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        f"pools: {{p: {{balance: least_conn, max_sessions: 5, backends: [127.0.0.1:{backends[0]}]}}}}\n"
        "rate_limits: {handshakes_per_ip: {rate: 100, burst: 100}}\n"
        f"shared_state: {{redis: 'redis://127.0.0.1:{dead}/0', timeout: 100ms, refresh: 50ms}}\n"
        "heartbeat: {interval: off}\n",
    )
    client = await RawClient.connect(proxy.port())
    assert client.accept is not None
    assert await whoami(client) == "b0"
    text = proxy.server.metrics.exposition().decode()
    assert "wsproxy_shared_state_up 0.0" in text
    assert 'wsproxy_shared_state_decisions_total{by="local",limit="handshake_rate"} 1.0' in text
    await client.close()


async def test_a_redis_that_never_answers_costs_one_warning_and_no_error(nursery, caplog) -> None:
    """A Redis that accepts connections and then says nothing: every connect attempt is cut by
    shared_state.timeout; the proxy decides alone, says so once at WARNING, and nothing (coredis
    included) logs an ERROR or a traceback for the peer's silence."""
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[trio.socket.SocketType] = []

    listening = trio.CancelScope()

    async def accept_and_say_nothing() -> None:
        with listening:
            while len(held) < 64:
                conn, _ = await silent.accept()
                held.append(conn)  # kept open, never read or written

    nursery.start_soon(accept_and_say_nothing)
    backends = await start_backends(nursery, 1)
    port = silent.getsockname()[1]
    proxy = await start_proxy(
        nursery,
        "listeners: [{address: 127.0.0.1:0, pool: p}]\n"
        f"pools: {{p: {{balance: least_conn, backends: [127.0.0.1:{backends[0]}]}}}}\n"
        "rate_limits: {handshakes_per_ip: {rate: 100, burst: 100}}\n"
        f"shared_state: {{redis: 'redis://127.0.0.1:{port}/0', timeout: 100ms, refresh: 50ms}}\n"
        "heartbeat: {interval: off}\n",
    )
    for _ in range(3):
        client = await RawClient.connect(proxy.port())
        assert await whoami(client) == "b0"
        await client.close()
    await trio.sleep(0.3)  # a few refreshes, each a connect attempt cut at its timeout
    assert held, "the proxy never tried the silent Redis"
    errors = [r for r in caplog.records if r.levelno >= 40 or r.exc_info]
    assert errors == [], [f"{r.name}: {r.getMessage()}" for r in errors]
    warned = [r for r in caplog.records if r.name == "wsproxy.shared_state" and "unavailable" in r.getMessage()]
    assert len(warned) == 1
    listening.cancel()
    await trio.lowlevel.checkpoint()
    for conn in held:
        conn.close()
    silent.close()
