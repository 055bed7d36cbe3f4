"""The command line, as other tooling drives it: subprocesses of `python -m wsproxy`.

`run -c FILE` serves and stops cleanly on SIGTERM/SIGINT (sessions get 1001, exit 0, bounded
time); an invalid config exits 2 naming the file and the key path; `check`, `--version` and the
demo's self-check behave as the spec's command-line section says. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import wsproxy
from tests.integration.test_relay import ProxyProcess, Recorder, recording_echo
from tests.support import free_port, proxy_yaml, start_backend, watch_proxy_output

TIMEOUTS = "timeouts: {handshake: 1s, connect: 1s, close: 1s}\nshutdown: {drain_window: 500ms}\n"
EXIT_BOUND = 10.0  # seconds from a signal to the process's exit
ROOT = Path(wsproxy.__file__).resolve().parent.parent


def wsproxy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsproxy", *args]


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        wsproxy_cmd(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT
    )
    watch_proxy_output(lambda: result.stderr)
    return result


@pytest.fixture
def proxy_run(tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    """`wsproxy run` processes started by a test; any still alive afterwards are stopped."""
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=10)


def start_run(tmp_path: Path, yaml_text: str, started: list[ProxyProcess]) -> tuple[ProxyProcess, int]:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml_text)
    proc = ProxyProcess(path)
    started.append(proc)
    return proc, proc.wait_ready()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the process did not exit within {timeout}s") from None


# --------------------------------------------------------------------------------------------
# run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_serves_then_signal_closes_sessions_with_1001_and_exits_0(tmp_path, backends, proxy_run, sig) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proc, port = start_run(tmp_path, proxy_yaml([backends[0].port], extra=TIMEOUTS), proxy_run)
    with connect(f"ws://127.0.0.1:{port}/cli", proxy=None, open_timeout=5, close_timeout=5) as ws:
        ws.send("through the process")
        assert ws.recv(timeout=5) == "through the process"
        ws.send(b"\x00binary\xff")
        assert ws.recv(timeout=5) == b"\x00binary\xff"
        signalled = time.monotonic()
        proc.proc.send_signal(sig)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None, "the session was cut without a close frame"
    assert closed.value.rcvd.code == 1001
    assert wait_exit(proc.proc, EXIT_BOUND) == 0
    assert time.monotonic() - signalled < EXIT_BOUND
    assert rec.ended.wait(5)
    assert rec.close_code == 1001  # the backend hop was closed with 1001 too
    assert refused(port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_run_exits_0_promptly_on_signal(tmp_path, backends, proxy_run, sig) -> None:
    backends.append(start_backend())
    proc, port = start_run(tmp_path, proxy_yaml([backends[0].port], extra=TIMEOUTS), proxy_run)
    signalled = time.monotonic()
    proc.proc.send_signal(sig)
    assert wait_exit(proc.proc, EXIT_BOUND) == 0
    assert time.monotonic() - signalled < 3, "an idle proxy has nothing to drain"
    assert refused(port)


def test_run_drain_closes_listener_at_once_and_cuts_unanswering_session_at_deadline(
    tmp_path, backends, proxy_run
) -> None:
    backends.append(start_backend())
    yaml_text = proxy_yaml(
        [backends[0].port], extra="timeouts: {handshake: 1s, connect: 1s, close: 3s}\nshutdown: {deadline: 2s}\n"
    )
    proc, port = start_run(tmp_path, yaml_text, proxy_run)
    # a client that completes the handshake, then never reads or answers anything
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the proxy closed before answering the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101")
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "SIGTERM" not in "".join(proc.lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert proc.proc.poll() is None, "the process exited before the drain deadline"
    assert refused(port), "the listener still accepts connections while draining"
    assert wait_exit(proc.proc, EXIT_BOUND) == 0
    assert time.monotonic() - signalled < 6
    # the client got a close frame with 1001 before the proxy gave up on it
    sock.settimeout(2)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data[:1] == b"\x88", f"expected a close frame, got {data[:16]!r}"
    assert int.from_bytes(data[2:4], "big") == 1001


@pytest.mark.parametrize(
    ("yaml_text", "key_path"),
    [
        (
            "listeners:\n  - {address: 127.0.0.1:0, pool: chat}\n"
            "pools:\n  chat:\n    backends:\n      - address: 127.0.0.1:9001\n      - address: '9001'\n",
            "pools.chat.backends[1].address",
        ),
        (
            "listeners:\n  - {address: 127.0.0.1:0, pool: chat, adress: x}\n"
            "pools:\n  chat:\n    backends:\n      - address: 127.0.0.1:9001\n",
            "listeners[0].adress",
        ),
        (
            "listeners:\n  - {address: 127.0.0.1:0, pool: chat}\n"
            "pools:\n  chat:\n    backends:\n      - address: 127.0.0.1:9001\n"
            "timeouts:\n  connect: soon\n",
            "timeouts.connect",
        ),
        (
            "listeners:\n  - {address: 127.0.0.1:0, pool: nosuch}\n"
            "pools:\n  chat:\n    backends:\n      - address: 127.0.0.1:9001\n",
            "listeners[0].pool",
        ),
    ],
    ids=["bad-backend-address", "unknown-key", "bad-duration", "unknown-pool"],
)
@pytest.mark.parametrize("command", ["run", "check"])
def test_invalid_config_exits_2_naming_file_and_key_path(tmp_path, command, yaml_text, key_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml_text)
    result = run_cli(command, "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert key_path in result.stderr
    assert "broken.yaml" in result.stderr


@pytest.mark.parametrize("command", ["run", "check"])
def test_missing_config_file_exits_2_naming_it(tmp_path, command) -> None:
    result = run_cli(command, "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_check_reports_every_error_not_just_the_first(tmp_path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        "listeners:\n  - {address: 127.0.0.1:0, pool: chat, colour: blue}\n"
        "pools:\n  chat:\n    backends:\n      - address: nonsense\n"
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "listeners[0].colour" in result.stderr
    assert "pools.chat.backends[0].address" in result.stderr


def test_check_valid_config_exits_0_with_summary(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(proxy_yaml([9101, 9102]).replace("127.0.0.1:0", "127.0.0.1:18080"))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    for needle in ("127.0.0.1:18080", "127.0.0.1:9101", "127.0.0.1:9102", "p"):
        assert needle in result.stdout
    assert len(result.stdout.splitlines()) < 40  # one screen


def test_version_flag_prints_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"wsproxy {wsproxy.__version__}"


def test_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).parent / "wsproxy"
    assert script.is_file(), f"no console script at {script}: is wsproxy installed?"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout == run_cli("--version").stdout


# --------------------------------------------------------------------------------------------
# demo (on free ports, so it runs beside anything that holds the configured 8080/8443/9001/9002)


def demo_ports(output: str) -> list[int]:
    """Every port the demo printed: its listeners' and its backends'."""
    return sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)})


def test_demo_self_check_passes_and_shows_which_backend_answered(tmp_path) -> None:
    result = run_cli("demo", "--self-check-only", "--free-ports", "--certs", str(tmp_path / "certs"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-check passed" in result.stdout
    assert "demo-backend-1" in result.stdout
    assert "demo-backend-2" in result.stdout  # round robin: both backends answered
    assert result.stdout.count(" OK") == 4  # two sessions on ws://, two on wss://
    assert len(demo_ports(result.stdout)) == 4  # two listeners, two backends
    assert all(refused(port) for port in demo_ports(result.stdout))  # everything it started is stopped


def test_demo_makes_its_certificates_in_the_directory_given_and_tells_tls_clients_the_ca(tmp_path) -> None:
    certs = tmp_path / "my certs"
    result = run_cli("demo", "--self-check-only", "--free-ports", "--certs", str(certs), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    made = ["demo-ca.pem", "demo-cert.pem", "demo-effective.yaml", "demo-key.pem"]  # and the config it ran
    assert sorted(p.name for p in certs.iterdir()) == made
    assert f"TLS clients trust {certs / 'demo-ca.pem'}" in result.stdout
    assert (certs / "demo-key.pem").stat().st_mode & 0o077 == 0  # the key is the user's alone


def test_demo_certificates_default_to_the_users_cache_directory(tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run(
        wsproxy_cmd("demo", "--self-check-only", "--free-ports"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    watch_proxy_output(lambda: result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "cache" / "wsproxy" / "certs" / "demo-ca.pem").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing written where it ran


def test_demo_runs_the_checkouts_conf_demo_yaml(tmp_path) -> None:
    """conf/demo.yaml is the packaged config (one file), and `-c` takes it."""
    assert (ROOT / "conf" / "demo.yaml").read_bytes() == (ROOT / "wsproxy" / "data" / "demo.yaml").read_bytes()
    result = run_cli(
        "demo", "-c", "conf/demo.yaml", "--self-check-only", "--free-ports", "--certs", str(tmp_path), timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-check passed" in result.stdout


def test_run_on_the_demo_config_without_certificates_names_the_file_and_the_command_that_makes_them(
    tmp_path,
) -> None:
    """The demo config's TLS paths are relative, so `run` looks for them next to the file (for
    conf/demo.yaml, next to the file it links to: wsproxy/data/). Missing, the error names the file
    and the command that makes them; made there, the same file runs as it is."""
    config = tmp_path / "demo.yaml"
    config.write_text((ROOT / "conf" / "demo.yaml").read_text())
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert f"listeners[1].tls.cert: no such file: {tmp_path / 'demo-cert.pem'}" in result.stderr
    assert "`wsproxy demo --certs DIR` makes development certificates" in result.stderr
    made = run_cli("demo", "--self-check-only", "--free-ports", "--certs", str(tmp_path), timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    checked = run_cli("check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr


def test_demo_on_a_port_in_use_exits_1_with_one_clear_line(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        text = (ROOT / "wsproxy" / "data" / "demo.yaml").read_text()
        text = text.replace(":8080", f":{busy.getsockname()[1]}")
        for fixed in (":8443", ":9001", ":9002"):
            text = text.replace(fixed, f":{free_port()}")
        (tmp_path / "demo.yaml").write_text(text)
        result = run_cli("demo", "-c", str(tmp_path / "demo.yaml"), "--self-check-only", "--certs", str(tmp_path))
    assert result.returncode == 1
    assert "demo: cannot start: " in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def running_demo(*args: str) -> Iterator[tuple[subprocess.Popen[str], Callable[[], str]]]:
    """`wsproxy demo ARGS` serving (its self-check passed): the process and its output so far.
    Killed and reaped at the end if the test did not stop it."""
    proc = subprocess.Popen(
        wsproxy_cmd("demo", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader: threading.Thread | None = None
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        watch_proxy_output(lambda: "".join(lines))
        deadline = time.monotonic() + 30
        while "TLS clients trust the dev CA" not in "".join(lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "self-check passed" in "".join(lines), "".join(lines)
        yield proc, lambda: "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if reader is not None:
            reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_demo_serves_until_sigint_then_stops_everything(tmp_path) -> None:
    with running_demo("--free-ports", "--certs", str(tmp_path)) as (proc, output):
        out = output()
        urls = re.findall(r"^  (wss?)://(localhost|127\.0\.0\.1):(\d+)/ ", out, re.MULTILINE)
        assert [(scheme, host) for scheme, host, _ in urls] == [("ws", "127.0.0.1"), ("wss", "localhost")], out
        with connect(f"ws://127.0.0.1:{urls[0][2]}/", proxy=None, open_timeout=5) as ws:
            ws.send("/whoami")
            assert ws.recv(timeout=5).startswith("demo-backend-")
        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, EXIT_BOUND) == 0
    assert all(refused(port) for port in demo_ports(output()))


def test_sighup_to_the_demo_reloads_the_config_file_it_runs(tmp_path) -> None:
    """The demo runs from DIR/demo-effective.yaml (the packaged config, TLS paths absolute in the
    certificate directory, the ports it chose), private to the user; SIGHUP re-reads that file as
    it does for `run`: a listener added to it serves."""
    effective = tmp_path / "demo-effective.yaml"
    with running_demo("--free-ports", "--certs", str(tmp_path), "--log-level", "info") as (proc, output):
        assert f"config: {effective}" in output()
        assert effective.stat().st_mode & 0o077 == 0
        raw = yaml.safe_load(effective.read_text())
        tls = {"cert": str(tmp_path / "demo-cert.pem"), "key": str(tmp_path / "demo-key.pem")}
        assert raw["listeners"][1]["tls"] == tls
        added = free_port()
        raw["listeners"].append({"address": f"127.0.0.1:{added}", "pool": "chat"})
        effective.write_text(yaml.safe_dump(raw))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while refused(added) and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(f"ws://127.0.0.1:{added}/", proxy=None, open_timeout=5) as ws:
            ws.send("/whoami")
            assert ws.recv(timeout=5).startswith("demo-backend-")
        assert re.search(rf"reloaded {re.escape(str(effective))} ", output()), output()
        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, EXIT_BOUND) == 0


def test_python_m_wsproxy_cli_is_the_same_command(tmp_path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "wsproxy.cli", "--version"], capture_output=True, text=True, timeout=20
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout == run_cli("--version").stdout
    # `run` with a pid file uses what cli.py defines below main(): all of it is there under -m
    pid_file = tmp_path / "wsproxy.pid"
    path = tmp_path / "proxy.yaml"
    path.write_text(proxy_yaml([9], extra=TIMEOUTS) + f"pid_file: {pid_file}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsproxy.cli", "run", "-c", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, EXIT_BOUND) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    watch_proxy_output(lambda: err)
    assert not pid_file.exists()


@pytest.mark.expect_errors(r"ERROR wsproxy: cannot start: .*in use")
def test_run_on_a_port_in_use_exits_1_with_one_clear_line(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(proxy_yaml([9]).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_reload_as_soon_as_the_pid_file_exists_does_not_kill_the_proxy(tmp_path, backends, proxy_run) -> None:
    """systemd's ExecReload may fire right after start: the pid file must not name a process that a
    SIGHUP would still kill (the default action) because its signal receiver is not up yet."""
    backends.append(start_backend())
    path = tmp_path / "proxy.yaml"
    pid_file = tmp_path / "wsproxy.pid"
    path.write_text(proxy_yaml([backends[0].port], extra=TIMEOUTS + f"pid_file: {pid_file}\n"))
    proc = ProxyProcess(path)
    proxy_run.append(proc)
    deadline = time.monotonic() + 15
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(int(pid_file.read_text()), signal.SIGHUP)
    proc.wait_ready()
    time.sleep(0.2)
    assert proc.proc.poll() is None


def test_a_second_signal_during_the_drain_stops_at_once(tmp_path, backends, proxy_run) -> None:
    backends.append(start_backend())
    slow_drain = "timeouts: {handshake: 1s, connect: 1s, close: 1s}\nshutdown: {drain_window: 20s, deadline: 30s}\n"
    proc, port = start_run(tmp_path, proxy_yaml([backends[0].port], extra=slow_drain), proxy_run)
    sessions = [connect(f"ws://127.0.0.1:{port}/s{i}", proxy=None, open_timeout=5) for i in range(20)]
    try:
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while "draining" not in "".join(proc.lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert proc.proc.poll() is None, "20 sessions over a 20 s window cannot have drained yet"
        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        wait_exit(proc.proc, 5)
        assert time.monotonic() - signalled < 3
        assert "stopping now" in "".join(proc.lines)
    finally:
        for ws in sessions:
            ws.close_socket()
