"""The admin write API on a running proxy: the token, backend states (drain, maint, ready, a
weight), the session list, closes by selector, rebalancing, and what status and metrics show."""

from __future__ import annotations

import logging
import os

import trio

from tests.integration.control_support import TOKEN, admin_call, closes_with_times, metric_value
from tests.support import RawClient, proxy_yaml, raw_http, start_backend, start_proxy

ADMIN_TOKEN_ENV = "WSPROXY_TEST_ADMIN_TOKEN"


async def _proxy(nursery, backends, count: int = 2, extra: str = "", pool_extra: str = ""):  # type: ignore[no-untyped-def]
    for _ in range(count):
        backends.append(start_backend())
    os.environ[ADMIN_TOKEN_ENV] = TOKEN
    yaml_text = proxy_yaml(
        [b.port for b in backends],
        pool_extra=pool_extra,
        extra=f"admin: {{address: 127.0.0.1:0, token_env: {ADMIN_TOKEN_ENV}}}\nheartbeat: {{interval: off}}\n" + extra,
    )
    proxy = await start_proxy(nursery, yaml_text)
    assert proxy.server.admin_bound is not None
    return proxy, proxy.server.admin_bound[1]


async def _open(proxy, n: int, prefix: str = "/room/") -> list[RawClient]:  # type: ignore[no-untyped-def]
    clients = [await RawClient.connect(proxy.port(), f"{prefix}{i}") for i in range(n)]
    assert all(c.accept for c in clients)
    return clients


async def _echoes(client: RawClient) -> bool:
    from wsproto.events import TextMessage

    await client.send(TextMessage(data="ping?"))
    with trio.fail_after(5):
        return await client.receive_message() == "ping?"


async def test_a_write_for_another_host_is_misdirected_even_with_the_token(nursery, backends) -> None:
    # DNS rebinding: a page on another name that points at the admin address must not write
    proxy, admin = await _proxy(nursery, backends)
    body = {"pool": "p", "backend": f"127.0.0.1:{backends[0].port}", "state": "maint"}
    status, _, _ = await admin_call(admin, "POST", "/backends/state", body, host="evil.example")
    assert status == 421
    assert proxy.server.snapshot.pools["p"].backends[0].admin.state == "ready"
    assert not proxy.server.control_api.counts  # never reached the write API
    status, _, _ = await admin_call(admin, "POST", "/backends/state", body, host=f"localhost:{admin}")
    assert status == 200 and proxy.server.snapshot.pools["p"].backends[0].admin.state == "maint"


async def test_writes_need_the_bearer_token_compared_and_counted(nursery, backends, caplog) -> None:
    proxy, admin = await _proxy(nursery, backends)
    name = f"127.0.0.1:{backends[0].port}"
    body = {"pool": "p", "backend": name, "state": "drain"}
    caplog.set_level(logging.INFO, logger="wsproxy.admin")
    status, doc, answer = await admin_call(admin, "POST", "/backends/state", body, token=None)
    assert status == 401 and b"WWW-Authenticate: Bearer" in answer and "Bearer" in doc["error"]
    status, _, _ = await admin_call(admin, "POST", "/backends/state", body, token=TOKEN + "x")
    assert status == 401
    assert proxy.server.snapshot.pools["p"].backends[0].admin.state == "ready"
    status, doc, _ = await admin_call(admin, "POST", "/backends/state", body)
    assert status == 200 and doc["state"] == "drain" and doc["previous"] == "ready"
    logged = [r.getMessage() for r in caplog.records if r.name == "wsproxy.admin" and "POST" in r.getMessage()]
    assert len(logged) == 3 and all("from 127.0.0.1:" in m for m in logged)
    assert not any(TOKEN in r.getMessage() for r in caplog.records)
    metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert metric_value(metrics, 'wsproxy_admin_actions_total{action="backend_state",result="unauthorized"}') == 2
    assert metric_value(metrics, 'wsproxy_admin_actions_total{action="backend_state",result="ok"}') == 1


async def test_without_a_token_the_write_api_is_off_and_reads_stay_open(nursery, backends) -> None:
    backends.append(start_backend())
    yaml_text = proxy_yaml([backends[0].port], extra="admin: {address: 127.0.0.1:0}\n")
    proxy = await start_proxy(nursery, yaml_text)
    admin = proxy.server.admin_bound[1]
    body = {"pool": "p", "backend": f"127.0.0.1:{backends[0].port}", "state": "drain"}
    status, doc, _ = await admin_call(admin, "POST", "/backends/state", body)
    assert status == 403 and "admin.token_file" in doc["error"]
    status, doc, _ = await admin_call(admin, "GET", "/sessions", token=None)
    assert status == 200 and doc["sessions"] == []


async def test_bad_control_requests_get_clear_answers(nursery, backends) -> None:
    _, admin = await _proxy(nursery, backends)
    cases = [
        ("POST", "/backends/state", None, b"{not json", 400, "not JSON"),
        ("POST", "/backends/state", {"pool": "nope", "backend": "x", "state": "drain"}, None, 404, "no pool"),
        ("POST", "/backends/state", {"pool": "p", "backend": "10.9.9.9:1", "state": "drain"}, None, 404, "no backend"),
        ("POST", "/backends/state", {"pool": "p", "backend": "x", "state": "sleep"}, None, 400, "state"),
        ("POST", "/sessions/close", {"code": 1006}, None, 400, "code"),
        ("POST", "/rebalance", {"pool": "p", "percent": 0}, None, 400, "percent"),
        ("GET", "/rebalance", None, None, 405, "POST"),
        ("GET", "/sessions?limit=0", None, None, 400, "limit"),
        ("GET", "/sessions?colour=red", None, None, 400, "unknown field"),
    ]
    for method, path, body, raw, want, words in cases:
        status, doc, answer = await admin_call(admin, method, path, body, raw_body=raw)
        assert (status, words in (doc or {}).get("error", "")) == (want, True), (path, body, answer)


async def test_drain_takes_no_new_sessions_and_keeps_the_open_ones(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    b1, b2 = (f"127.0.0.1:{b.port}" for b in backends)
    old = await _open(proxy, 4)
    pool = proxy.server.snapshot.pools["p"]
    assert [b.active for b in pool.backends] == [2, 2]
    status, doc, _ = await admin_call(admin, "POST", "/backends/state", {"pool": "p", "backend": b1, "state": "drain"})
    assert status == 200 and doc["closing"] == 0 and doc["active_sessions"] == 2
    new = await _open(proxy, 4, "/new/")
    assert [b.active for b in pool.backends] == [2, 6]
    assert all([await _echoes(c) for c in old])  # the drained backend's sessions go on
    status_doc = (await admin_call(admin, "GET", "/status.json", token=None))[1]
    rows = {b["name"]: b for b in status_doc["pools"][0]["backends"]}
    assert (rows[b1]["admin_state"], rows[b2]["admin_state"]) == ("drain", "ready")
    metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    line = f'wsproxy_backend_admin_state{{backend="{b1}",pool="p",state="drain"}}'
    assert metric_value(metrics, line) == 1.0
    status, doc, _ = await admin_call(admin, "POST", "/backends/state", {"pool": "p", "backend": b1, "state": "ready"})
    assert doc["state"] == "ready"
    more = await _open(proxy, 2, "/back/")
    assert pool.backends[0].active == 3  # round robin gives it new sessions again
    for c in old + new + more:
        await trio.aclose_forcefully(c.stream)


async def test_maint_closes_the_open_sessions_with_1012_spread_over_the_window(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    b1 = f"127.0.0.1:{backends[0].port}"
    clients = await _open(proxy, 16)
    on_b1 = [c for i, c in enumerate(clients) if i % 2 == 0]
    body = {"pool": "p", "backend": b1, "state": "maint", "spread": "2s"}
    start = trio.current_time()
    status, doc, _ = await admin_call(admin, "POST", "/backends/state", body)
    assert status == 200 and doc["closing"] == 8 and doc["spread_s"] == 2.0
    got = await closes_with_times(on_b1, start)
    assert {(close.code, close.reason) for close, _ in got} == {(1012, "backend in maintenance")}
    times = [t for _, t in got]
    assert max(times) - min(times) >= 0.75  # spread (ideally about 1.75 s), not all at once
    assert max(times) <= 4.0
    for c in clients[1::2]:
        assert await _echoes(c)
        await trio.aclose_forcefully(c.stream)


async def test_admin_state_and_weight_survive_a_reload_while_the_backend_stays(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    b1 = f"127.0.0.1:{backends[0].port}"
    body = {"pool": "p", "backend": b1, "state": "drain", "weight": 5}
    assert (await admin_call(admin, "POST", "/backends/state", body))[0] == 200
    config = proxy.server.snapshot.config
    from wsproxy.config import parse_config

    text = proxy_yaml(
        [b.port for b in backends],
        extra=f"admin: {{address: 127.0.0.1:0, token_env: {ADMIN_TOKEN_ENV}}}\nheartbeat: {{interval: off}}\n# v2\n",
    )
    await proxy.server.reload(parse_config(text, source="test.yaml"))
    assert proxy.server.snapshot.config is not config
    kept = proxy.server.snapshot.pools["p"].backends[0]
    assert (kept.admin.state, kept.weight) == ("drain", 5)
    status_doc = (await admin_call(admin, "GET", "/status.json", token=None))[1]
    assert status_doc["pools"][0]["backends"][0]["admin_state"] == "drain"
    assert status_doc["pools"][0]["backends"][0]["weight"] == 5


async def test_sessions_are_listed_paged_and_filtered(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    b2 = f"127.0.0.1:{backends[1].port}"
    clients = await _open(proxy, 5)
    assert await _echoes(clients[0])
    status, doc, _ = await admin_call(admin, "GET", "/sessions?limit=2", token=None)
    assert status == 200 and doc["count"] == 2 and doc["matching"] == 5 and doc["next"] is not None
    seen = [row["id"] for row in doc["sessions"]]
    while doc["next"] is not None:
        doc = (await admin_call(admin, "GET", f"/sessions?limit=2&after={doc['next']}", token=None))[1]
        seen += [row["id"] for row in doc["sessions"]]
    assert len(seen) == len(set(seen)) == 5 and seen == sorted(seen)
    doc = (await admin_call(admin, "GET", "/sessions?route=/room/0", token=None))[1]
    (row,) = doc["sessions"]
    assert row["route"] == "/room/0" and row["messages_to_backend"] == 1 and row["messages_to_client"] == 1
    assert row["bytes_from_client"] > 0 and row["client"].startswith("127.0.0.1:") and row["age_s"] >= 0
    doc = (await admin_call(admin, "GET", f"/sessions?pool=p&backend={b2}", token=None))[1]
    assert {r["backend"] for r in doc["sessions"]} == {b2} and doc["count"] == 2
    doc = (await admin_call(admin, "GET", "/sessions?older_than=1h", token=None))[1]
    assert doc["sessions"] == []
    for c in clients:
        await trio.aclose_forcefully(c.stream)


async def test_close_by_selector_uses_the_code_and_reason_at_a_flat_rate(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    doomed = await _open(proxy, 8, "/chat/")
    spared = await _open(proxy, 2, "/feed/")
    body = {"selector": {"route": "/chat/"}, "code": 4001, "reason": "please reconnect", "spread": "2s"}
    start = trio.current_time()
    status, doc, _ = await admin_call(admin, "POST", "/sessions/close", body)
    assert status == 200 and doc == {"closing": 8, "code": 4001, "spread_s": 2.0}
    got = await closes_with_times(doomed, start)
    assert {(close.code, close.reason) for close, _ in got} == {(4001, "please reconnect")}
    times = [t for _, t in got]
    assert max(times) - min(times) >= 0.75  # spread (ideally about 1.75 s), not all at once
    for c in spared:
        assert await _echoes(c)
        await trio.aclose_forcefully(c.stream)


async def test_rebalance_closes_a_share_of_the_busiest_backend(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends)
    b1, b2 = (f"127.0.0.1:{b.port}" for b in backends)
    await admin_call(admin, "POST", "/backends/state", {"pool": "p", "backend": b2, "state": "drain"})
    clients = await _open(proxy, 6)  # all on b1
    await admin_call(admin, "POST", "/backends/state", {"pool": "p", "backend": b2, "state": "ready"})
    status, doc, _ = await admin_call(admin, "POST", "/rebalance", {"pool": "p", "percent": 50, "over": "300ms"})
    assert status == 200 and doc["closing"] == 3 and doc["by_backend"] == {b1: 3}
    codes = []
    for c in clients:
        with trio.move_on_after(2):
            codes.append((await c.wait_close()).code)
    assert codes.count(1012) == 3 and len(codes) == 3


async def test_new_metrics_reconnects_latency_backlog_build_and_process(nursery, backends) -> None:
    proxy, admin = await _proxy(nursery, backends, count=1, extra="observability: {reconnect_window: 30s}\n")
    b1 = f"127.0.0.1:{backends[0].port}"
    first = await _open(proxy, 1)
    await first[0].close()
    with trio.fail_after(5):
        while proxy.server.sessions:
            await trio.sleep(0.01)
    again = await _open(proxy, 2, "/again/")  # the same address comes back within the window
    metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    text = metrics.decode()
    # the second new session of the same client: its first session is forgotten once counted
    assert metric_value(metrics, f'wsproxy_reconnects_total{{backend="{b1}",pool="p"}}') == 1.0
    assert metric_value(metrics, 'wsproxy_handshake_seconds_count{listener="127.0.0.1:0"}') == 3.0
    assert metric_value(metrics, f'wsproxy_backend_handshake_seconds_count{{backend="{b1}",pool="p"}}') == 3.0
    assert metric_value(metrics, f'wsproxy_backlog_bytes{{backend="{b1}",direction="to_client",pool="p"}}') == 0.0
    assert 'wsproxy_build_info{python="' in text and 'version="' in text
    assert "process_resident_memory_bytes " in text and "process_open_fds " in text
    for c in again:
        await trio.aclose_forcefully(c.stream)


async def test_backlog_and_send_stalls_show_a_client_that_stops_reading(nursery, backends) -> None:
    from wsproto.events import BytesMessage

    proxy, admin = await _proxy(nursery, backends, count=1, extra="limits: {buffer_bytes: 65536}\n")
    b1 = f"127.0.0.1:{backends[0].port}"
    (client,) = await _open(proxy, 1)
    line = f'wsproxy_backlog_bytes{{backend="{b1}",direction="to_client",pool="p"}}'
    waiting = 0.0
    with trio.move_on_after(10):  # bounded: the echo fills the proxy's send to a client that never reads
        for _ in range(400):
            with trio.move_on_after(0.2):
                await client.send(BytesMessage(data=b"x" * 65536))
            metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            waiting = metric_value(metrics, line) or 0.0
            if waiting > 0:
                break
    assert waiting > 0  # bytes from the backend wait in the proxy for the client's window
    with trio.fail_after(10):  # the client reads again: the stall ends and is measured
        while True:
            with trio.move_on_after(0.2):
                await client.receive_message()
            metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if (metric_value(metrics, 'wsproxy_send_stall_seconds_count{side="client"}') or 0) >= 1:
                break
    await trio.aclose_forcefully(client.stream)
