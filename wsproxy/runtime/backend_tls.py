"""TLS to backends: the client contexts built from `pools.NAME.tls` (or wss:// addresses), and
opening a backend connection with the TLS handshake done.

A TLS backend connection is a client-side streams.FastTLSStream: OpenSSL on the non-blocking
socket the upstream connect made, so the relay's readiness loop gets a handshaken `ssl.SSLSocket`
and link.py drives it as it drives a TLS client. Contexts are
built once per distinct `BackendTLS` setting, at start and again on every reload (renewed CA or
client certificate files are picked up); `verify: false` is logged as a warning each time.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from wsproxy.config import Address, BackendConfig, BackendTLS, Config, PoolConfig
from wsproxy.runtime.streams import FastTLSStream, Stream
from wsproxy.runtime.upstream import UpstreamError, connect

log = logging.getLogger("wsproxy.backend_tls")

BackendStream = Stream  # a backend connection: FastSocketStream, or FastTLSStream (client side)


def client_context(spec: BackendTLS) -> ssl.SSLContext:
    """A client context for `spec`: TLS 1.2 minimum, ALPN http/1.1, the CA file (or the system's
    trust store), hostname checks unless `verify: false`, a client certificate for mutual TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec.ca) if spec.ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not spec.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert is not None and spec.key is not None:
        ctx.load_cert_chain(str(spec.cert), str(spec.key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What one backend connection needs: the context and the name SNI and the check use."""

    context: ssl.SSLContext
    server_name: str


def specs(config: Config) -> Iterable[tuple[str, BackendTLS]]:
    """(pool name, settings) of every pool with a TLS backend."""
    for pool in config.pools.values():
        seen: set[BackendTLS] = set()
        for backend in pool.backends:
            spec = pool.backend_tls(backend)
            if spec is not None and spec not in seen:
                seen.add(spec)
                yield pool.name, spec


class BackendContexts:
    """The client TLS contexts of the running config, by setting (owned by the server)."""

    __slots__ = ("_contexts",)

    def __init__(self) -> None:
        self._contexts: dict[BackendTLS, ssl.SSLContext] = {}

    def load(self, config: Config) -> None:
        """Build every context `config` needs (raises OSError/ssl.SSLError when a file does not
        load: the caller refuses the config). The swap happens only once all are built."""
        built: dict[BackendTLS, ssl.SSLContext] = {}
        for pool, spec in specs(config):
            if spec not in built:
                built[spec] = client_context(spec)
            if not spec.verify:
                log.warning("pool %s: TLS to its backends does not verify their certificates (verify: false)", pool)
        self._contexts = built

    def replace(self, other: BackendContexts) -> None:
        """Take over the contexts `other` loaded (a reload, after every file loaded)."""
        self._contexts = other._contexts

    def target(self, pool: PoolConfig, backend: BackendConfig) -> ClientTLS | None:
        """The TLS settings for one backend of `pool`, or None for plain TCP. Raises UpstreamError
        when a context built late (for a session of an older snapshot) cannot load its files."""
        spec = pool.backend_tls(backend)
        if spec is None:
            return None
        ctx = self._contexts.get(spec)
        if ctx is None:  # a session of an older snapshot, after a reload changed the setting
            try:
                ctx = self._contexts[spec] = client_context(spec)
            except (OSError, ValueError) as exc:  # ssl.SSLError included: a CA or key file changed on disk
                raise UpstreamError(f"TLS settings for {backend.address} cannot be loaded: {exc}") from None
        return ClientTLS(ctx, spec.server_name or backend.address.host)


async def open_stream(address: Address, *, tls: ClientTLS | None, timeout: float) -> BackendStream:
    """Connect to a backend and, for TLS, complete the handshake, all within `timeout`. A
    failure (refused, timed out, a certificate that does not verify) raises UpstreamError."""
    deadline = trio.current_time() + timeout
    stream = await connect(address, timeout)
    if tls is None:
        return stream
    try:
        wrapped = FastTLSStream(stream.socket, tls.context, server_hostname=tls.server_name)  # owns the socket now
    except (OSError, ValueError) as exc:  # ssl.SSLError included; ValueError: a server_name OpenSSL refuses
        stream.close_now()
        raise UpstreamError(f"TLS with {address} could not start: {exc}") from None
    with trio.move_on_after(deadline - trio.current_time()) as scope:
        try:
            await wrapped.handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            wrapped.close_now()
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise UpstreamError(f"TLS handshake with {address} failed: {cause}") from None
    if scope.cancelled_caught:
        wrapped.close_now()
        raise UpstreamError(f"TLS handshake with {address} timed out after {timeout:g}s", timeout=True)
    return wrapped
