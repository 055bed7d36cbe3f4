"""`wsproxy demo`: two echo backends, the proxy on the packaged demo config (wsproxy/data/demo.yaml),
a self-check, then serve.

The demo backends echo every message and answer the text "/whoami" with their name, so the
self-check can show which backend served each session. Everything the demo starts lives in one
nursery and stops on Ctrl-C.

The proxy runs from a file the demo writes into the certificate directory, demo-effective.yaml
(TLS paths absolute, the ports it chose), loaded by the one config loader: SIGHUP reloads that file
as it does the file of `wsproxy run`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import ssl
import sys
from importlib import resources
from pathlib import Path

import trio
import yaml
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from wsproxy.config import Address, Config, ConfigError, ListenerConfig, PoolConfig, load_config, parse_config
from wsproxy.runtime import supervisor
from wsproxy.runtime.devcerts import default_certs_dir, ensure_dev_certs
from wsproxy.runtime.server import Server

log = logging.getLogger("wsproxy.demo")

EFFECTIVE_CONFIG = "demo-effective.yaml"  # in the certificate directory: the config the demo runs and reloads


async def _demo_backend_conn(stream: trio.SocketStream, name: str) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    text_parts: list[str] = []
    bin_parts: list[bytes] = []
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            ws.receive_data(data or None)
            out = b""
            for event in ws.events():
                if isinstance(event, Request):
                    out += ws.send(AcceptConnection())
                elif isinstance(event, TextMessage):
                    text_parts.append(event.data)
                    if event.message_finished:
                        msg = "".join(text_parts)
                        text_parts.clear()
                        out += ws.send(TextMessage(data=name if msg == "/whoami" else msg))
                elif isinstance(event, BytesMessage):
                    bin_parts.append(bytes(event.data))
                    if event.message_finished:
                        out += ws.send(BytesMessage(data=b"".join(bin_parts)))
                        bin_parts.clear()
                elif isinstance(event, Ping | CloseConnection) and _should_answer(ws, event):
                    out += ws.send(event.response())
            try:
                if out:
                    await stream.send_all(out)
            except trio.BrokenResourceError:
                return
            if not data or ws.state.name == "CLOSED":
                return


def _should_answer(ws: WSConnection, event: Event) -> bool:
    """Pings always get a pong; a close gets one only if the peer started the closing handshake."""
    return isinstance(event, Ping) or ws.state.name == "REMOTE_CLOSING"


async def demo_backend(
    host: str,
    port: int,
    name: str,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """An echo backend on host:port; "/whoami" answers with `name`."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_demo_backend(listeners, name, task_status=task_status)


async def serve_demo_backend(
    listeners: list[trio.SocketListener],
    name: str,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The echo backend on listeners already open."""

    async def handler(stream: trio.SocketStream) -> None:
        await _demo_backend_conn(stream, name)

    await trio.serve_listeners(handler, listeners, task_status=task_status)


class DemoClient:
    """A small wsproto client for the self-check (not a general-purpose client)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str = "/",
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> DemoClient:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
        client = cls(stream)
        await stream.send_all(client.ws.send(Request(host=server_hostname or host, target=path)))
        event = await client.next_event()
        if isinstance(event, RejectConnection):
            raise ConnectionError(f"rejected with HTTP {event.status_code}")
        if not isinstance(event, AcceptConnection):
            raise ConnectionError(f"unexpected {event!r}")
        return client

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) if data else None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def receive_text(self) -> str:
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
            elif isinstance(event, CloseConnection):
                raise ConnectionError(f"closed {event.code} {event.reason}")

    async def close(self, code: int = 1000) -> int:
        await self.stream.send_all(self.ws.send(CloseConnection(code=code)))
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                await self.stream.aclose()
                return int(event.code)


async def self_check(listeners: list[tuple[ListenerConfig, Address]], ca_path: Path) -> bool:
    """Round-trip messages through every listener (at the address it is bound to); print which
    backend answered."""
    ok = True
    ctx = ssl.create_default_context(cafile=str(ca_path))
    for lst, address in listeners:
        scheme = lst.scheme
        for i in range(2):
            try:
                with trio.fail_after(10):
                    client = await DemoClient.connect(
                        address.host,
                        address.port,
                        "/demo",
                        ssl_context=ctx if lst.tls else None,
                        server_hostname="localhost" if lst.tls else None,
                    )
                    msg = f"hello #{i + 1} over {scheme}"
                    await client.send_text(msg)
                    echoed = await client.receive_text()
                    await client.send_text("/whoami")
                    who = await client.receive_text()
                    code = await client.close()
                good = echoed == msg and code == 1000
                ok &= good
                print(
                    f"  {scheme}://{address}/demo  sent {msg!r}  echoed {echoed!r}  by {who}  "
                    f"close {code}  {'OK' if good else 'FAILED'}"
                )
            except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                ok = False
                print(f"  {scheme}://{address}/demo  FAILED: {exc!r}")
    return ok


async def _proxy_then_stop(
    config: Config,
    config_path: Path,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy (SIGHUP reloads `config_path`); when it stops (Ctrl-C drained it), stop the
    demo backends too."""
    await supervisor.run(config, config_path, task_status=task_status)
    scope.cancel()


def _on_port(address: Address, port: int) -> Address:
    return dataclasses.replace(address, port=port)


async def _open_backends(pool: PoolConfig, *, free_ports: bool) -> list[list[trio.SocketListener]]:
    """The demo backends' sockets, one list per backend of `pool` (port 0 with free_ports)."""
    opened: list[list[trio.SocketListener]] = []
    try:
        for backend in pool.backends:
            port = 0 if free_ports else backend.address.port
            opened.append(await trio.open_tcp_listeners(port, host=backend.address.host))
    except OSError:
        for sockets in opened:
            for sock in sockets:
                await sock.aclose()
        raise
    return opened


def effective_config_text(text: str, config: Config, *, pool: PoolConfig, free_ports: bool, origin: str) -> str:
    """The demo's config as a file of its own: `text` (already validated as `config`) with every
    file path absolute (TLS paths as resolved in the certificate directory, pid_file), the first
    pool's backends where the demo backends listen, and, with free_ports, listeners on port 0 (a
    reload keeps a port-0 listener's socket, so the file stays true while the demo runs)."""
    raw = yaml.safe_load(text)
    for lst, raw_lst in zip(config.listeners, raw["listeners"], strict=True):
        if lst.tls is not None:
            raw_lst["tls"] = {"cert": str(lst.tls.cert), "key": str(lst.tls.key)}
        if free_ports:
            raw_lst["address"] = str(_on_port(lst.address, 0))
    raw_backends = raw["pools"][pool.name]["backends"]
    for i, backend in enumerate(pool.backends):
        if isinstance(raw_backends[i], dict):
            raw_backends[i]["address"] = str(backend.address)
        else:
            raw_backends[i] = str(backend.address)
    if config.pid_file is not None:
        raw["pid_file"] = str(config.pid_file)
    header = (
        f"# Written by `wsproxy demo` from {origin}:\n"
        "# TLS paths in its certificate directory, the ports it chose. The running demo serves this\n"
        "# file and reloads it on SIGHUP (edit it, then kill -HUP the demo).\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False)


def write_private_file(path: Path, text: str) -> None:
    """Written whole (mode 0600), then renamed over `path`: never half written, never through a link."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


async def _demo(
    text: str, config: Config, certs_dir: Path, ca_path: Path, *, self_check_only: bool, free_ports: bool
) -> bool:
    # The demo backends serve the first pool; with free_ports the system picks their ports and the
    # listeners'. What runs is the effective config the demo writes into the certificate directory
    # and loads like any other file, so that SIGHUP reloads it as it does for `wsproxy run`.
    pool = config.pools[next(iter(config.pools))]
    backend_sockets = await _open_backends(pool, free_ports=free_ports)
    backends = tuple(
        dataclasses.replace(b, address=_on_port(b.address, sockets[0].socket.getsockname()[1]))
        for b, sockets in zip(pool.backends, backend_sockets, strict=True)
    )
    pool = dataclasses.replace(pool, backends=backends)
    effective = certs_dir / EFFECTIVE_CONFIG
    write_private_file(
        effective, effective_config_text(text, config, pool=pool, free_ports=free_ports, origin=config.source)
    )
    config = load_config(effective)
    async with trio.open_nursery() as nursery:
        for i, (backend, sockets) in enumerate(zip(backends, backend_sockets, strict=True), start=1):
            await nursery.start(serve_demo_backend, sockets, f"demo-backend-{i} ({backend.address})")
        server = await nursery.start(_proxy_then_stop, config, effective, nursery.cancel_scope)
        listeners = [(lst, Address(host, port)) for lst, (host, port, *_) in server.bound]
        print("self-check through the proxy:")
        ok = await self_check(listeners, ca_path)
        print("self-check", "passed" if ok else "FAILED")
        if self_check_only or not ok:
            nursery.cancel_scope.cancel()
            return ok
        print("\nTry it (Ctrl-C stops the proxy and the demo backends):")
        for lst, address in listeners:
            host = "localhost" if lst.tls else address.host
            print(f"  {lst.scheme}://{host}:{address.port}/   (send /whoami to see the backend)")
        print(f"  config: {effective} (edit it, then `kill -HUP {os.getpid()}` reloads it)")
        print(f"  TLS clients trust the dev CA: {ca_path}")
        print(f"  e.g. python -m websockets ws://{listeners[0][1]}/")
    return True


def read_demo_source(config_path: Path | None) -> tuple[str, str]:
    """The text of the packaged demo config, or of the file given, and its name for messages."""
    if config_path is None:
        source = "wsproxy/data/demo.yaml (packaged)"
        return resources.files("wsproxy").joinpath("data", "demo.yaml").read_text(encoding="utf-8"), source
    try:
        return config_path.read_text(encoding="utf-8"), str(config_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(config_path), [("", f"cannot read the file: {exc}")]) from None


def main(
    config_path: str | None, *, certs_dir: str | None = None, self_check_only: bool = False, free_ports: bool = False
) -> int:
    certs = (Path(certs_dir) if certs_dir else default_certs_dir()).absolute()
    try:
        ca_path, _, _ = ensure_dev_certs(certs)
    except OSError as exc:
        print(f"demo: cannot write the development certificates to {certs}: {exc}", file=sys.stderr)
        return 1
    print(f"development certificates in {certs} (TLS clients trust {ca_path})")
    try:
        # relative TLS paths name files in the certificate directory
        text, source = read_demo_source(Path(config_path) if config_path else None)
        config = parse_config(text, source=source, base_dir=certs)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    try:
        ok = trio.run(
            functools.partial(
                _demo, text, config, certs, ca_path, self_check_only=self_check_only, free_ports=free_ports
            )
        )
    except ConfigError as exc:  # the effective config, reread (a certificate removed meanwhile)
        print(exc.render(), file=sys.stderr)
        return 2
    except (OSError, BaseExceptionGroup) as exc:  # trio wraps startup errors (a port in use) in a group
        errors = supervisor.startup_errors(exc)
        if errors is None:
            raise
        for err in errors:
            print(f"demo: cannot start: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0 if ok else 1
