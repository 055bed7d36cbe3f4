"""Test support for a fleet: a real redis-server and a real dnsmasq, each started by the test on a
free loopback port and stopped by its PID (never the system services).

dnsmasq serves a hosts file (`--addn-hosts`) that the test rewrites and re-reads on SIGHUP, and
SRV records from `--srv-host` lines in a conf file, which dnsmasq reads only at start: an SRV
change restarts that dnsmasq (same port). Answers carry TTL 0 (`--local-ttl=0`), so wsproxy asks
again after its configured interval.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.support import free_port

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
START_TIMEOUT = 10.0


def _wait(predicate, what: str, proc: subprocess.Popen) -> None:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not answer within {START_TIMEOUT}s")


class RedisProcess:
    """redis-server on 127.0.0.1:port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: self.command("PING") == "PONG", f"redis-server on port {self.port}", self.proc)
        return self

    def command(self, *args: str) -> str:
        """One command over RESP; the reply as text (arrays: one line per element)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                out = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
                sock.sendall(out.encode())
                reader = sock.makefile("rb")
                return _read_reply(reader)
        except OSError:
            return ""

    def hgetall(self, key: str) -> dict[str, int]:
        lines = self.command("HGETALL", key).splitlines()
        return {lines[i]: int(lines[i + 1]) for i in range(0, len(lines) - 1, 2)}

    def kill(self) -> None:
        """Gone at once, as a crash: SIGKILL by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    stop = kill


def _read_reply(reader) -> str:  # type: ignore[no-untyped-def]
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:].decode()
    if kind in (b"+", b"-", b":"):
        return rest
    if kind == b"$":
        n = int(rest)
        return "" if n < 0 else reader.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return "\n".join(_read_reply(reader) for _ in range(max(n, 0)))
    return rest


class Dnsmasq:
    """dnsmasq answering only from files in `directory`, on 127.0.0.1:port (UDP and TCP)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.hosts = directory / "hosts"
        self.conf = directory / "dnsmasq.conf"
        self.hosts.write_text("")
        self.conf.write_text("")
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_hosts(self, names: dict[str, list[str]]) -> None:
        """The A/AAAA answers: name -> addresses (takes effect on `reload`)."""
        lines = [f"{ip} {name}" for name, ips in names.items() for ip in ips]
        self.hosts.write_text("\n".join(lines) + "\n")

    def set_srv(self, name: str, targets: list[tuple[str, int, int, int]]) -> None:
        """SRV answers for `name`: (target, port, priority, weight) each (takes effect on `restart`)."""
        self.conf.write_text("".join(f"srv-host={name},{t},{port},{prio},{w}\n" for t, port, prio, w in targets))

    def start(self) -> Dnsmasq:
        self.proc = subprocess.Popen(
            [
                DNSMASQ,
                "-k",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts}",
                f"--conf-file={self.conf}",
                "--local-ttl=0",
                "--user=root",
                "--pid-file=",
                f"--log-facility={self.dir / 'dnsmasq.log'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(self._answers, f"dnsmasq on port {self.port}", self.proc)
        return self

    def _answers(self) -> bool:
        try:
            dns.query.udp(dns.message.make_query("probe.invalid", "A"), "127.0.0.1", timeout=0.2, port=self.port)
        except (OSError, dns.exception.DNSException):
            return False
        return True

    def reload(self) -> None:
        """Re-read the hosts file (SIGHUP by PID)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start again on the same port (SRV lines are read only at start)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
