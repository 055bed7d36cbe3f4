"""The status page's control buttons and charts in headless Chromium (as test_status_browser.py):
opened with the admin token it shows drain/ready buttons that change a backend's state; its
charts are drawn in the page from /status.json, and a value read back from a drawn line matches
the metrics."""

from __future__ import annotations

import json
import os

import trio
from wsproto.events import TextMessage

from tests.integration.control_support import TOKEN, metric_value
from tests.integration.test_status_browser import CHROMIUM, Browser
from tests.support import RawClient, proxy_yaml, raw_http, start_backend, start_proxy

ENV = "WSPROXY_TEST_BROWSER_TOKEN"

ADMIN_CELL = """(() => {
  const cell = [...document.querySelectorAll("#pools td")].find(td => td.textContent === %s);
  return cell ? cell.parentElement.children[4].textContent : null;
})()"""

# the value of the last point of a drawn line, read back from its SVG coordinates and the axis
LAST_DRAWN = """(() => {
  const svg = document.querySelector("#chart-%s svg");
  const line = svg && svg.querySelector('polyline[data-series="%s"]');
  if (!line) return null;
  const points = line.getAttribute("points").trim().split(" ");
  const y = parseFloat(points[points.length - 1].split(",")[1]);
  const top = parseFloat(svg.dataset.top), height = parseFloat(svg.dataset.height), max = parseFloat(svg.dataset.max);
  return Math.round(max * (1 - (y - top) / height) * 100) / 100;
})()"""


async def _setup(nursery, backends):  # type: ignore[no-untyped-def]
    backends.append(start_backend())
    backends.append(start_backend())
    os.environ[ENV] = TOKEN
    extra = f"admin: {{address: 127.0.0.1:0, token_env: {ENV}}}\nheartbeat: {{interval: off}}\n"
    proxy = await start_proxy(nursery, proxy_yaml([b.port for b in backends], extra=extra))
    return proxy, proxy.server.admin_bound[1]


async def test_drain_and_ready_buttons_appear_with_the_token_and_change_the_backend(
    nursery, backends, tmp_path
) -> None:
    assert CHROMIUM is not None, "chromium is not installed: apt-get install chromium (README's test command does)"
    proxy, admin = await _setup(nursery, backends)
    b1 = f"127.0.0.1:{backends[0].port}"
    pool = proxy.server.snapshot.pools["p"]
    browser = await Browser.start(tmp_path / "profile")
    try:
        await browser.call("Page.navigate", url=f"http://127.0.0.1:{admin}/status?refresh=0.2")
        await browser.wait_for(f"{ADMIN_CELL % json.dumps(b1)} === 'ready'", "the backend's admin state")
        assert await browser.evaluate("document.querySelectorAll('#pools button').length") == 0  # no token

        await browser.call("Page.navigate", url=f"http://127.0.0.1:{admin}/status?refresh=0.2#token={TOKEN}")
        drain = f'document.querySelector(\'button[data-backend="{b1}"][data-state="drain"]\')'
        await browser.wait_for(f"{drain} !== null && !{drain}.disabled", "a drain button")
        await browser.evaluate(f"{drain}.click()")
        await browser.wait_for(f"{ADMIN_CELL % json.dumps(b1)} === 'drain'", "the backend drained")
        assert pool.backends[0].admin.state == "drain"
        clients = [await RawClient.connect(proxy.port(), f"/x/{i}") for i in range(4)]
        assert [b.active for b in pool.backends] == [0, 4]  # drained: no new sessions

        ready = f'document.querySelector(\'button[data-backend="{b1}"][data-state="ready"]\')'
        await browser.wait_for(f"{ready} !== null && !{ready}.disabled", "a ready button")
        await browser.evaluate(f"{ready}.click()")
        await browser.wait_for(f"{ADMIN_CELL % json.dumps(b1)} === 'ready'", "the backend ready again")
        assert pool.backends[0].admin.state == "ready"
        text = await browser.evaluate("document.getElementById('control').textContent")
        assert text == f"{b1}: drain \u2192 ready"
        assert TOKEN not in await browser.evaluate("document.body.innerText")  # the secret is not shown
        metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert metric_value(metrics, 'wsproxy_admin_actions_total{action="backend_state",result="ok"}') == 2
    finally:
        await browser.close()
    for c in clients:
        await trio.aclose_forcefully(c.stream)


async def test_charts_are_drawn_in_the_page_and_a_drawn_value_matches_the_metrics(nursery, backends, tmp_path) -> None:
    assert CHROMIUM is not None, "chromium is not installed: apt-get install chromium (README's test command does)"
    proxy, admin = await _setup(nursery, backends)
    clients = [await RawClient.connect(proxy.port(), f"/c/{i}") for i in range(3)]
    for c in clients:
        for _ in range(5):
            await c.send(TextMessage(data="hello"))
            assert await c.receive_message() == "hello"
    metrics = await raw_http(admin, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    open_now = sum(
        metric_value(
            metrics, f'wsproxy_sessions_active{{backend="127.0.0.1:{b.port}",listener="127.0.0.1:0",pool="p"}}'
        )
        or 0
        for b in backends
    )
    to_backend = metric_value(
        metrics, 'wsproxy_messages_total{direction="client_to_backend",listener="127.0.0.1:0",pool="p"}'
    )
    assert (open_now, to_backend) == (3, 15)
    browser = await Browser.start(tmp_path / "profile")
    try:
        await browser.call("Page.navigate", url=f"http://127.0.0.1:{admin}/status?refresh=0.2")
        await browser.wait_for(f"{LAST_DRAWN % ('open', 'total')} === 3", "3 open sessions drawn")
        assert await browser.evaluate(LAST_DRAWN % ("open", "p")) == 3  # per pool
        per_backend = [await browser.evaluate(LAST_DRAWN % ("backends", f"p/127.0.0.1:{b.port}")) for b in backends]
        assert sorted(per_backend) == [1, 2]
        for chart in ("open", "backends", "new", "messages", "closes"):
            assert await browser.evaluate(f"document.querySelector('#chart-{chart} svg polyline') !== null"), chart
        drawn_total = await browser.evaluate("parseFloat(document.getElementById('total_to_backend').dataset.value)")
        assert drawn_total == to_backend
        assert await browser.evaluate("parseFloat(document.getElementById('total_new').dataset.value)") == 3
        assert await browser.evaluate("parseFloat(document.getElementById('uptime').dataset.value)") > 0
        # the page follows: two sessions end, the drawn line comes down to 1
        for c in clients[:2]:
            await c.close()
        await browser.wait_for(f"{LAST_DRAWN % ('open', 'total')} === 1", "1 open session drawn")
        assert await browser.evaluate("document.getElementById('stale').textContent") == ""
    finally:
        await browser.close()
    await trio.aclose_forcefully(clients[2].stream)
