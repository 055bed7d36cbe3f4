"""What a relay is to the session: bytes in from either peer, bytes out to either peer.

Two relays implement this interface: `relay_inspect.InspectRelay` (every frame parsed,
validated, unmasked and re-framed, per-hop permessage-deflate) and, per ARCHITECTURE.md "Two
relay paths", `relay_passthrough.PassthroughRelay`, which forwards frames verbatim. The shell
(runtime/link.py, on the readiness loop) drives either without knowing which: it feeds what it reads,
sends what the relay queued, closes a peer's socket once the relay says that peer is done, and
arms the close timeout once the relay says a closing handshake started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from wsproxy.protocol.sides import Side

# Close codes the proxy itself sends (RFC 6455 section 7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
ABNORMAL = 1006  # never sent: recorded when a peer vanished without a close frame

# "No message limit" for a relay's client allowance (`Relay.limit_client`): a count never reached,
# so the check at a message's end is one comparison whether or not a limit is set.
NO_MESSAGE_LIMIT = 1 << 62


@dataclass(slots=True)
class CloseRecord:
    code: int | None  # None: a close frame without a status code (1005 on the wire)
    reason: str


@dataclass(slots=True)
class RelayStats:
    """What happened in one session, for its log line and (later) metrics."""

    client_bytes_in: int = 0
    backend_bytes_in: int = 0
    messages_to_backend: int = 0
    messages_to_client: int = 0
    data_frames: int = 0  # data frames (or parts) relayed either way: activity for the idle timer
    client_close: CloseRecord | None = None  # what the client sent (or 1006 if it vanished)
    backend_close: CloseRecord | None = None
    proxy_close: CloseRecord | None = None  # a close the proxy originated, and why
    first_closer: str | None = None  # "client" | "backend" (a Side) | "proxy"

    def closed_by(self, who: str) -> None:
        """`who` (a Side, or "proxy") closed first, unless someone already did."""
        if self.first_closer is None:
            self.first_closer = who

    def peer_closed(self, side: Side, code: int | None, reason: str) -> None:
        """`side` sent its close frame (or vanished: code 1006)."""
        if side == Side.CLIENT:
            self.client_close = CloseRecord(code, reason)
        else:
            self.backend_close = CloseRecord(code, reason)
        self.closed_by(side)


class Relay(Protocol):
    """The sans-I/O contract between session.py and a relay path."""

    stats: RelayStats

    def feed_client(self, data: bytes) -> None:
        """Bytes read from the client; b"" means the client's stream ended."""

    def feed_backend(self, data: bytes) -> None:
        """Bytes read from the backend; b"" means the backend's stream ended."""

    def take_for_client(self) -> bytes:
        """Everything queued for the client since the last call (b"" if nothing)."""

    def take_for_backend(self) -> bytes:
        """Everything queued for the backend since the last call."""

    def backlog(self, side: Side) -> bool:
        """Did the relay keep some of what `side` sent unprocessed (its output queue is full)?
        The session then sends what is queued and calls `resume(side)` before reading more.
        A relay whose backlog is always empty says so with a class attribute `may_backlog =
        False`, and the shell stops asking after every read."""

    def resume(self, side: Side) -> None:
        """Process more of `side`'s backlog, as far as the output queue has room."""

    def limit_client(self, *, messages: int | None, nbytes: int | None) -> None:
        """From here on, act on at most `messages` more complete data messages and `nbytes` more
        bytes of the client's stream (None: no limit; the rate limit's budget). What a read
        brings beyond them is held unprocessed (at a message's end, or at the byte), and shows as
        `backlog(CLIENT)` once a new allowance lets some of it through; `resume(CLIENT)` goes on."""

    def client_allowance(self) -> tuple[int | None, int | None]:
        """(messages, bytes) of the current allowance still unused (None: no limit)."""

    def held(self, side: Side) -> int:
        """Bytes of `side`'s stream read but not yet acted on (a backlog, or held by the limit)."""

    def close(self, *, client_code: int, backend_code: int, reason: str) -> None:
        """Start a closing handshake the proxy originates (shutdown, timeouts, limits)."""

    def abandon(self, side: Side, *, other_code: int, reason: str) -> None:
        """Give up on `side` (dead or stuck peer): nothing more goes to or comes from it; the
        other peer gets a close with `other_code`."""

    def close_slow(self, side: Side, *, code: int, other_code: int, reason: str, finish_limit: int) -> bool:
        """`side` takes nothing (a slow consumer): nothing more is relayed to it but the rest of
        the frame in flight, then a close with `code`; the other peer gets `other_code`. False
        if that frame cannot be finished from at most `finish_limit` more bytes of the other
        peer: `side` is abandoned instead (no close frame can follow a cut frame)."""

    def close_received(self, side: Side) -> bool:
        """Did `side`'s close frame arrive? (A side done without it may still be sending: the
        shell reads and discards its input before closing, so the close it was sent is read.)"""

    def send_ping(self, side: Side, payload: bytes) -> bool:
        """Queue the proxy's own ping to `side` (at a frame boundary); False if that side can no
        longer take one."""

    def ping_waiting(self, side: Side) -> bool:
        """Is a proxy ping to `side` still held back (behind a frame being forwarded)? The
        heartbeat starts a ping's timeout only once it could actually reach the peer."""

    def take_pongs(self) -> list[tuple[Side, bytes]]:
        """Pongs that answered the proxy's own pings (their payload equals one the proxy sent to
        that side and has not yet seen answered), swallowed rather than forwarded, as
        (side, payload), since the last call. Every other pong passes end to end."""

    @property
    def client_done(self) -> bool:
        """Nothing more goes to or comes from the client: flush, then close its socket."""

    @property
    def backend_done(self) -> bool:
        """Nothing more goes to or comes from the backend: flush, then close its socket."""

    @property
    def closing(self) -> bool:
        """A closing handshake has started on some hop: the close timeout now runs. True
        whenever client_done or backend_done is (the shell checks those only then)."""


class SplicingRelay(Relay, Protocol):
    """A relay that lets large payloads cross outside it (a kernel pipe, runtime/splice.py) and
    accounts for bytes it never saw: passthrough only (it says so with `may_splice = True`)."""

    def splice_run(self, side: Side, least: int) -> int:
        """Bytes `side` sends next that may go to the other peer verbatim and unseen (0: none)."""

    def frame_length(self, side: Side) -> int:
        """Payload length of the last data frame whose header came from `side`, at a frame boundary
        (0 otherwise)."""

    def spliced(self, side: Side, n: int) -> None:
        """`n` bytes of `splice_run(side)` went to the other peer outside the relay."""
