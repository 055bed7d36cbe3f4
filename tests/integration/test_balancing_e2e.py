"""Balancing, stickiness and routing end to end: real sockets, real backends, real proxies.

Every backend here is a `websockets` server that sends its own tag ("b1", "b2"...) as the first
message of each session and then echoes, so a client knows which backend it reached. Counts are
read on both sides: the tags the clients saw and the proxy pool's own `active` counters.
Sessions are held open where the policy decides by load, and every wait is bounded.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import pytest
import trio
from websockets.sync.server import ServerConnection

from tests.integration.test_relay import ProxyProcess
from tests.support import Backend, RawClient, RunningProxy, free_port, start_backend, start_proxy
from wsproxy.config import parse_config
from wsproxy.policy.balancing import Pool, build_pool
from wsproxy.policy.balancing.consistent_hash import ConsistentHash

TIMEOUTS = "timeouts: {handshake: 2s, connect: 1s, close: 1s}\n"
WAIT = 10.0  # bound on any one phase of a test (seconds)


def start_tagged(backends: list[Backend], count: int) -> list[int]:
    """Start `count` backends tagged b1..bN (stopped by the `backends` fixture); their ports."""
    for i in range(count):
        tag = f"b{i + 1}"

        def handler(conn: ServerConnection, tag: str = tag) -> None:
            conn.send(tag)
            for message in conn:
                conn.send(message)

        backends.append(start_backend(handler))
    return [b.port for b in backends[-count:]]


def pool_yaml(ports: list[int], *, weights: list[int] | None = None, name: str = "p", extra: str = "") -> str:
    """One pool block (under `pools:`) with the given backends and pool keys."""
    lines = [f"  {name}:"]
    lines += ["    " + ln for ln in extra.strip().splitlines()]
    lines.append("    backends:")
    for i, port in enumerate(ports):
        weight = f", weight: {weights[i]}" if weights else ""
        lines.append(f"      - {{address: 127.0.0.1:{port}{weight}}}")
    return "\n".join(lines) + "\n"


def one_pool_config(ports: list[int], *, weights: list[int] | None = None, extra: str = "") -> str:
    listener = "listeners:\n  - address: 127.0.0.1:0\n    pool: p\n"
    return listener + "pools:\n" + pool_yaml(ports, weights=weights, extra=extra) + TIMEOUTS


async def open_session(
    port: int,
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[RawClient, str]:
    """Connect through the proxy; the backend's tag is the session's first message."""
    client = await RawClient.connect(port, path, host=host, extra_headers=headers)
    assert client.accept is not None, (client.reject, client.reject_body)
    tag = await client.receive_message()
    assert isinstance(tag, str)
    return client, tag


async def open_many(count: int, port: int, **kwargs: object) -> list[tuple[RawClient, str]]:
    """`count` sessions opened concurrently and held open."""
    opened: list[tuple[RawClient, str]] = []

    async def one() -> None:
        opened.append(await open_session(port, **kwargs))  # type: ignore[arg-type]

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return opened


async def end_session(client: RawClient) -> None:
    """A clean close through the proxy, then wait for the proxy to drop the TCP connection."""
    with trio.fail_after(WAIT):
        closed = await client.close(1000)
        assert closed.code == 1000
        await client.expect_eof()
        await client.stream.aclose()


async def end_all(sessions: list[tuple[RawClient, str]]) -> None:
    async with trio.open_nursery() as nursery:
        for client, _ in sessions:
            nursery.start_soon(end_session, client)


def pool_of(proxy: RunningProxy, name: str = "p") -> Pool:
    return proxy.server.snapshot.pools[name]


async def wait_active(pool: Pool, index: int | None, count: int) -> None:
    """Until the proxy counts `count` sessions on backend `index` (None: the whole pool).

    A client sees EOF a moment before its session leaves the proxy's registry and releases its
    count, so tests that depend on counts wait for them instead of racing.
    """
    with trio.fail_after(WAIT):
        while (pool.active if index is None else pool.backends[index].active) != count:
            await trio.sleep(0.005)


async def reject_of(port: int, path: str = "/", **kwargs: object) -> tuple[int, bytes]:
    client = await RawClient.connect(port, path, **kwargs)  # type: ignore[arg-type]
    assert client.reject is not None, "expected the proxy to refuse the upgrade"
    await client.stream.aclose()
    return client.reject.status_code, client.reject_body


# --------------------------------------------------------------------------------------------
# least_conn


async def test_least_conn_spreads_30_sessions_10_10_10_and_refills_the_emptied_backend(nursery, backends) -> None:
    ports = start_tagged(backends, 3)
    proxy = await start_proxy(nursery, one_pool_config(ports, extra="balance: least_conn"))
    pool = pool_of(proxy)

    sessions = await open_many(30, proxy.port())
    assert Counter(tag for _, tag in sessions) == {"b1": 10, "b2": 10, "b3": 10}
    assert [b.active for b in pool.backends] == [10, 10, 10]

    b1 = [s for s in sessions if s[1] == "b1"]
    await end_all(b1)
    await wait_active(pool, 0, 0)
    assert [b.active for b in pool.backends] == [0, 10, 10]

    refill = await open_many(10, proxy.port())
    assert Counter(tag for _, tag in refill) == {"b1": 10}  # the emptied backend takes every new one
    assert [b.active for b in pool.backends] == [10, 10, 10]

    await end_all([s for s in sessions if s[1] != "b1"] + refill)
    await wait_active(pool, None, 0)


# --------------------------------------------------------------------------------------------
# consistent_hash: stickiness per key kind, fallback for a missing key

KEYS = ["alice", "bob", "carol", "dave", "room-42", "ütf-8"]
RECONNECTS = 3


def key_request(kind: str, key: str) -> dict[str, object]:
    """RawClient.connect arguments that carry `key` as the given kind of hash key."""
    raw = key.encode()
    if kind == "header":
        return {"headers": [(b"X-User", raw)]}
    if kind == "query":
        return {"path": f"/chat?lang=en&room={quote(key)}"}
    return {"headers": [(b"Cookie", b"theme=dark; session=" + raw + b"; x=1")]}


HASH_KEYS = {"header": "header:x-user", "query": "query:room", "cookie": "cookie:session"}


@pytest.mark.parametrize("kind", list(HASH_KEYS))
async def test_hash_key_sticks_to_one_backend_across_reconnects(nursery, backends, kind: str) -> None:
    ports = start_tagged(backends, 3)
    extra = f"balance: consistent_hash\nhash_key: {HASH_KEYS[kind]}\nhash_fallback: reject"
    proxy = await start_proxy(nursery, one_pool_config(ports, extra=extra))
    pool = pool_of(proxy)
    assert isinstance(pool.policy, ConsistentHash)
    tag_of = {b.name: f"b{i + 1}" for i, b in enumerate(pool.backends)}

    # The ring depends on the backends' (random) ports: add keys until the ring spreads them over
    # at least two backends, so the last assertion below tests the proxy, never the luck of the ports.
    keys = list(KEYS)
    while len({pool.policy.owner(k.encode()).name for k in keys}) < 2:
        keys.append(f"user-{len(keys)}")
    reached: dict[str, list[str]] = {}
    for key in keys:
        for _ in range(RECONNECTS):
            kwargs = key_request(kind, key)
            client, tag = await open_session(proxy.port(), **kwargs)  # type: ignore[arg-type]
            reached.setdefault(key, []).append(tag)
            await end_session(client)
            await wait_active(pool, None, 0)  # an idle pool: no load bound moves the key

    for key, tags in reached.items():
        assert tags == [tag_of[pool.policy.owner(key.encode()).name]] * RECONNECTS, (key, tags)
    assert len({tags[0] for tags in reached.values()}) >= 2  # the keys really are hashed, not pinned


@pytest.mark.parametrize("kind", list(HASH_KEYS))
async def test_request_without_the_hash_key_is_rejected_with_400_under_reject(nursery, backends, kind: str) -> None:
    ports = start_tagged(backends, 3)
    extra = f"balance: consistent_hash\nhash_key: {HASH_KEYS[kind]}\nhash_fallback: reject"
    proxy = await start_proxy(nursery, one_pool_config(ports, extra=extra))

    # Absent, and present but empty: both are a missing key.
    for kwargs in ({}, {"path": "/chat?room=", "extra_headers": [(b"X-User", b""), (b"Cookie", b"session=")]}):
        status, body = await reject_of(proxy.port(), **kwargs)
        assert status == 400
        assert f"request has no {HASH_KEYS[kind]}".encode() in body, body
    assert all(not b.requests for b in backends)  # refused before any backend was tried


@pytest.mark.parametrize("kind", list(HASH_KEYS))
async def test_request_without_the_hash_key_is_balanced_by_least_conn_by_default(nursery, backends, kind: str) -> None:
    ports = start_tagged(backends, 3)
    extra = f"balance: consistent_hash\nhash_key: {HASH_KEYS[kind]}"  # hash_fallback: least_conn (default)
    proxy = await start_proxy(nursery, one_pool_config(ports, extra=extra))

    sessions = await open_many(6, proxy.port())
    assert Counter(tag for _, tag in sessions) == {"b1": 2, "b2": 2, "b3": 2}
    await end_all(sessions)


# --------------------------------------------------------------------------------------------
# two processes, one config, one mapping


@pytest.fixture
def proxy_processes() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        p.stop()


async def test_two_proxy_processes_send_each_key_to_the_same_backend(
    backends, proxy_processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = start_tagged(backends, 3)
    # The largest factor keeps the load bound out of play, so each process's choice is the ring's
    # alone; the two processes get different hash seeds, so a salted hash() would show.
    extra = "balance: consistent_hash\nhash_key: header:x-user\nhash_balance_factor: 100"
    config_text = one_pool_config(ports, extra=extra)
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text)
    for seed in ("1", "2"):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        proxy_processes.append(ProxyProcess(path))
    port_a, port_b = [await trio.to_thread.run_sync(p.wait_ready) for p in proxy_processes]

    # The ring built in this (third) process from the same file predicts both.
    ring = build_pool(parse_config(config_text).pools["p"]).policy
    assert isinstance(ring, ConsistentHash)
    tag_of = {f"127.0.0.1:{port}": f"b{i + 1}" for i, port in enumerate(ports)}

    seen: list[str] = []
    for i in range(20):
        key = f"user-{i}".encode()
        a, tag_a = await open_session(port_a, headers=[(b"x-user", key)])
        b, tag_b = await open_session(port_b, headers=[(b"x-user", key)])
        assert tag_a == tag_b == tag_of[ring.owner(key).name], (key, tag_a, tag_b)
        seen.append(tag_a)
        await end_session(a)
        await end_session(b)
    assert set(seen) == {"b1", "b2", "b3"}


# --------------------------------------------------------------------------------------------
# routing


async def test_routes_select_pools_by_host_and_path_and_404_without_a_match(nursery, backends) -> None:
    chat, wild, admin = start_tagged(backends, 3)  # tags b1, b2, b3
    # Two listeners need two addresses: the second gets a fixed free port, not another :0.
    config = (
        "listeners:\n"
        "  - address: 127.0.0.1:0\n"
        "    routes:\n"
        "      - {match: {host: chat.example.com}, pool: chat}\n"
        "      - {match: {host: '*.example.com'}, pool: wild}\n"
        "      - {match: {path_prefix: /admin}, pool: admin}\n"
        f"  - address: 127.0.0.1:{free_port()}\n"
        "    routes:\n"
        "      - {match: {host: chat.example.com, path_prefix: /admin}, pool: admin}\n"
        "      - {pool: chat}\n"
        "pools:\n"
        + pool_yaml([chat], name="chat")
        + pool_yaml([wild], name="wild")
        + pool_yaml([admin], name="admin")
        + TIMEOUTS
    )
    proxy = await start_proxy(nursery, config)
    routed = [
        (0, "chat.example.com", "/", "b1"),
        (0, "CHAT.Example.COM:8443", "/room/1?x=1", "b1"),  # case and port ignored
        (0, "chat.example.com.", "/", "b1"),  # the fully qualified form
        (0, "chat.example.com", "/admin", "b1"),  # first match wins: the host route comes first
        (0, "eu.example.com", "/", "b2"),
        (0, "A.B.Example.com:80", "/admin", "b2"),  # any depth under the wildcard
        (0, "example.com", "/admin", "b3"),  # the wildcard does not cover the bare domain
        (0, "other.org:9000", "/admin/users?page=2", "b3"),
        (1, "chat.example.com:1", "/admin/x", "b3"),  # host and path both match
        (1, "chat.example.com", "/", "b1"),  # the default route
        (1, "other.org", "/admin", "b1"),
    ]
    for listener, host, path, expected in routed:
        client, tag = await open_session(proxy.port(listener), path, host=host)
        assert tag == expected, (listener, host, path, tag)
        await end_session(client)

    for host, path in [
        ("example.com", "/"),
        ("example.com", "/administrator"),  # prefixes match whole segments
        ("example.org", "/chat"),
        ("notexample.com", "/"),
    ]:
        status, body = await reject_of(proxy.port(0), path, host=host)
        assert status == 404, (host, path, status)
        assert b"no route" in body, body


# --------------------------------------------------------------------------------------------
# bounded loads and weights


async def test_one_hot_key_never_loads_a_backend_past_the_bound(nursery, backends) -> None:
    ports = start_tagged(backends, 3)
    sessions_count = 30
    extra = "balance: consistent_hash\nhash_key: header:x-room\nhash_balance_factor: 1.25"
    proxy = await start_proxy(nursery, one_pool_config(ports, extra=extra))
    pool = pool_of(proxy)
    tag_of = {b.name: f"b{i + 1}" for i, b in enumerate(pool.backends)}

    sessions = await open_many(sessions_count, proxy.port(), headers=[(b"x-room", b"the-one-big-room")])
    counts = Counter(tag for _, tag in sessions)
    bound = math.ceil(1.25 * sessions_count / 3)
    assert sum(counts.values()) == sessions_count
    assert max(counts.values()) <= bound, counts
    assert [b.active for b in pool.backends] == [counts[tag_of[b.name]] for b in pool.backends]

    # Exactly what the pure policy gives for 30 arrivals of one key on the same config.
    model = build_pool(proxy.config.pools["p"])
    with ExitStack() as stack:
        for _ in range(sessions_count):
            stack.enter_context(model.acquire(next(iter(model.candidates(b"the-one-big-room")))))
        assert {tag_of[b.name]: b.active for b in model.backends} == dict(counts)
    assert isinstance(model.policy, ConsistentHash)
    assert counts[tag_of[model.policy.owner(b"the-one-big-room").name]] == bound  # the key's home fills up first
    await end_all(sessions)


async def test_round_robin_weights_1_and_2_split_30_sessions_10_and_20(nursery, backends) -> None:
    ports = start_tagged(backends, 2)
    proxy = await start_proxy(nursery, one_pool_config(ports, weights=[1, 2], extra="balance: round_robin"))

    sessions = await open_many(30, proxy.port())
    assert Counter(tag for _, tag in sessions) == {"b1": 10, "b2": 20}
    await end_all(sessions)
