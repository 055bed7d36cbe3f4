"""The status page in a real browser: headless Debian `chromium` driven over the DevTools protocol.

No browser download and no extra package: `.ci/run` installs Debian's chromium, and the DevTools
protocol is JSON over a WebSocket, spoken here with wsproto (tests.support.RawClient). The page
must show the live session count, follow it as sessions come and go, and show a backend going
down once its health check fails, all from its own fetch loop. Without chromium the test fails
(README's test command installs it). Set WSPROXY_STATUS_SCREENSHOT=PATH to keep the
screenshot (docs/status-page.png is one).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import trio
from wsproto.events import TextMessage

from tests.support import RawClient, proxy_yaml, raw_http, start_backend, start_proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Browser:
    """A headless chromium in its own process group, and a DevTools session on its one page."""

    def __init__(self, proc: trio.Process, page: RawClient) -> None:
        self.proc = proc
        self.page = page
        self._ids = 0

    @classmethod
    async def start(cls, profile: Path) -> Browser:
        assert CHROMIUM is not None
        proc = await trio.lowlevel.open_process(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1100,900",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            port = await cls._devtools_port(proc)
            with trio.fail_after(10):
                while True:
                    answer = await raw_http(
                        port, b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                    )
                    pages = [t for t in json.loads(answer.partition(b"\r\n\r\n")[2] or b"[]") if t["type"] == "page"]
                    if pages:
                        break
                    await trio.sleep(0.1)
            path = re.sub(r"^ws://[^/]+", "", pages[0]["webSocketDebuggerUrl"])
            page = await RawClient.connect(port, path)
            assert page.accept is not None, page.reject
        except BaseException:
            cls._kill(proc)
            raise
        return cls(proc, page)

    @staticmethod
    async def _devtools_port(proc: trio.Process) -> int:
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(30):
            while True:
                chunk = await proc.stderr.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"chromium exited: {seen.decode(errors='replace')}")
                seen += chunk
                m = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", seen)
                if m:
                    return int(m.group(1))

    async def call(self, method: str, **params: object) -> dict:
        self._ids += 1
        await self.page.send(TextMessage(data=json.dumps({"id": self._ids, "method": method, "params": params})))
        with trio.fail_after(15):
            while True:
                got = json.loads(await self.page.receive_message())
                if got.get("id") == self._ids:
                    if "error" in got:
                        raise AssertionError(f"{method}: {got['error']}")
                    return got["result"]

    async def evaluate(self, expression: str) -> object:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 10.0) -> None:
        """Poll `expression` in the page until it is true (the page redraws itself every 0.2 s here)."""
        with trio.move_on_after(timeout):
            while not await self.evaluate(expression):
                await trio.sleep(0.1)
            return
        body = await self.evaluate("document.body.innerText")
        raise AssertionError(f"the page never showed {what}; it shows:\n{body}")

    async def close(self) -> None:
        await trio.aclose_forcefully(self.page.stream)
        self._kill(self.proc)
        with trio.move_on_after(10):
            await self.proc.wait()

    @staticmethod
    def _kill(proc: trio.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderer/zygote children


BACKEND_STATE = """(() => {
  const cell = [...document.querySelectorAll("#pools td")].find(td => td.textContent === %s);
  return cell ? cell.parentElement.children[1].textContent + "/" + cell.parentElement.children[1].className : null;
})()"""


async def test_status_page_in_chromium_shows_live_sessions_and_a_backend_going_down(
    nursery, backends, tmp_path
) -> None:
    # README's test command installs Debian's chromium: without it this test fails, it never skips
    assert CHROMIUM is not None, "chromium is not installed: apt-get install chromium (README's test command does)"
    backends.append(start_backend())
    backends.append(start_backend())
    b1, b2 = backends
    health = "health: {interval: 200ms, timeout: 200ms, rise: 1, fall: 1, check: tcp}"
    yaml_text = proxy_yaml(
        [b1.port, b2.port],
        pool_extra=health,
        extra="admin: {address: 127.0.0.1:0}\nheartbeat: {interval: off}\n",
    )
    proxy = await start_proxy(nursery, yaml_text)
    admin = proxy.server.admin_bound[1]
    clients = [await RawClient.connect(proxy.port(), f"/room/{i}") for i in range(3)]
    assert all(c.accept for c in clients)

    browser = await Browser.start(tmp_path / "profile")
    try:
        await browser.call("Page.navigate", url=f"http://127.0.0.1:{admin}/status?refresh=0.2")
        await browser.wait_for("document.getElementById('active').textContent === '3'", "3 active sessions")
        name1, name2 = f"127.0.0.1:{b1.port}", f"127.0.0.1:{b2.port}"
        await browser.wait_for(f"{BACKEND_STATE % json.dumps(name2)} === 'up/up'", f"{name2} up")
        oldest = await browser.evaluate("document.querySelector('#by_age td:nth-child(4)').textContent")
        assert oldest == "/room/0"

        await clients[0].close()  # one session ends: the count follows without a reload
        await browser.wait_for("document.getElementById('active').textContent === '2'", "2 active sessions")

        b2.server.socket.close()  # it refuses connects from now on: down after one failed check (fall: 1)
        await browser.wait_for(f"{BACKEND_STATE % json.dumps(name2)} === 'down/down'", f"{name2} down")
        assert await browser.evaluate(BACKEND_STATE % json.dumps(name1)) == "up/up"
        assert await browser.evaluate("document.getElementById('stale').textContent") == ""

        shot = await browser.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
        keep = os.environ.get("WSPROXY_STATUS_SCREENSHOT")
        if keep:
            Path(keep).write_bytes(png)
    finally:
        await browser.close()
    for c in clients[1:]:
        await trio.aclose_forcefully(c.stream)
