"""Active health checks: one trio task per watched backend, and the monitor that owns them.

Each task probes its backend every `interval` (jittered, so backends checked together drift
apart) with a tcp connect, an HTTP GET that must answer 2xx, or a real WebSocket handshake
(fresh key, Sec-WebSocket-Accept verified, then a clean close 1000), each bounded by `timeout`,
and feeds the result to the backend's pure state machine (health.py). The `HealthMonitor` is
owned by the server; `sync(snapshot)` starts tasks for backends it does not watch yet and
cancels those of backends no longer present, each in its own cancel scope, so a reload keeps
the checks (and the health) of the backends it keeps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from wsproxy.config import ActiveHealth, Address, PoolConfig, defaults
from wsproxy.policy.balancing import Backend
from wsproxy.policy.health import DOWN, Change, jittered
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol import handshake, http_head
from wsproxy.protocol.handshake import Rejection
from wsproxy.protocol.relay import NORMAL
from wsproxy.runtime.backend_tls import BackendContexts, ClientTLS, open_stream
from wsproxy.runtime.upstream import LocalResourceError, UpstreamError, request_upgrade
from wsproxy.runtime.watch_host import WatchHost

log = logging.getLogger("wsproxy.health")

RECEIVE_SIZE = 4096  # a probe reads small answers; big ones just take more reads, within the timeout
USER_AGENT = b"wsproxy-health-check"

Probe = Callable[[Address, ActiveHealth, ClientTLS | None], Awaitable[str | None]]


async def probe(address: Address, check: ActiveHealth, tls: ClientTLS | None = None) -> str | None:
    """Run one check within `check.timeout` (over TLS when the backend's pool says so, with the
    same settings as real sessions): None if it passed, else why it failed. Raises
    LocalResourceError when the proxy itself lacked the means to check (no verdict at all)."""
    with trio.move_on_after(check.timeout):
        try:
            return await PROBES[check.check](address, check, tls)
        except UpstreamError as exc:
            return exc.reason
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"{check.check} check: connection failed: {exc}"
        except (h11.ProtocolError, ProtocolError) as exc:
            return f"{check.check} check: protocol error: {exc}"
    return f"{check.check} check: no answer within {check.timeout:g}s"


async def _tcp(address: Address, check: ActiveHealth, tls: ClientTLS | None) -> str | None:
    stream = await open_stream(address, tls=tls, timeout=check.timeout)  # TLS: the handshake must pass too
    await trio.aclose_forcefully(stream)
    return None


def _request(address: Address, path: str, extra: list[tuple[bytes, bytes]]) -> bytes:
    headers = [(b"Host", str(address).encode()), (b"User-Agent", USER_AGENT), *extra]
    return http_head.encode_request(b"GET", path.encode(), headers)


async def _http(address: Address, check: ActiveHealth, tls: ClientTLS | None) -> str | None:
    stream = await open_stream(address, tls=tls, timeout=check.timeout)
    try:
        answer = await request_upgrade(
            stream,
            _request(address, check.path, [(b"Connection", b"close")]),
            upgrade=False,
            max_header_bytes=defaults.MAX_HEADER_BYTES,
            receive_size=RECEIVE_SIZE,
        )
    finally:
        await trio.aclose_forcefully(stream)
    status = answer.response.status_code
    return None if 200 <= status < 300 else f"http check: GET {check.path} answered {status}"


async def _websocket(address: Address, check: ActiveHealth, tls: ClientTLS | None) -> str | None:
    stream = await open_stream(address, tls=tls, timeout=check.timeout)
    try:
        key = handshake.new_key()
        upgrade = [
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", key),
            (b"Sec-WebSocket-Version", b"13"),
        ]
        answer = await request_upgrade(
            stream,
            _request(address, check.path, upgrade),
            max_header_bytes=defaults.MAX_HEADER_BYTES,
            receive_size=RECEIVE_SIZE,
        )
        response = answer.response
        if isinstance(response, h11.Response):
            return f"websocket check: {check.path} answered {response.status_code}, not 101"
        checked = handshake.check_backend_101(response, key=key, offered_subprotocols=(), offered_extensions=False)
        if isinstance(checked, Rejection):
            return f"websocket check: {checked.reason}"
        ws = Connection(ConnectionType.CLIENT, trailing_data=answer.trailing)
        await stream.send_all(ws.send(CloseConnection(code=NORMAL, reason="health check")))
        while True:
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    # wsproto reports bytes it cannot parse as a close of its own (1002/1007):
                    # only a well-formed close frame from the backend is a pass
                    if event.code in (CloseReason.PROTOCOL_ERROR, CloseReason.INVALID_FRAME_PAYLOAD_DATA):
                        return f"websocket check: the backend answered our close with invalid frames ({event.reason})"
                    return None
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return "websocket check: the backend dropped the connection instead of answering our close"
            ws.receive_data(data)
    finally:
        await trio.aclose_forcefully(stream)


PROBES: dict[str, Probe] = {"tcp": _tcp, "http": _http, "websocket": _websocket}


@dataclass(eq=False)
class _Watch:
    backend: Backend
    pool: PoolConfig  # the pool's current settings (a reload may change them)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class HealthMonitor(WatchHost[Backend, _Watch, Snapshot]):
    """The active checks of every backend in pools with `health`; owned by the server."""

    def __init__(
        self,
        *,
        on_down: Callable[[Backend, PoolConfig], None] | None = None,
        on_shortage: Callable[[LocalResourceError], None] | None = None,
        rng: random.Random | None = None,
        tls: BackendContexts | None = None,
    ) -> None:
        super().__init__()
        self._on_down = on_down
        self._tls = tls if tls is not None else BackendContexts()  # the server's: checks speak TLS as sessions do
        self._on_shortage = on_shortage  # a check the proxy could not run for want of its own resources
        self._rng = rng if rng is not None else random.Random()

    @property
    def watching(self) -> frozenset[Backend]:
        return frozenset(self._watches)

    def _resync(self, snapshot: Snapshot, nursery: trio.Nursery) -> None:
        """Watch exactly the backends of `snapshot`'s pools that have active checks."""
        wanted: dict[Backend, PoolConfig] = {}
        for pool in snapshot.pools.values():
            if pool.config.health is not None:
                for backend in pool.backends:
                    wanted[backend] = pool.config
        for backend in [b for b in self._watches if b not in wanted]:
            self._watches.pop(backend).scope.cancel()
        for backend, pool_config in wanted.items():
            watch = self._watches.get(backend)
            if watch is not None:
                watch.pool = pool_config
                continue
            watch = self._watches[backend] = _Watch(backend, pool_config)
            name = f"health check {pool_config.name} {backend.name}"
            nursery.start_soon(self._check_loop, watch, name=name)

    async def _check_loop(self, watch: _Watch) -> None:
        backend = watch.backend
        with watch.scope:
            settings = watch.pool.health
            if settings is None:
                return
            # The first check at a random point of the first interval: a proxy (or a reload)
            # that starts many checks at once does not fire them in lockstep.
            await trio.sleep(settings.interval * self._rng.random())
            while True:
                settings = watch.pool.health
                if settings is None:
                    return
                try:
                    reason = await probe(backend.address, settings, self._tls.target(watch.pool, backend.config))
                except UpstreamError as exc:  # its TLS settings do not load: sessions could not reach it either
                    reason = exc.reason
                except LocalResourceError as exc:  # the proxy's shortage says nothing about the backend
                    if self._on_shortage is not None:
                        self._on_shortage(exc)
                    await trio.sleep(jittered(settings.interval, self._rng.random()))
                    continue
                now = trio.current_time()
                if reason is None:
                    change = backend.health.check_passed(now)
                else:
                    log.debug("backend %s (pool %s): check failed: %s", backend.name, watch.pool.name, reason)
                    change = backend.health.check_failed(now, reason)
                if change is not None:
                    self._changed(watch, change)
                await trio.sleep(jittered(settings.interval, self._rng.random()))

    def _changed(self, watch: _Watch, change: Change) -> None:
        backend, pool = watch.backend, watch.pool
        if change.state == DOWN:
            log.warning("backend %s (pool %s) is DOWN: %s", backend.name, pool.name, change.reason)
            if pool.close_sessions_on_down and self._on_down is not None:
                self._on_down(backend, pool)
            return
        ramp = pool.health.slow_start if pool.health is not None else None
        note = f"; weight ramps up over {ramp:g}s" if ramp else ""
        log.info("backend %s (pool %s) is UP: %s%s", backend.name, pool.name, change.reason, note)
