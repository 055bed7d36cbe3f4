"""Backends from DNS against a real dnsmasq, with in-process proxies: SRV ports and weights, a
failing or empty answer keeping the last good set, a SIGHUP reload keeping what DNS found, and
three instances mapping 10,000 keys to the same backends."""

from __future__ import annotations

import functools

import trio

from tests.fleet_support import Dnsmasq
from tests.integration.test_reload import whoami
from tests.support import RawClient, free_port, start_proxy
from wsproxy.config import Address, parse_config
from wsproxy.demo import demo_backend
from wsproxy.policy.balancing.consistent_hash import ConsistentHash

FAST = "timeouts: {handshake: 5s, connect: 2s, close: 1s}\nheartbeat: {interval: off}\nreload: {drain_window: 200ms}\n"


def pool_yaml(dns: Dnsmasq, spec: str, balance: str = "least_conn", extra: str = "") -> str:
    return (
        "listeners: [{address: 127.0.0.1:0, pool: chat}]\n"
        f"pools:\n  chat:\n    balance: {balance}\n{extra}"
        f"    discovery: {{dns: {{{spec}, nameservers: ['{dns.nameserver}'], interval: 100ms, max_interval: 300ms,"
        " timeout: 500ms}}\n" + FAST
    )


def members(proxy) -> list[tuple[Address, int]]:  # type: ignore[no-untyped-def]
    return [(b.address, b.weight) for b in proxy.server.snapshot.pools["chat"].backends]


async def wait_members(proxy, wanted, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while members(proxy) != wanted:
            await trio.sleep(0.02)


async def test_srv_answers_give_ports_and_weights_and_a_restarted_dnsmasq_changes_them(nursery, tmp_path) -> None:
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"b1.chat.internal": ["127.0.0.21"], "b2.chat.internal": ["127.0.0.22"]})
    dns.set_srv("_ws._tcp.chat.internal", [("b1.chat.internal", 9001, 0, 10), ("b2.chat.internal", 9002, 0, 30)])
    dns.start()
    try:
        proxy = await start_proxy(nursery, pool_yaml(dns, "name: _ws._tcp.chat.internal, type: SRV"))
        assert members(proxy) == [(Address("127.0.0.21", 9001), 10), (Address("127.0.0.22", 9002), 30)]
        # SRV lines are read at start only: a restart (same port) is how they change
        dns.set_srv("_ws._tcp.chat.internal", [("b2.chat.internal", 9003, 0, 5), ("b1.chat.internal", 9009, 1, 5)])
        dns.restart()
        await wait_members(proxy, [(Address("127.0.0.22", 9003), 5)])  # priority 1 is a backup: left out
    finally:
        dns.stop()


async def test_a_failed_or_empty_answer_keeps_the_last_good_backends(nursery, tmp_path) -> None:
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"chat.internal": ["127.0.0.31", "127.0.0.32"]})
    dns.start()
    try:
        proxy = await start_proxy(nursery, pool_yaml(dns, "name: chat.internal, type: A, port: 9000"))
        good = [(Address("127.0.0.31", 9000), 1), (Address("127.0.0.32", 9000), 1)]
        assert members(proxy) == good
        discovery = proxy.server.fleet.discovery
        dns.set_hosts({"other.internal": ["127.0.0.33"]})  # chat.internal no longer answers anything
        dns.reload()
        with trio.fail_after(5):
            while not discovery.lookups["chat", "failed"] + discovery.lookups["chat", "empty"]:
                await trio.sleep(0.02)
        dns.stop()  # and now no answer at all
        failed = discovery.lookups["chat", "failed"]
        with trio.fail_after(5):
            while discovery.lookups["chat", "failed"] < failed + 2:
                await trio.sleep(0.02)
        assert members(proxy) == good
        text = proxy.server.metrics.exposition().decode()
        assert 'wsproxy_discovery_lookups_total{pool="chat",result="failed"}' in text
        dns.set_hosts({"chat.internal": ["127.0.0.32", "127.0.0.34"]})
        dns.start()
        await wait_members(proxy, [(Address("127.0.0.32", 9000), 1), (Address("127.0.0.34", 9000), 1)])
    finally:
        dns.stop()


async def test_dns_drains_a_removed_backend_and_a_sighup_reload_keeps_what_dns_found(nursery, tmp_path) -> None:
    port = free_port()
    for i, ip in enumerate(("127.0.0.41", "127.0.0.42")):
        await nursery.start(functools.partial(demo_backend, ip, port, f"b{i}"))
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"chat.internal": ["127.0.0.41", "127.0.0.42"]})
    dns.start()
    try:
        text = pool_yaml(dns, f"name: chat.internal, type: A, port: {port}")
        proxy = await start_proxy(nursery, text)
        clients = [await RawClient.connect(proxy.port(), f"/s{i}") for i in range(6)]
        names = [await whoami(c) for c in clients]
        assert sorted(names) == ["b0"] * 3 + ["b1"] * 3
        before = proxy.server.snapshot.pools["chat"].backends
        await proxy.server.reload(parse_config(text, source="again.yaml"))  # SIGHUP with the same file
        assert proxy.server.snapshot.pools["chat"].backends == before  # the same live objects
        for c, name in zip(clients, names, strict=True):
            assert await whoami(c) == name  # nothing drained
        dns.set_hosts({"chat.internal": ["127.0.0.41"]})
        dns.reload()
        with trio.fail_after(5):
            for c, name in zip(clients, names, strict=True):
                if name == "b1":
                    assert (await c.wait_close()).code == 1012
        for c, name in zip(clients, names, strict=True):
            if name == "b0":
                assert await whoami(c) == "b0"
                await c.close()
    finally:
        dns.stop()


async def test_three_instances_map_10000_keys_to_the_same_backends(nursery, tmp_path) -> None:
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"chat.internal": [f"127.0.0.{i}" for i in range(51, 59)]})
    dns.start()
    try:
        spec = "name: chat.internal, type: A, port: 9000"
        text = pool_yaml(dns, spec, "consistent_hash", "    hash_key: query:room\n")
        proxies = [await start_proxy(nursery, text) for _ in range(3)]
        owners = []
        for proxy in proxies:
            policy = proxy.server.snapshot.pools["chat"].policy
            assert isinstance(policy, ConsistentHash) and len(policy.backends) == 8
            owners.append([policy.owner(f"room-{k}".encode()).name for k in range(10_000)])
        assert owners[0] == owners[1] == owners[2]
        assert len(set(owners[0])) == 8
    finally:
        dns.stop()


async def test_a_backend_dns_adds_ramps_up_with_slow_start(nursery, tmp_path) -> None:
    port = free_port()
    for i, ip in enumerate(("127.0.0.61", "127.0.0.62")):
        await nursery.start(functools.partial(demo_backend, ip, port, f"b{i}"))
    dns = Dnsmasq(tmp_path)
    dns.set_hosts({"chat.internal": ["127.0.0.61"]})
    dns.start()
    try:
        health = "    health: {check: tcp, interval: 1s, slow_start: 30s}\n"
        proxy = await start_proxy(nursery, pool_yaml(dns, f"name: chat.internal, type: A, port: {port}", extra=health))
        first = proxy.server.snapshot.pools["chat"].backends[0]
        assert first.health.status(trio.current_time()) == "up"  # at start: full weight at once
        dns.set_hosts({"chat.internal": ["127.0.0.61", "127.0.0.62"]})
        dns.reload()
        with trio.fail_after(5):
            while len(proxy.server.snapshot.pools["chat"].backends) < 2:
                await trio.sleep(0.02)
        pool = proxy.server.snapshot.pools["chat"]
        now = trio.current_time()
        assert pool.backends[0] is first and first.health.status(now) == "up"
        assert pool.backends[1].health.status(now) == "slow_start"
        assert pool.backends[1].health.weight_factor(now) < 0.1
    finally:
        dns.stop()
