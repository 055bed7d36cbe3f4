"""What a listener needs before it accepts: its TLS context and its sockets, with errors that say
which listener, which address and which file.

`run`, a reload and `wsproxy check` load certificates through the same `server_ssl_context` (and
the backends' TLS files through backend_tls.client_context), so
`check` refuses what `run` would (a file that is not PEM, a key that does not match its
certificate, an encrypted key), and the message names the listener and both paths instead of
OpenSSL's `[SSL] PEM lib (_ssl.c:3905)`. A port in use says which address.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

import trio

from wsproxy.config import Address, CertKey, Config, ListenerConfig
from wsproxy.runtime import backend_tls, listener_tls
from wsproxy.runtime.streams import tune_tcp


class ListenError(OSError):
    """A listener that cannot be opened: `where` (listener and address) and `detail` (file, why)."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.detail = detail


def listener_label(config: Config, listener: ListenerConfig) -> str:
    """`listeners[1] 127.0.0.1:8443`: the key path and the address of a listener."""
    for i, lst in enumerate(config.listeners):
        if lst is listener or lst == listener:
            return f"listeners[{i}] {listener.address}"
    return f"listener {listener.address}"


def _no_password() -> bytes:
    """A key that needs a password fails to load, instead of OpenSSL asking on the terminal."""
    return b""


def server_ssl_context(listener: ListenerConfig, label: str | None = None) -> ssl.SSLContext:
    """A TLS context for a listener: TLS 1.2 minimum, ALPN http/1.1 only, the certificate chosen
    by SNI when there are several (listener_tls.py). Built once per listener and again on reload
    (so renewed cert files on disk are picked up). Raises ListenError."""
    assert listener.tls is not None
    where = label or f"listener {listener.address}"
    contexts = [_certificate_context(pair, where) for pair in listener.tls.certs]
    if len(contexts) == 1:
        return contexts[0]
    names = []
    for pair in listener.tls.certs:
        try:
            names.append(listener_tls.certificate_names(pair.cert))
        except (ValueError, OSError) as exc:  # loaded by OpenSSL, yet not one cryptography reads (or gone)
            raise ListenError(where, f"cannot read the names certificate {pair.cert} covers: {exc}") from None
    return listener_tls.choose_by_sni(contexts, names)


def _certificate_context(pair: CertKey, where: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(pair.cert), str(pair.key), password=_no_password)
    except OSError as exc:  # ssl.SSLError included
        why = _tls_reason(exc, str(pair.cert))
        raise ListenError(where, f"cannot load TLS certificate {pair.cert} with key {pair.key}: {why}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _tls_reason(exc: OSError, cert: str) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if not isinstance(exc, ssl.SSLError):
        return exc.strerror or str(exc)
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except (OSError, ValueError):
        return f"{cert} holds no PEM certificate"
    return "the key file holds no PEM private key, or the key is encrypted (give an unencrypted key)"


def tls_problems(config: Config) -> list[tuple[str, str]]:
    """(key path, message) for every listener whose certificates and keys do not load, and every
    pool whose TLS files for its backends do not (backend_tls.py), as `run` would load them: what
    `wsproxy check` reports."""
    problems = []
    for i, lst in enumerate(config.listeners):
        if lst.tls is None:
            continue
        try:
            server_ssl_context(lst, f"listeners[{i}] {lst.address}")
        except ListenError as exc:
            problems.append((f"listeners[{i}].tls", exc.detail))
    for pool, spec in backend_tls.specs(config):
        try:
            backend_tls.client_context(spec)
        except OSError as exc:  # ssl.SSLError included
            problems.append((f"pools.{pool}.tls", f"cannot load the TLS files for its backends: {exc}"))
    return problems


async def open_sockets(address: Address, *, label: str, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """Listening stdlib sockets (non-blocking), one per address the host resolves to, so the
    server owns every connection's socket from accept on; ListenError names the listener when one
    cannot be bound (and closes those already open). `backlog`: the kernel's accept queue."""
    try:
        if reuse_port:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            return [_listening_socket(family, (address.host, address.port), reuse_port=True, backlog=backlog)]
        host = address.host or None
        infos = await trio.socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(label, f"cannot listen on {address}: {exc.strerror or exc}") from None
    opened: list[socket.socket] = []
    try:
        for family, _, _, _, sockaddr in dict.fromkeys((i[0], i[1], i[2], i[3], i[4]) for i in infos):
            opened.append(_listening_socket(family, sockaddr, reuse_port=False, backlog=backlog))
    except OSError as exc:
        for sock in opened:
            sock.close()
        why = "in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ListenError(label, f"cannot listen on {address}: {why}") from None
    return opened


def set_backlog(sockets: list[socket.socket], backlog: int) -> None:
    """Apply a listener's `backlog` to sockets already listening (kept across a reload, or passed
    on by the previous process in a binary upgrade): listen(2) again resizes the queue in place,
    without a moment in which connects are refused."""
    for sock in sockets:
        sock.listen(backlog)


def _listening_socket(family: int, sockaddr: tuple[Any, ...], *, reuse_port: bool, backlog: int) -> socket.socket:
    """A non-blocking listening socket; with `reuse_port`, one that other workers bind too
    (SO_REUSEPORT: the kernel spreads connects)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        tune_tcp(sock)  # before listen(): what every accepted socket inherits (streams.tune_accepted)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
