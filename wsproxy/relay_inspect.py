"""The inspect relay: wsproto on both hops, every frame parsed, validated and re-framed.

Each hop negotiates its own permessage-deflate. Messages are streamed frame chunk by frame
chunk (wsproto hands out partial payloads as they arrive), so a large message is never held
whole. Compressed input is consumed in small slices and only while the other peer's queue is
under `buffer_bytes`: deflate expands up to ~1000x, so a 64 KiB read could otherwise become
64 MiB in memory (a compression bomb); the rest waits as backlog until the queue drains.

Pings and pongs pass end to end; close codes and reasons pass end to end, and the closing
handshake completes on both hops. The proxy's own closes follow RFC 6455: a protocol error
answers the offending peer with wsproto's code (1002/1007) and the other peer with 1001 (client
at fault) or 1011 (backend at fault).
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason

from wsproxy import defaults
from wsproxy.heartbeat import PING_MARKER
from wsproxy.relay import ABNORMAL, GOING_AWAY, INTERNAL_ERROR, TOO_BIG, CloseRecord, RelayStats

DEFLATE_SLICE = 1024  # compressed bytes fed to wsproto at once: at most ~1 MiB inflated
MAX_OWN_PINGS = 4  # unanswered proxy pings remembered per hop (the schedule keeps one in flight)
_OPEN = ConnectionState.OPEN
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_CLOSED = ConnectionState.CLOSED


class _Hop:
    """One side of the proxy: a wsproto connection plus what is queued for that peer."""

    __slots__ = ("conn", "failed", "inbox", "message_bytes", "name", "out", "own_pings", "slice")

    def __init__(self, name: str, conn: Connection, *, compressed: bool) -> None:
        self.name = name
        self.conn = conn
        self.out = bytearray()
        self.inbox = bytearray()  # read from this peer, not yet fed to wsproto (backlog)
        self.slice = DEFLATE_SLICE if compressed else None
        self.failed = False  # stream ended or protocol error: read nothing more from it
        self.message_bytes = 0  # size so far of the message this peer is sending
        self.own_pings: list[bytes] = []  # payloads of the proxy's pings to this peer, unanswered

    @property
    def state(self) -> ConnectionState:
        return self.conn.state

    @property
    def done(self) -> bool:
        return self.failed or self.conn.state is _CLOSED

    def send(self, event: Event) -> None:
        self.out += self.conn.send(event)

    def send_close(self, code: int | None, reason: str) -> None:
        """Send a close frame if this hop may still send one (OPEN or REMOTE_CLOSING)."""
        if self.failed or self.conn.state not in (_OPEN, _REMOTE_CLOSING):
            return
        if code in (None, CloseReason.NO_STATUS_RCVD, ABNORMAL):
            self.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD))
        else:
            self.send(CloseConnection(code=code, reason=reason or None))

    def take(self) -> bytes:
        if not self.out:
            return b""
        data = bytes(self.out)
        self.out.clear()
        return data


class InspectRelay:
    """Relay two wsproto connections; see the module docstring for the rules."""

    __slots__ = ("_backend", "_buffer", "_client", "_marker", "_max_message", "_pongs", "stats")

    def __init__(
        self,
        *,
        client_extensions: list[Extension] | None = None,
        backend_extensions: list[Extension] | None = None,
        max_message_bytes: int | None = None,
        buffer_bytes: int = defaults.BUFFER_BYTES,
        ping_marker: bytes = PING_MARKER,
    ) -> None:
        self._client = _Hop(
            "client",
            Connection(ConnectionType.SERVER, extensions=client_extensions or []),
            compressed=bool(client_extensions),
        )
        self._backend = _Hop(
            "backend",
            Connection(ConnectionType.CLIENT, extensions=backend_extensions or []),
            compressed=bool(backend_extensions),
        )
        self._buffer = buffer_bytes
        self._max_message = max_message_bytes
        self._marker = ping_marker
        self._pongs: list[tuple[str, bytes]] = []
        self.stats = RelayStats()

    # --- the Relay contract ---------------------------------------------------------------

    @property
    def client_done(self) -> bool:
        return self._client.done

    @property
    def backend_done(self) -> bool:
        return self._backend.done

    @property
    def closing(self) -> bool:
        return (
            self._client.state is not _OPEN
            or self._backend.state is not _OPEN
            or self._client.failed
            or self._backend.failed
        )

    def take_for_client(self) -> bytes:
        return self._client.take()

    def take_for_backend(self) -> bytes:
        return self._backend.take()

    def feed_client(self, data: bytes) -> None:
        self.stats.client_bytes_in += len(data)
        self._feed(self._client, self._backend, data)

    def feed_backend(self, data: bytes) -> None:
        self.stats.backend_bytes_in += len(data)
        self._feed(self._backend, self._client, data)

    def backlog(self, side: str) -> bool:
        src = self._client if side == "client" else self._backend
        return bool(src.inbox) and not src.failed and src.state is not _CLOSED

    def resume(self, side: str) -> None:
        if side == "client":
            self._drain(self._client, self._backend)
        else:
            self._drain(self._backend, self._client)

    def close(self, *, client_code: int, backend_code: int, reason: str) -> None:
        if self._client.state is _OPEN or self._backend.state is _OPEN:
            self.stats.closed_by("proxy")
            if self.stats.proxy_close is None:
                self.stats.proxy_close = CloseRecord(client_code, reason)
        if self._client.state is _OPEN:
            self._client.send_close(client_code, reason)
        if self._backend.state is _OPEN:
            self._backend.send_close(backend_code, reason)

    def abandon(self, side: str, *, other_code: int, reason: str) -> None:
        src, dst = (self._client, self._backend) if side == "client" else (self._backend, self._client)
        if src.done:
            return
        src.failed = True
        src.out.clear()
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(other_code, reason)
        self._close_other(dst, other_code, reason)

    def send_ping(self, to: str, payload: bytes) -> bool:
        hop = self._client if to == "client" else self._backend
        if hop.failed or hop.state is not _OPEN:
            return False
        hop.send(Ping(payload=payload))
        hop.own_pings.append(payload)
        del hop.own_pings[:-MAX_OWN_PINGS]
        return True

    def ping_waiting(self, to: str) -> bool:
        return False  # every event is re-framed whole: a ping is never held behind a frame

    def take_pongs(self) -> list[tuple[str, bytes]]:
        if not self._pongs:
            return self._pongs
        pongs, self._pongs = self._pongs, []
        return pongs

    # --- internals ------------------------------------------------------------------------

    def _record_peer_close(self, hop: _Hop, code: int | None, reason: str) -> None:
        rec = CloseRecord(code, reason)
        if hop is self._client:
            self.stats.client_close = rec
        else:
            self.stats.backend_close = rec
        self.stats.closed_by(hop.name)

    def _feed(self, src: _Hop, dst: _Hop, data: bytes) -> None:
        if src.failed or src.state is _CLOSED:
            return  # after a close or a failure, nothing more from this peer is acted on
        if not data:
            src.inbox.clear()
            self._peer_lost(src, dst)
            return
        if src.slice is None and not src.inbox:
            self._receive(src, dst, data)
        else:
            src.inbox += data
            self._drain(src, dst)

    def _drain(self, src: _Hop, dst: _Hop) -> None:
        """Feed backlog to wsproto while the other peer's queue has room."""
        step = src.slice or len(src.inbox)
        while src.inbox and len(dst.out) < self._buffer and not src.failed and src.state is not _CLOSED:
            chunk = bytes(src.inbox[:step])
            del src.inbox[:step]
            self._receive(src, dst, chunk)
        if src.failed or src.state is _CLOSED:
            src.inbox.clear()

    def _receive(self, src: _Hop, dst: _Hop, data: bytes) -> None:
        src.conn.receive_data(data)
        to_client = dst is self._client
        events = src.conn.events()
        while True:
            before = src.state
            event = next(events, None)
            if event is None:
                return
            if isinstance(event, TextMessage | BytesMessage):
                self.stats.data_frames += 1
                if self._max_message is not None:
                    size = len(event.data) if isinstance(event, BytesMessage) else len(event.data.encode())
                    src.message_bytes += size
                    if src.message_bytes > self._max_message:
                        self._too_big(src, dst)
                        return
                    if event.message_finished:
                        src.message_bytes = 0
                if dst.state is _OPEN and not dst.failed:
                    dst.send(type(event)(data=event.data, message_finished=event.message_finished))
                    if event.message_finished:
                        if to_client:
                            self.stats.messages_to_client += 1
                        else:
                            self.stats.messages_to_backend += 1
            elif isinstance(event, Ping):
                if dst.state is _OPEN and not dst.failed:
                    dst.send(Ping(payload=event.payload))
            elif isinstance(event, Pong):
                payload = bytes(event.payload)
                if payload.startswith(self._marker) and payload in src.own_pings:
                    src.own_pings.remove(payload)
                    self._pongs.append((src.name, payload))
                elif dst.state is _OPEN and not dst.failed:
                    dst.send(Pong(payload=event.payload))
            elif isinstance(event, CloseConnection):
                if src.state is before:
                    self._protocol_error(src, dst, event)
                    return
                self._peer_close(src, dst, event)

    def _peer_close(self, src: _Hop, dst: _Hop, event: CloseConnection) -> None:
        code: int | None = None if event.code == CloseReason.NO_STATUS_RCVD else int(event.code)
        reason = event.reason or ""
        self._record_peer_close(src, code, reason)
        if src.state is _REMOTE_CLOSING:
            # The peer started closing: pass it on; its answer comes back when the other side
            # answers. If the other side cannot answer any more, answer the peer ourselves.
            if dst.state is _OPEN and not dst.failed:
                dst.send_close(code, reason)
            else:
                src.send_close(code, reason)
        elif src.state is _CLOSED and dst.state is _REMOTE_CLOSING:
            # The peer answered a close we forwarded to it: complete the other hop with it.
            dst.send_close(code, reason)

    def _protocol_error(self, src: _Hop, dst: _Hop, event: CloseConnection) -> None:
        code = int(event.code)
        reason = event.reason or "protocol error"
        src.send_close(code, reason)
        src.failed = True
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(code, f"{src.name} protocol error: {reason}")
        other_code = GOING_AWAY if src is self._client else INTERNAL_ERROR
        other_reason = "client protocol error" if src is self._client else "backend protocol error"
        self._close_other(dst, other_code, other_reason)

    def _too_big(self, src: _Hop, dst: _Hop) -> None:
        reason = f"message over {self._max_message} bytes"
        src.send_close(TOO_BIG, reason)
        src.failed = True
        self.stats.closed_by("proxy")
        self.stats.proxy_close = CloseRecord(TOO_BIG, f"{src.name} sent a {reason}")
        self._close_other(dst, GOING_AWAY, f"{src.name} sent a {reason}")

    def _peer_lost(self, src: _Hop, dst: _Hop) -> None:
        """The peer's stream ended. Without a finished closing handshake, it vanished."""
        src.conn.receive_data(None)  # wsproto marks the hop CLOSED (1006)
        for _ in src.conn.events():
            pass
        src.failed = True
        if self.stats.client_close is None and src is self._client:
            self.stats.client_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by("client")
        elif self.stats.backend_close is None and src is self._backend:
            self.stats.backend_close = CloseRecord(ABNORMAL, "connection lost")
            self.stats.closed_by("backend")
        if src is self._client:
            self._close_other(dst, GOING_AWAY, "client went away")
        else:
            self._close_other(dst, INTERNAL_ERROR, "backend connection lost")

    def _close_other(self, dst: _Hop, code: int, reason: str) -> None:
        if dst.state is _OPEN:
            dst.send_close(code, reason)
        elif dst.state is _REMOTE_CLOSING:
            # The other peer was waiting for an answer to its close: give it its own code back.
            rec = self.stats.client_close if dst is self._client else self.stats.backend_close
            dst.send_close(rec.code if rec else code, rec.reason if rec else reason)
