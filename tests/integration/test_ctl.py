"""`wsproxy ctl` against a real `wsproxy run` with two workers: it reads the admin address and
token from the config, asks every worker and sums; human output and --json."""

from __future__ import annotations

import json
import sys

import trio

from tests.integration.control_support import TOKEN
from tests.integration.test_relay import ProxyProcess
from tests.integration.test_reload import config_text, free_port_pair, start_backends, wait_for
from tests.support import RawClient, free_port


async def ctl(config, *args: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    proc = await trio.run_process(
        [sys.executable, "-m", "wsproxy", "ctl", "-c", str(config), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_ctl_talks_to_every_worker_and_sums(nursery, tmp_path) -> None:
    backends = await start_backends(nursery, 2)
    port = free_port()
    admin = free_port_pair(avoid={port, *backends})
    (tmp_path / "token").write_text(TOKEN + "\n")
    extra = (
        "workers: 2\nshutdown: {drain_window: 0s, deadline: 3s}\n"
        f"admin: {{address: 127.0.0.1:{admin}, token_file: token}}\n"
    )
    path = tmp_path / "wsproxy.yaml"
    path.write_text(config_text(port, backends, extra=extra))
    proc = ProxyProcess(path)
    try:
        await wait_for(lambda: len([ln for ln in proc.lines if "wsproxy ready" in ln]) >= 2, timeout=30)
        clients = []
        for i in range(8):
            c = await RawClient.connect(port, f"/chat/{i}")
            assert c.accept is not None
            clients.append(c)
        code, out, err = await ctl(path, "--json", "sessions")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["count"] == 8 and doc["workers"] == 2
        assert sorted(r["route"] for r in doc["sessions"]) == sorted(f"/chat/{i}" for i in range(8))
        on_b0 = sum(r["backend"] == f"127.0.0.1:{backends[0]}" for r in doc["sessions"])
        code, out, err = await ctl(path, "sessions", "--route", "/chat/3")
        assert code == 0 and "/chat/3" in out and "1 session(s) on 2 worker(s)" in out, out + err

        b0 = f"127.0.0.1:{backends[0]}"
        code, out, err = await ctl(path, "--json", "drain", "p", b0)
        assert code == 0, err
        doc = json.loads(out)
        assert (doc["state"], doc["workers"], doc["active_sessions"]) == ("drain", 2, on_b0)
        code, out, _ = await ctl(path, "ready", "p", b0, "--weight", "3")
        assert code == 0 and f"pool p backend {b0}: ready (was drain), weight 3" in out, out

        code, out, err = await ctl(path, "close", "--route", "/chat/", "--code", "4000", "--reason", "bye")
        assert code == 0 and out.strip() == "closing 8 session(s) with 4000 over 0s", out + err
        for c in clients:
            with trio.fail_after(5):
                close = await c.wait_close()
            assert (close.code, close.reason) == (4000, "bye")
    finally:
        proc.stop()


async def test_ctl_says_why_when_it_cannot_act(tmp_path) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "wsproxy.yaml"
    path.write_text(config_text(port, [9], extra=f"admin: {{address: 127.0.0.1:{admin}}}\n"))
    code, _, err = await ctl(path, "drain", "p", "127.0.0.1:9")
    assert code == 1 and "cannot reach the admin listener" in err
    path.write_text(config_text(port, [9]))
    code, _, err = await ctl(path, "sessions")
    assert code == 1 and "admin: not set" in err
    path.write_text("pools: {}\n")
    code, _, err = await ctl(path, "sessions")
    assert code == 2
    code, out, _ = await ctl(path, "--help")
    for command in ("sessions", "drain", "maint", "ready", "close", "rebalance"):
        assert f"  {command}" in out
