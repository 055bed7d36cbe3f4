"""The pure parts of a fleet: its config keys, what a process publishes, how fleet counts enter a
balancing decision, DNS answers to a sorted membership, TTL clamping and the SIGHUP carry-over."""

from __future__ import annotations

import random

import pytest

from wsproxy.config import Address, BackendConfig, ConfigError, DnsDiscovery, parse_config
from wsproxy.policy import fleet
from wsproxy.policy.admission import Admission, Ticket
from wsproxy.policy.balancing.consistent_hash import ConsistentHash
from wsproxy.policy.discovery import Record, carry_membership, membership, next_lookup, same_members, with_membership
from wsproxy.policy.snapshot import Snapshot

BASE = "listeners: [{address: 127.0.0.1:0, pool: p}]\n"


def config(pool: str, extra: str = ""):  # type: ignore[no-untyped-def]
    return parse_config(BASE + "pools:\n  p:\n" + "".join(f"    {line}\n" for line in pool.splitlines()) + extra)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.problems


# --- config ---------------------------------------------------------------------------------


def test_shared_state_keys_parse_with_defaults() -> None:
    cfg = config("backends: [127.0.0.1:9001]", "shared_state: {redis: 'redis://127.0.0.1:6379/0', timeout: 100ms}\n")
    assert cfg.shared_state is not None
    assert cfg.shared_state.redis == "redis://127.0.0.1:6379/0"
    assert cfg.shared_state.key_prefix == "wsproxy:"
    assert cfg.shared_state.timeout == 0.1
    assert cfg.shared_state.refresh == 0.1
    assert config("backends: [127.0.0.1:9001]").shared_state is None


@pytest.mark.parametrize(
    ("shared", "path", "words"),
    [
        ("{key_prefix: x}", "shared_state.redis", "missing"),
        ("{redis: 'http://h:1/0'}", "shared_state.redis", "redis://"),
        ("{redis: 'redis://h/0'}", "shared_state.redis", "port"),
        ("{redis: 'redis://h:1/x'}", "shared_state.redis", "number"),
        ("{redis: 'redis://h:1/0', refresh: 1s}", "shared_state.refresh", "100ms"),
        ("{redis: 'redis://h:1/0', refresh: 100ms, process_ttl: 200ms}", "shared_state.process_ttl", "three"),
        ("{redis: 'redis://h:1/0', key_prefix: 'a b'}", "shared_state.key_prefix", "spaces"),
        ("{redis: 'redis://h:1/0', redis_url: x}", "shared_state.redis_url", "unknown key"),
    ],
)
def test_bad_shared_state_is_refused_with_its_key_path(shared: str, path: str, words: str) -> None:
    found = problems(BASE + "pools: {p: {backends: [127.0.0.1:9001]}}\nshared_state: " + shared + "\n")
    assert any(p == path and words in m for p, m in found), found


def test_a_redis_password_never_reaches_an_error() -> None:
    found = problems(BASE + "pools: {p: {backends: [127.0.0.1:9001]}}\nshared_state: {redis: 'redis://u:s3cret@h/0'}\n")
    assert any(p == "shared_state.redis" for p, _ in found)
    assert "s3cret" not in repr(found)
    from wsproxy.config.fleet import shown_url

    assert shown_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert shown_url("redis://h:1/0") == "redis://h:1/0"


def test_discovery_keys_parse() -> None:
    cfg = config(
        "discovery: {dns: {name: Chat.Internal., type: a, port: 9000, nameservers: ['127.0.0.1:5353', '10.0.0.1'],"
        " interval: 1s, max_interval: 10s, timeout: 500ms}}"
    )
    d = cfg.pools["p"].discovery
    assert d == DnsDiscovery(
        name="chat.internal",
        type="A",
        port=9000,
        nameservers=(Address("127.0.0.1", 5353), Address("10.0.0.1", 53)),
        interval=1.0,
        max_interval=10.0,
        timeout=0.5,
    )
    assert cfg.pools["p"].backends == ()
    srv = config("discovery: {dns: {name: _ws._tcp.chat.internal}}").pools["p"].discovery
    assert srv is not None and srv.type == "SRV" and srv.port is None and srv.interval == 5.0


@pytest.mark.parametrize(
    ("pool", "path", "words"),
    [
        ("{backends: [127.0.0.1:1], discovery: {dns: {name: a.b}}}", "pools.p.discovery", "not both"),
        ("{discovery: {dns: {name: a.b, type: A}}}", "pools.p.discovery.dns.port", "missing"),
        ("{discovery: {dns: {name: _x._tcp.a.b, port: 9}}}", "pools.p.discovery.dns.port", "SRV"),
        ("{discovery: {dns: {name: a.b, type: MX}}}", "pools.p.discovery.dns.type", "SRV, A, AAAA"),
        ("{discovery: {dns: {name: 'a b'}}}", "pools.p.discovery.dns.name", "DNS name"),
        ("{discovery: {dns: {name: a.b, interval: 10s, max_interval: 1s}}}", "pools.p.discovery.dns.max_interval", ""),
        ("{discovery: {dns: {name: a.b, nameservers: [dns.google]}}}", "pools.p.discovery.dns.nameservers[0]", ""),
        ("{discovery: {dns: {name: a.b, nameservers: []}}}", "pools.p.discovery.dns.nameservers", "empty"),
        ("{discovery: {consul: {}}}", "pools.p.discovery.consul", "unknown key"),
        ("{balance: least_conn}", "pools.p.backends", "discovery"),
    ],
)
def test_bad_discovery_is_refused_with_its_key_path(pool: str, path: str, words: str) -> None:
    found = problems(BASE + f"pools: {{p: {pool}}}\n")
    assert any(p == path and words in m for p, m in found), found


# --- DNS answers to a membership ---------------------------------------------------------------


def test_membership_is_sorted_whatever_the_order_of_the_answer() -> None:
    records = [Record(f"10.0.0.{i}", 9000) for i in range(1, 20)]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    assert membership(shuffled) == membership(records)
    names = [b.name for b in membership(records)]
    assert names == sorted(names)


def test_membership_takes_the_lowest_srv_priority_weights_within_bounds_one_per_address() -> None:
    got = membership(
        [
            Record("10.0.0.1", 9001, weight=0, priority=10),
            Record("10.0.0.2", 9002, weight=70000, priority=10),
            Record("10.0.0.2", 9002, weight=5, priority=10),
            Record("10.0.0.3", 9003, weight=50, priority=20),  # a backup: not used while priority 10 answers
        ]
    )
    assert got == (
        BackendConfig(Address("10.0.0.1", 9001), weight=1),
        BackendConfig(Address("10.0.0.2", 9002), weight=1000),
    )
    assert membership([]) == ()
    assert len(membership([Record(f"10.0.{i // 256}.{i % 256}", 1) for i in range(900)], limit=512)) == 512


def test_next_lookup_keeps_the_ttl_between_interval_and_max_interval() -> None:
    spec = DnsDiscovery(name="a.b", type="A", port=1, interval=5.0, max_interval=60.0)
    assert next_lookup(0, spec) == 5.0
    assert next_lookup(30, spec) == 30.0
    assert next_lookup(3600, spec) == 60.0
    assert next_lookup(None, spec) == 5.0  # after a failure: the interval


def test_three_instances_build_the_same_ring_from_answers_in_different_orders() -> None:
    records = [Record(f"10.1.0.{i}", 9000, weight=1 + i % 3) for i in range(1, 9)]
    owners = []
    for seed in (1, 2, 3):
        answer = records[:]
        random.Random(seed).shuffle(answer)
        cfg = with_membership(
            config("balance: consistent_hash\nhash_key: query:room\ndiscovery: {dns: {name: _ws._tcp.a.b}}"),
            "p",
            membership(answer),
        )
        policy = Snapshot.build(cfg).pools["p"].policy
        assert isinstance(policy, ConsistentHash)
        owners.append([policy.owner(f"room-{k}".encode()).name for k in range(10_000)])
    assert owners[0] == owners[1] == owners[2]
    assert len(set(owners[0])) == 8


def test_a_sighup_reload_keeps_the_members_dns_found() -> None:
    text = "discovery: {dns: {name: a.b, type: A, port: 9000}}"
    running = with_membership(config(text), "p", membership([Record("10.0.0.1", 9000), Record("10.0.0.2", 9000)]))
    loaded = config(text)
    assert loaded.pools["p"].backends == ()
    carried = carry_membership(running, loaded)
    assert carried.pools["p"].backends == running.pools["p"].backends
    assert same_members(carried.pools["p"].backends, tuple(reversed(running.pools["p"].backends)))
    static = config("backends: [127.0.0.1:9001]")
    assert carry_membership(running, static) is static  # a pool that no longer uses DNS: the file's own


# --- what a process publishes, and the fleet's counts in a decision ------------------------------


def test_changes_write_what_differs_and_zero_for_backends_gone() -> None:
    published = {"b|p|a:1": 3, "b|p|gone:1": 2, "s|total": 5, "i|1.2.3.4": 1}
    current = {"b|p|a:1": 3, "s|total": 6, "i|5.6.7.8": 2}
    assert fleet.changes(published, current) == {"s|total": 6, "i|5.6.7.8": 2, "b|p|gone:1": 0}
    assert fleet.changes({}, {"b|p|a:1": 3, "b|p|b:1": 0}, full=True) == {"b|p|a:1": 3}


def test_local_counts_are_leases_and_tickets() -> None:
    snap = Snapshot.build(config("backends: [127.0.0.1:9001, 127.0.0.1:9002]", "limits: {max_sessions: 10}\n"))
    pool = snap.pools["p"]
    admission = Admission()
    lease = pool.acquire(pool.backends[1])
    ticket = admission.admit(snap.config, "1.2.3.4", "p")
    assert isinstance(ticket, Ticket)
    got = fleet.local_counts(snap.pools, admission, ips=["1.2.3.4"], with_ips=True)
    assert got == {
        "b|p|127.0.0.1:9001": 0,
        "b|p|127.0.0.1:9002": 1,
        "s|total": 1,
        "s|pool|p": 1,
        "i|1.2.3.4": 1,
    }
    assert "i|1.2.3.4" not in fleet.local_counts(snap.pools, admission, ips=["1.2.3.4"])
    lease.release()


def test_least_conn_decides_on_fleet_counts_and_falls_back_to_its_own() -> None:
    snap = Snapshot.build(config("balance: least_conn\nbackends: [127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003]"))
    pool = snap.pools["p"]
    own = [pool.acquire(pool.backends[0]) for _ in range(3)]  # this process: three sessions on 9001
    fleet_totals = {"b|p|127.0.0.1:9001": 3, "b|p|127.0.0.1:9002": 7, "b|p|127.0.0.1:9003": 2}
    published = {"b|p|127.0.0.1:9001": 3}
    fleet.merge(snap.pools, fleet_totals, published)
    assert [b.others for b in pool.backends] == [0, 7, 2]
    picks = [next(pool.candidates()).name for _ in range(3)]
    assert picks == ["127.0.0.1:9003"] * 3  # 9001: 3 (own), 9002: 7, 9003: 2 (both other processes')
    fleet.merge(snap.pools, None, published)  # Redis away: this process's own counts only
    assert [b.others for b in pool.backends] == [0, 0, 0]
    assert next(pool.candidates()).name != "127.0.0.1:9001"
    for lease in own:
        lease.release()


def test_random_two_prefers_the_backend_the_fleet_loads_less() -> None:
    snap = Snapshot.build(config("balance: random_two\nbackends: [127.0.0.1:9001, 127.0.0.1:9002]"))
    pool = snap.pools["p"]
    fleet.merge(snap.pools, {"b|p|127.0.0.1:9001": 40}, {})
    assert {next(pool.candidates()).name for _ in range(50)} == {"127.0.0.1:9002"}
    fleet.merge(snap.pools, {"b|p|127.0.0.1:9002": 40}, {})
    assert {next(pool.candidates()).name for _ in range(50)} == {"127.0.0.1:9001"}


def test_backend_max_sessions_counts_the_fleet() -> None:
    snap = Snapshot.build(config("backends: [{address: 127.0.0.1:9001, max_sessions: 5}, 127.0.0.1:9002]"))
    pool = snap.pools["p"]
    fleet.merge(snap.pools, {"b|p|127.0.0.1:9001": 5}, {})
    assert pool.backends[0].full
    assert [b.name for b in pool.candidates()] == ["127.0.0.1:9002"]


def test_bounded_load_hashing_bounds_the_fleet_share() -> None:
    snap = Snapshot.build(
        config("balance: consistent_hash\nhash_key: query:k\nbackends: [127.0.0.1:9001, 127.0.0.1:9002]")
    )
    pool = snap.pools["p"]
    policy = pool.policy
    assert isinstance(policy, ConsistentHash)
    key = b"room"
    home = policy.owner(key)
    other = next(b for b in pool.backends if b is not home)
    fleet.merge(snap.pools, {fleet.backend_field("p", home.name): 20}, {})  # others hold 20 on its home
    assert next(pool.candidates(key)) is other  # over its bound (1.25 * 21 / 2): the next one
    fleet.merge(snap.pools, {}, {})
    assert next(pool.candidates(key)) is home


def test_parse_hash_and_gcra_args() -> None:
    assert fleet.parse_hash([b"b|p|a:1", b"3", b"s|total", b"x"]) == {"b|p|a:1": 3}
    assert fleet.parse_hash({b"k": b"2"}) == {"k": 2}
    assert fleet.gcra_args(20, 5) == ["50000.000", "250000.000"]
    keys = fleet.Keys("w:")
    assert (keys.fleet, keys.ips, keys.procs, keys.ledger("x"), keys.handshakes("::1")) == (
        "w:fleet",
        "w:ips",
        "w:procs",
        "w:proc:x",
        "w:hs|::1",
    )
